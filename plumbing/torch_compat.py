"""The few torch calls whose spelling differs between torch 2.4 and the newest release, each behind a helper that
picks the spelling by what the installed torch has (a feature check, never a version string)."""
import inspect

import torch

CPUINFO = '/proc/cpuinfo'  # Linux's list of the CPU's flags: the answer where torch cannot give it


def use_tf32():
    """Let fp32 matrix products (cuBLAS) and cuDNN convolutions on CUDA run on TF32 tensor cores.

    Sets global flags only: harmless, and testable, on a machine without a GPU."""
    # torch 2.9 added the fp32_precision settings and deprecated allow_tf32: there, reading allow_tf32 after
    # fp32_precision was set raises RuntimeError, so only one spelling may be used. torch 2.4 has allow_tf32 alone.
    if hasattr(torch.backends.cuda.matmul, 'fp32_precision') and hasattr(torch.backends.cudnn, 'conv'):
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        torch.backends.cudnn.conv.fp32_precision = 'tf32'
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_flags():
    """The flags /proc/cpuinfo lists for the CPU; an empty set where there is no such file (macOS, Windows)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                name, _, value = line.partition(':')
                if name.strip() == 'flags':
                    return set(value.split())
    except OSError:
        pass
    return set()


def _cpu_has(torch_check, linux_flag):
    # torch.cpu._is_amx_tile_supported and _is_avx512_bf16_supported are not in torch 2.4 (2.4.1 has only
    # _is_cpu_support_avx2/avx512/vnni); later releases added them. Without them, Linux's flag says it.
    check = getattr(torch.cpu, torch_check, None)
    return check() if check is not None else linux_flag in cpu_flags()


def cpu_bf16_instructions():
    """The CPU's native bf16 matrix instructions, 'AMX' or 'AVX512_BF16', or None: without them bf16 is
    emulated and runs slower than fp32. None too where neither torch nor /proc/cpuinfo can tell."""
    # torch asks for AMX's tiles, Linux's fallback for AMX-BF16: every AMX CPU made has both.
    if _cpu_has('_is_amx_tile_supported', 'amx_bf16'):
        return 'AMX'
    if _cpu_has('_is_avx512_bf16_supported', 'avx512_bf16'):
        return 'AVX512_BF16'
    return None


def cuda_has_native_bf16():
    """Whether the current CUDA device computes in bf16 natively (compute capability 8.0, Ampere, or newer),
    not by emulation; False where there is no CUDA device."""
    # torch 2.4's is_bf16_supported raises RuntimeError where there is no CUDA driver; later releases return
    # False. including_emulation=False is in torch 2.4.1 and in the newest alike.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def ddp_keeps_buffers_local():
    """The DistributedDataParallel keyword that stops it broadcasting rank 0's buffers (BatchNorm's running
    statistics) to every process at each forward; each process keeps statistics of its own share.

    The training step needs that: D runs on the real and on the fake batch before one backward, and on
    torch 2.4 the broadcast at the second forward modifies in place the running statistics that the first
    forward's batch_norm saved for backward, so the backward fails ("modified by an inplace operation";
    seen with gloo on 2.4.1). The newest torch no longer fails there, but would still replace every
    process's statistics with rank 0's at each forward.
    """
    # torch 2.13 added forward_sync_buffers and deprecated broadcast_buffers (a FutureWarning). Both stop the
    # broadcast at each forward; broadcast_buffers=False also skips the one broadcast of buffers when DDP is
    # made, forward_sync_buffers=False keeps it. That makes no difference here: the models are wrapped after
    # every process made them from the same seed, or loaded the same checkpoint, so their buffers are equal then.
    if 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        return {'forward_sync_buffers': False}
    return {'broadcast_buffers': False}
