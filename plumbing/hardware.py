"""The device a run uses and the precision it computes in."""
import torch

from plumbing import torch_compat
from plumbing.console import fail


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


def autocast_dtype(choice, device, bf16_by_default=True):
    """The dtype of a --precision choice's autocast on device, None for fp32; prints which device and
    precision the run uses and why. Weights, optimizer states and losses stay fp32 either way."""
    dtype, why = choose_precision(choice, device, bf16_by_default)
    name = {torch.bfloat16: 'bf16', torch.float16: 'fp16', None: 'fp32'}[dtype]
    print(f"{device}, {name}{' autocast' if dtype else ''}: {why}", flush=True)
    if dtype:
        try:
            torch.autocast(device.type, dtype=dtype)
        except RuntimeError as e:
            fail(f"--precision={choice} is not supported on {device} ({str(e).splitlines()[0]}); "
                 f"use --precision=fp32", 2)
    return dtype


def synchronize(device):
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
