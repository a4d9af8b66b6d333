"""Starting under torchrun: its environment checked, the process group joined (NCCL on GPUs, gloo on CPUs),
models wrapped in DistributedDataParallel, and what a failed collective looks like."""
import atexit
import datetime
import os
import signal
import sys

import torch

from plumbing import torch_compat
from plumbing.console import fail
from plumbing.hardware import pick_device
from plumbing.distributed import rank, world_size
from plumbing.interrupts import raise_stopped


PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=3)  # a collective waiting this long means a process is stuck


def failed_collective(error):
    """Whether error is a collective of several processes failing: another process died or stopped
    answering. torch.distributed raises its DistError for NCCL and the store; gloo's errors reach Python as
    a plain RuntimeError naming gloo's source file. Any other error is a bug, to be seen in full."""
    return world_size() > 1 and (isinstance(error, torch.distributed.DistError) or
                                 isinstance(error, RuntimeError) and 'gloo' in str(error))


def check_torchrun_environment():
    """WORLD_SIZE, once RANK, WORLD_SIZE and LOCAL_RANK are known to describe a run torchrun started; one
    line (from every process: each may be alone) where they cannot, as when a cluster's pod left them set."""
    one = "or unset RANK, WORLD_SIZE and LOCAL_RANK to run one process"
    given = {name: os.environ[name] for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK') if name in os.environ}
    for name, text in given.items():
        if not text.isdigit():
            fail(f"{name}={text!r} is not a process number: start the script with torchrun, {one}", 2, every_rank=True)
    size, rank_here = int(given.get('WORLD_SIZE', 1)), int(given.get('RANK', 0))
    if not 0 <= rank_here < size:
        fail(f"RANK={rank_here} does not fit WORLD_SIZE={size}: start the script with torchrun, {one}", 2,
             every_rank=True)
    if size > 1 and not {'MASTER_ADDR', 'MASTER_PORT'} <= os.environ.keys():
        fail(f"WORLD_SIZE={size} is set, but not MASTER_ADDR and MASTER_PORT: start the script with torchrun "
             f"(python -m torch.distributed.run --nproc_per_node={size} ...), {one}", 2, every_rank=True)
    return size


class World:
    """This process's place among the processes torchrun started (RANK, WORLD_SIZE, LOCAL_RANK), or a world
    of one process when started with python.

    Each process trains on its share (batch_size / size) of every global batch, and DistributedDataParallel
    averages the gradients over the processes, so the global batch, the lr and the schedule stay the
    experiment's and every process holds the same weights. NCCL joins GPUs, one per process; gloo CPUs.
    """

    def __init__(self, device_choice, batch_size, generate=0, sync_batchnorm=False):
        self.size = check_torchrun_environment()
        self.sync_batchnorm = sync_batchnorm
        signal.signal(signal.SIGTERM, raise_stopped)
        if self.size == 1:
            self.device = pick_device(device_choice)
            return
        if rank():  # every process runs the same code: one of them speaks and shows the progress bar
            sys.stdout = open(os.devnull, 'w')
        self.device = pick_device(device_choice, local_rank=int(os.environ.get('LOCAL_RANK', 0)))
        if generate:
            fail("--generate and --score run in one process: run them with python, not torchrun", 2)
        if batch_size % self.size:
            fail(f"batch_size={batch_size} does not split over {self.size} processes: start a number of processes "
                 f"that divides {batch_size}", 2)
        if batch_size // self.size < 2:
            fail(f"batch_size={batch_size} over {self.size} processes leaves each one image a step, and BatchNorm "
                 f"needs 2 at least: pass --batch_size={2 * self.size} or more, or start fewer processes", 2)
        if self.device.type not in ('cuda', 'cpu'):
            fail(f"--device={device_choice}: torchrun runs on CUDA GPUs (NCCL) or CPUs (gloo); use cuda or cpu", 2)
        if sync_batchnorm and self.device.type != 'cuda':
            fail("--sync_batchnorm=True needs GPUs: gloo, the CPUs' backend, cannot run SyncBatchNorm", 2)
        cuda = self.device.type == 'cuda'
        if cuda:
            torch.cuda.set_device(self.device)
        torch.distributed.init_process_group('nccl' if cuda else 'gloo', timeout=PROCESS_GROUP_TIMEOUT,
                                             device_id=self.device if cuda else None)
        atexit.register(torch.distributed.destroy_process_group)

    def parallel(self, model):
        """model in DistributedDataParallel when there are several processes, else model itself.

        No buffers broadcast at each forward (torch_compat.ddp_keeps_buffers_local): D runs on the real and
        on the fake batch before one backward, and DDP's default re-broadcast of BatchNorm's running
        statistics at the second forward modifies in place a tensor the first one saved for backward (an
        autograd error on torch 2.4; newer torch overwrites each process's statistics). So each process
        keeps BatchNorm statistics of its own share (training normalises by the batch's own statistics
        either way), unless sync_batchnorm computes them over the global batch (GPUs only).
        """
        if self.size == 1:
            return model
        if self.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == 'cuda' else None,
            **torch_compat.ddp_keeps_buffers_local())
