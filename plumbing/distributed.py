"""This process among torchrun's: its rank and the world's size, and the few collectives a run needs (a
barrier, rank 0's decision on every rank, a sum, a gather). Plain answers for a single process."""
import os

import torch


def rank():
    """This process's rank under torchrun (from its environment until the process group starts), else 0."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get('RANK', 0))


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def writes_files():
    """Whether this process writes outputs: the only one, or rank 0 of torchrun's."""
    return rank() == 0


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def from_rank0(flag):
    """rank 0's flag on every rank, so that all stop together."""
    if not torch.distributed.is_initialized():
        return flag
    decision = torch.tensor([int(flag)], device=torch.device('cuda', torch.cuda.current_device())
                            if torch.distributed.get_backend() == 'nccl' else 'cpu')
    torch.distributed.broadcast(decision, src=0)
    return bool(decision.item())


def summed(tensor):
    """tensor summed over the processes of a torchrun, on its own device; tensor itself for a single process."""
    if not torch.distributed.is_initialized():
        return tensor
    total = tensor.to(torch.device('cuda', torch.cuda.current_device()) if torch.distributed.get_backend() == 'nccl'
                      else 'cpu', copy=True)
    torch.distributed.all_reduce(total)
    return total.to(tensor.device)


def gather(obj):
    """[obj of each process] of a torchrun, in rank order; [obj] for a single process."""
    if not torch.distributed.is_initialized():
        return [obj]
    objects = [None] * world_size()
    torch.distributed.all_gather_object(objects, obj)
    return objects
