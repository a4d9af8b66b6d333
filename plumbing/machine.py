"""The machine a run uses: its device and precision, its processes under torchrun, its stdout (a progress
bar on a terminal; a lost reader is no reason to stop), and fail(), the one-line stop that every part of
the collection uses (under torchrun, rank 0 alone says it)."""
import atexit
import contextlib
import datetime
import os
import signal
import sys

import torch

from plumbing import torch_compat
from plumbing.interrupts import raise_stopped


# ---------------------------------------------------------------- stopping with one line

def fail(message, status=1, every_rank=False):
    """Stop with one line on stderr: the error and what to do about it.

    Under torchrun every process meets the same bad input, so rank 0 alone says it, unless the trouble
    is this process's own (every_rank), and then the line names the rank.
    """
    if every_rank or rank() == 0:
        where = f"rank {rank()}: " if every_rank and world_size() > 1 else ""
        print(f"error: {where}{message}", file=sys.stderr, flush=True)
    raise SystemExit(status)

# ---------------------------------------------------------------- device and precision

DEVICE_TYPES = ('cpu', 'cuda', 'mps')


def pick_device(choice, local_rank=None):
    """'auto' means CUDA, else Apple's MPS, else the CPU; under torchrun a process's GPU is its LOCAL_RANK's.
    On CUDA, fp32 work may use TF32 and cuDNN picks the fastest convolution for the (fixed) batch shape."""
    if choice == 'auto':
        choice = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        device = torch.device(choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        fail(f"--device={choice}: choose auto, {', '.join(DEVICE_TYPES)} or one of them numbered, like cuda:1", 2)
    if local_rank is not None and device.type == 'cuda':
        if device.index is not None:
            fail(f"--device={choice}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                 f"use --device=cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs", 2)
        device = torch.device('cuda', local_rank)
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        cause = str(e).splitlines()[0].split('. ')[0]  # torch's first sentence: its advice is for developers
        fail(f"device {choice!r} is not usable here ({cause}); use --device=auto or cpu")
    if device.type == 'cuda':
        torch_compat.use_tf32()
        torch.backends.cudnn.benchmark = True
    return device


PRECISIONS = ('auto', 'bf16', 'fp16', 'fp32')


cpu_bf16_instructions = torch_compat.cpu_bf16_instructions  # a name of its own here: tests mock it


def choose_precision(choice, device, bf16_by_default=True):
    """(autocast dtype or None for fp32, why) for a --precision choice on device. bf16_by_default=False
    (a model whose quality bf16 was seen to change) keeps 'auto' at fp32."""
    if choice not in PRECISIONS:
        fail(f"--precision={choice}: choose one of {', '.join(PRECISIONS)}", 2)
    if choice == 'auto' and not bf16_by_default:
        return None, "this model trains in fp32 unless asked (--precision=bf16): see the README's Speed section"
    if device.type == 'cuda':
        gpu = torch.cuda.get_device_name(device)
        has_bf16 = torch_compat.cuda_has_native_bf16()
        if choice == 'bf16' and not has_bf16:
            fail(f"--precision=bf16: this GPU ({gpu}) has no bf16; use --precision=fp16 or auto", 2)
        if choice == 'auto':
            return (torch.bfloat16, f"this GPU ({gpu}) supports bf16") if has_bf16 else \
                   (None, f"this GPU ({gpu}) has no bf16 (--precision=fp16 may be faster)")
    elif device.type == 'cpu':
        native = cpu_bf16_instructions()
        if choice == 'auto':
            return (torch.bfloat16, f"this CPU has {native}") if native else \
                   (None, "this CPU has no native bf16 (AMX or AVX512_BF16), where bf16 is slower than fp32")
        if choice == 'bf16' and not native:
            return torch.bfloat16, "as asked; this CPU has no native bf16, so it is slower than fp32"
        if choice == 'fp16':
            return torch.float16, "as asked; fp16 matrix products are slow on most CPUs (bf16 or fp32 is faster)"
    elif choice == 'auto':
        return None, f"mixed precision is not known to work well on {device.type}"
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[choice], "as asked"


def mixed_precision(choice, device, bf16_by_default=True):
    """The autocast context for the forward passes and the GradScaler of a --precision choice; prints which
    device and precision the run uses and why. Weights, optimizer states and losses stay fp32; fp16
    scales the losses so small gradients do not underflow (bf16 has fp32's range and needs no scaling)."""
    dtype, why = choose_precision(choice, device, bf16_by_default)
    name = {torch.bfloat16: 'bf16', torch.float16: 'fp16', None: 'fp32'}[dtype]
    print(f"{device}, {name}{' autocast' if dtype else ''}: {why}", flush=True)
    try:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    except RuntimeError as e:
        fail(f"--precision={choice} is not supported on {device} ({str(e).splitlines()[0]}); use --precision=fp32", 2)
    return ctx, torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


def memory_format(channels_last):
    """Convolutions run faster in channels-last (NHWC) memory order with oneDNN and cuDNN."""
    return torch.channels_last if channels_last else torch.contiguous_format


def compile_models(*models):
    """torch.compile each model in place, so its state_dict keeps its names (no _orig_mod. prefix)."""
    for model in models:
        model.compile()


def has_fused_adam(device):
    """Whether Adam can run as one fused kernel on device: on CUDA and on the CPU."""
    return device.type in ('cuda', 'cpu')


# ---------------------------------------------------------------- several processes (torchrun)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=3)  # a collective waiting this long means a process is stuck


def failed_collective(error):
    """Whether error is a collective of several processes failing: another process died or stopped
    answering. torch.distributed raises its DistError for NCCL and the store; gloo's errors reach Python as
    a plain RuntimeError naming gloo's source file. Any other error is a bug, to be seen in full."""
    return world_size() > 1 and (isinstance(error, torch.distributed.DistError) or
                                 isinstance(error, RuntimeError) and 'gloo' in str(error))


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


def gather(obj):
    """[obj of each process] of a torchrun, in rank order; [obj] for a single process."""
    if not torch.distributed.is_initialized():
        return [obj]
    objects = [None] * world_size()
    torch.distributed.all_gather_object(objects, obj)
    return objects


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
            fail("--generate samples in one process: run it with python, not torchrun", 2)
        if batch_size % self.size:
            fail(f"batch_size={batch_size} does not split over {self.size} processes: use a number of processes "
                 f"that divides it, or another --batch_size", 2)
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


# ---------------------------------------------------------------- watching it run

class _LosableStdout:
    """sys.stdout that, once its reader has gone (`python mnist_gan.py | head -1`), sends what follows
    to os.devnull instead of raising BrokenPipeError: losing the output must not stop a training."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._lost()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._lost()

    def _lost(self):
        # Onto the descriptor itself, so the interpreter's last flush at exit finds a file that takes it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def __getattr__(self, name):
        return getattr(self._stream, name)


def keep_training_without_stdout():
    if not isinstance(sys.stdout, _LosableStdout):
        sys.stdout = _LosableStdout(sys.stdout)



def progress(iterable, description):
    """A tqdm bar when a person watches stdout; silent in logs and CI."""
    from tqdm import tqdm
    return tqdm(iterable, desc=description, leave=False, disable=not sys.stdout.isatty())


def synchronize(device):
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
