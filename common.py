"""Plumbing shared by the experiment scripts: overrides, device, data files, images, checkpoints.

Nothing here is a model or a training step; each script keeps its own. Importing this module makes a
Ctrl-C that nothing else catches one line on stderr (exit status 130), so the scripts import it before
torch: then even a Ctrl-C while torch loads is one line and not a traceback.
"""
import sys


class Stopped(Exception):
    """SIGTERM: a job scheduler stopping the run, or torchrun stopping it after another process failed."""


def _one_line_interrupt(kind, value, traceback, previous=sys.excepthook):
    """A Ctrl-C or SIGTERM that reaches the top of a script (start-up, not training: Run says what an epoch
    saved). World turns SIGTERM into Stopped; before it, SIGTERM ends the process the default way."""
    if not issubclass(kind, (KeyboardInterrupt, Stopped)) or sys.flags.interactive or hasattr(sys, 'ps1'):
        return previous(kind, value, traceback)
    cause, status = ("interrupted", 130) if issubclass(kind, KeyboardInterrupt) else ("stopped by SIGTERM", 143)
    print(f"error: {cause} while starting, before any epoch was trained; run the same command again",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: an excepthook cannot raise SystemExit, and Python would otherwise end by the signal.
    import os
    os._exit(status)


sys.excepthook = _one_line_interrupt

import atexit  # noqa: E402  (after the hook: these imports are where a start-up Ctrl-C lands)
import contextlib  # noqa: E402
import datetime  # noqa: E402
import errno  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import operator  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import tokenize  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402

import torch  # noqa: E402


# ---------------------------------------------------------------- constants and overrides

def fail(message, status=1, every_rank=False):
    """Stop with one line on stderr: the error and what to do about it.

    Under torchrun every process meets the same bad input, so rank 0 alone says it, unless the trouble
    is this process's own (every_rank), and then the line names the rank.
    """
    if every_rank or rank() == 0:
        where = f"rank {rank()}: " if every_rank and world_size() > 1 else ""
        print(f"error: {where}{message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def constant_names(namespace):
    """The script's constants: its module-level int, float, bool and str names that start lower-case.

    Upper-case names (MODEL, N_CLASSES) are fixed facts of the experiment, not knobs.
    """
    return [name for name, value in namespace.items()
            if name[0].islower() and type(value) in (int, float, bool, str)]


def constant_help(source_path):
    """Map each `name = value  # comment` line of a script to its comment, for --help."""
    help_of = {}
    with tokenize.open(source_path) as f:
        for token in tokenize.generate_tokens(f.readline):
            line = token.line
            if token.type == tokenize.COMMENT and line[:1].isalpha() and '=' in line:
                help_of[line.split('=', 1)[0].strip()] = token.string.lstrip('# ').strip()
    return help_of


# The range a constant's comment opens with, before ': ' and its meaning (see constant_range).
_NUMBER = r'-?\d+(?:\.\d*)?(?:e-?\d+)?'
_BOUND = re.compile(rf'(>=|<=|>|<) ?({_NUMBER})$')
_INTERVAL = re.compile(rf'([\[(])({_NUMBER}), ({_NUMBER})([\])])$')
_CHOICES = re.compile(r'\{(.+)\}$')
_VALUE = re.compile(rf'{_NUMBER}$')
_COMPARE = {'>': operator.gt, '>=': operator.ge, '<': operator.lt, '<=': operator.le,
            '[': operator.ge, '(': operator.gt, ']': operator.le, ')': operator.lt}


class Range:
    """The values a constant allows, parsed from the opening of its comment:

        > 0    >= 1    < 1    [0, 1)    (0, 1]    {auto, bf16}    non-empty    0 or [2, 100000]    [2, 64], even

    Bounds and intervals take numbers, {...} the allowed values themselves, `non-empty` any string
    but ''; `or` joins alternatives, where a bare number stands for itself; `, even` asks for an even
    number besides.
    """

    def __init__(self, spec):
        self.even = spec.endswith(', even')
        parts = spec.removesuffix(', even').split(' or ')
        self.tests = [self._parse(part, alone=len(parts) == 1) for part in parts]

    @staticmethod
    def _parse(part, alone):
        """(a description, a test of a value) for one alternative, or None if the part is no range."""
        if m := _BOUND.match(part):
            compare, bound = _COMPARE[m.group(1)], float(m.group(2))
            return f"a value {m.group(1)} {m.group(2)}", lambda value: compare(value, bound)
        if m := _INTERVAL.match(part):
            above, low, high, below = _COMPARE[m.group(1)], float(m.group(2)), float(m.group(3)), _COMPARE[m.group(4)]
            return f"a value in {part}", lambda value: above(value, low) and below(value, high)
        if m := _CHOICES.match(part):
            choices = [c.strip() for c in m.group(1).split(',')]
            return " or ".join(choices) if len(choices) < 3 else f"one of {', '.join(choices)}", \
                lambda value: str(value) in choices
        if part == 'non-empty':
            return "a non-empty value", lambda value: value != ''
        if not alone and _VALUE.match(part):
            return part, lambda value: value == float(part)
        return None

    def is_range(self):
        return None not in self.tests

    def allows(self, value):
        return any(test(value) for _, test in self.tests) and not (self.even and value % 2)

    def describe(self):
        return ' or '.join(description for description, _ in self.tests) + (', even' if self.even else '')


def constant_range(comment):
    """The Range a constant's comment opens with (`> 0: Adam learning rate`), or None if it opens with none."""
    spec, colon, _ = comment.partition(': ')
    if not colon:
        return None
    allowed = Range(spec)
    return allowed if allowed.is_range() else None


def parse_value(name, text, default):
    """Read `text` as the type of the constant's default value; fail with one line if it is not."""
    kind = type(default)
    if kind is bool:
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
    else:
        try:
            value = kind(text)
            if kind is not float or math.isfinite(value):
                return value
        except ValueError:
            pass
    fail(f"--{name}={text}: expected {kind.__name__} (default {default!r})", 2)


def configure(namespace, argv=None):
    """Apply `--name=value` overrides to a script's constants in place, nanoGPT style, and check every
    constant against the range its comment opens with, before the script does anything.

    `--help` lists every constant with its value, range and meaning. Returns the constants as a dict.
    """
    argv = sys.argv[1:] if argv is None else argv
    names = constant_names(namespace)
    help_of = constant_help(namespace['__file__'])
    if '--help' in argv or '-h' in argv:
        print((namespace.get('__doc__') or '').strip())
        print("\nConstants (override any as --name=value; a range before the colon says which values it takes):")
        width = max(len(n) for n in names)
        for name in names:
            print(f"  --{name:<{width}} = {namespace[name]!r:<24} {help_of.get(name, '')}")
        raise SystemExit(0)
    defaults, given = {name: namespace[name] for name in names}, {}
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            fail(f"cannot read argument {arg!r}: write --name=value (see --help)", 2)
        name, text = arg[2:].split('=', 1)
        if name not in names:
            fail(f"unknown constant {name!r}; valid: {', '.join(names)}", 2)
        namespace[name] = parse_value(name, text, defaults[name])
        given[name] = text
    for name in names:
        allowed = constant_range(help_of.get(name, ''))
        if allowed is not None and not allowed.allows(namespace[name]):
            where = (f"--{name}={given[name]}" if name in given else
                     f"{name} = {namespace[name]!r} in {os.path.basename(namespace['__file__'])}")
            fail(f"{where}: choose {allowed.describe()}", 2)
    return {name: namespace[name] for name in names}


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
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        torch.backends.cudnn.conv.fp32_precision = 'tf32'
        torch.backends.cudnn.benchmark = True
    return device


PRECISIONS = ('auto', 'bf16', 'fp16', 'fp32')


def cpu_bf16_instructions():
    """The CPU's native bf16 matrix instructions ('AMX' or 'AVX512_BF16'), or None: without them bf16 is
    emulated and runs slower than fp32."""
    for name, supported in (('AMX', '_is_amx_tile_supported'), ('AVX512_BF16', '_is_avx512_bf16_supported')):
        if getattr(torch.cpu, supported, lambda: False)():
            return name
    return None


def choose_precision(choice, device, bf16_by_default=True):
    """(autocast dtype or None for fp32, why) for a --precision choice on device. bf16_by_default=False
    (a model whose quality bf16 was seen to change) keeps 'auto' at fp32."""
    if choice not in PRECISIONS:
        fail(f"--precision={choice}: choose one of {', '.join(PRECISIONS)}", 2)
    if choice == 'auto' and not bf16_by_default:
        return None, "this model trains in fp32 unless asked (--precision=bf16): see the README's Speed section"
    if device.type == 'cuda':
        gpu = torch.cuda.get_device_name(device)
        has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
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


def adam(parameters, lr, beta1, device):
    """Adam with betas (beta1, 0.999), as one fused kernel where the device has it."""
    return torch.optim.Adam(parameters, lr=lr, betas=(beta1, 0.999), fused=device.type in ('cuda', 'cpu'))


def compile_models(*models):
    """torch.compile each model in place, so its state_dict keeps its names (no _orig_mod. prefix)."""
    for model in models:
        model.compile()


# ---------------------------------------------------------------- several processes (torchrun)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=3)  # a collective waiting this long means a process is stuck


def raise_stopped(signum, frame):
    raise Stopped()


# What ends a training loop early but keeps its last checkpoint: Ctrl-C, SIGTERM, and under torchrun a
# failed collective (a RuntimeError: another process died or stopped answering).
INTERRUPTIONS = (KeyboardInterrupt, Stopped, RuntimeError)


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


class World:
    """This process's place among the processes torchrun started (RANK, WORLD_SIZE, LOCAL_RANK), or a world
    of one process when started with python.

    Each process trains on its share (batch_size / size) of every global batch, and DistributedDataParallel
    averages the gradients over the processes, so the global batch, the lr and the schedule stay the
    experiment's and every process holds the same weights. NCCL joins GPUs, one per process; gloo CPUs.
    """

    def __init__(self, device_choice, batch_size, generate=0, sync_batchnorm=False):
        self.size = int(os.environ.get('WORLD_SIZE', 1))
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

        forward_sync_buffers=False: D runs on the real and on the fake batch before one backward, and
        DDP's default re-broadcast of BatchNorm's running statistics at the second forward would
        modify in place a tensor the first one saved for backward. So each process keeps BatchNorm
        statistics of its own share (training normalises by the batch's own statistics either way),
        unless sync_batchnorm computes them over the global batch (GPUs only).
        """
        if self.size == 1:
            return model
        if self.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == 'cuda' else None, forward_sync_buffers=False)


# ---------------------------------------------------------------- MNIST

MNIST_FILES = {True: ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
               False: ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def read_idx(path):
    """An IDX file (gzipped or not) as a uint8 tensor of the shape its header gives; ValueError saying what
    is wrong with a damaged, empty or truncated one."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a gzip stream cut short or garbled
        raise ValueError(f"its gzip data is damaged: {e}") from None
    if not data:
        raise ValueError("it is empty")
    if len(data) < 4 or data[:3] != b'\0\0\x08' or data[3] == 0:
        raise ValueError("it is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("its header is cut short")
    shape = struct.unpack(f'>{ndim}I', data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"its header announces {math.prod(shape):,} bytes of data but it holds "
                         f"{len(data) - header:,}: it is truncated or damaged")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _find_idx(raw_dir, name):
    for candidate in (name, name + '.gz'):
        path = os.path.join(raw_dir, candidate)
        if os.path.exists(path):
            return path
    return None


def load_mnist(data_dir, train=True):
    """MNIST as (uint8 images (N, 28, 28), int64 labels (N,)) from data_dir/MNIST/raw/.

    Missing files are fetched with torchvision's downloader; where that fails too, one line says
    which files to put where. A damaged, empty or truncated file is one line naming it.
    """
    raw_dir = os.path.join(data_dir, 'MNIST', 'raw')
    names = MNIST_FILES[train]
    if any(_find_idx(raw_dir, n) is None for n in names):
        if writes_files():  # under torchrun rank 0 downloads while the others wait
            _download_mnist(data_dir, raw_dir)
        barrier()
    (images, image_path), (labels, label_path) = (_read_mnist_file(_find_idx(raw_dir, n)) for n in names)
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        fail(f"{image_path} holds an array of shape {tuple(images.shape)}, not 28x28 images; {_REPLACE}")
    if labels.dim() != 1 or labels.numel() and labels.max() > 9:
        fail(f"{label_path} does not hold digit labels 0-9; {_REPLACE}")
    if images.shape[0] != labels.shape[0]:
        fail(f"{image_path} holds {images.shape[0]} images but {label_path} {labels.shape[0]} labels; {_REPLACE}")
    return images, labels.long()


_REPLACE = "replace it with a good copy, or delete it to download MNIST again"


def _read_mnist_file(path):
    """(the IDX file's array, its path), or stop with one line naming the file and what is wrong with it."""
    try:
        return read_idx(path), path
    except OSError as e:
        fail(f"cannot read {path} ({e.strerror or e}); {_REPLACE}")
    except ValueError as e:
        fail(f"{path} is damaged: {e}; {_REPLACE}")


def _download_mnist(data_dir, raw_dir):
    from torchvision.datasets import MNIST
    wanted = ', '.join(n for pair in MNIST_FILES.values() for n in pair)
    print(f"MNIST not found in {raw_dir}/; trying to download it ...", flush=True)
    try:
        MNIST(data_dir, train=True, download=True)
        MNIST(data_dir, train=False, download=True)
    except Exception as e:  # any failure of the download means the same thing to the user
        fail(f"MNIST is missing from {raw_dir}/ and could not be downloaded ({type(e).__name__}); "
             f"put the four IDX files there (gzipped or not): {wanted}")


def load_training_set(data_dir, img_size, train_limit, batch_size, device):
    """The MNIST training set once, as uint8 images (N, 1, img_size, img_size) and labels on device."""
    images, labels = load_mnist(data_dir, train=True)
    if train_limit:
        images, labels = images[:train_limit], labels[:train_limit]
    require_a_batch(len(images), batch_size)
    return resize_images(images, img_size).to(device), labels.to(device)


def require_a_batch(n_images, batch_size):
    """Training uses full batches only, so it needs at least one."""
    if n_images < batch_size:
        fail(f"{n_images} training images is less than one batch of {batch_size}; "
             f"raise --train_limit or lower --batch_size")


def resize_images(images, size):
    """uint8 (N, H, W) or (N, C, H, W) images to uint8 (N, C, size, size), antialiased, in chunks."""
    from torchvision.transforms.functional import resize
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    chunks = [resize(chunk.float(), [size, size], antialias=True).round_().clamp_(0, 255).to(torch.uint8)
              for chunk in images.split(4096)]
    return torch.cat(chunks)


def to_unit_range(images_uint8):
    """uint8 pixels to floats in [-1, 1], the range the generators' tanh produces."""
    return images_uint8.float().div_(127.5).sub_(1)


def real_batch(images_uint8, index, device, memory_format=torch.contiguous_format):
    """images_uint8[index] on device as floats in [-1, 1], in the models' memory format. A batch sliced on
    the host goes to a GPU through pinned memory without waiting, so the copy overlaps the GPU's work."""
    batch = images_uint8[index]
    if batch.device.type == 'cpu' and device.type == 'cuda':
        batch = batch.pin_memory().to(device, non_blocking=True)
    return to_unit_range(batch.to(device)).contiguous(memory_format=memory_format)


# ---------------------------------------------------------------- training plumbing

def shuffled_batches(n, batch_size, device, seed, epoch):
    """This process's share of every full batch (BatchNorm needs > 1) of epoch's permutation of range(n).

    The permutation is drawn from (seed, epoch) alone, so every process of a torchrun agrees on it, a
    resumed run draws the one it would have, and each epoch gets a fresh one.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch)))).to(device)
    batches = order[:n // batch_size * batch_size].view(-1, batch_size)
    return batches.tensor_split(world_size(), dim=1)[rank()]


@torch.no_grad()
def sample(G, *inputs, chunk=500):
    """G's images for the inputs (z, and labels for conditional models) in eval mode, chunk by chunk."""
    G.eval()
    images = torch.cat([G(*part) for part in zip(*(x.split(chunk) for x in inputs))])
    G.train()
    return images


def set_learning_rate(optimizers, lr):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['lr'] = lr


def progress(iterable, description):
    """A tqdm bar when a person watches stdout; silent in logs and CI."""
    from tqdm import tqdm
    return tqdm(iterable, desc=description, leave=False, disable=not sys.stdout.isatty())


def synchronize(device):
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def square_side(n):
    """Columns of the squarest grid that holds n images."""
    return math.ceil(math.sqrt(n))


def save_grid(images, path, nrow, label=None):
    """Save images in [-1, 1] as one grid PNG, with an optional caption strip below it."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid, save_image
    if not writes_files():
        return
    make_folder(os.path.dirname(path))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    if label is None:
        atomic_write(path, lambda temp: save_image(grid, temp))
        return
    from torchvision.transforms.functional import to_pil_image
    picture = to_pil_image(grid)
    captioned = Image.new('RGB', (picture.width, picture.height + 16), 'white')
    captioned.paste(picture, (0, 0))
    ImageDraw.Draw(captioned).text((4, picture.height + 2), label, fill='black')
    atomic_write(path, captioned.save)


def save_animation(frame_paths, gif_path, seconds_per_frame=0.5):
    import imageio.v2 as imageio
    if not writes_files():
        return
    frames = [imageio.imread(p) for p in frame_paths]
    gif = io.BytesIO()  # encoded in memory: imageio reports a failed file write again, as a traceback, later
    imageio.mimwrite(gif, frames, format='GIF', duration=seconds_per_frame, loop=0)
    save_bytes(gif.getbuffer(), gif_path)


def plot_curves(history, panels, path):
    """Per-epoch curves side by side: panels is [(y label, [history keys], y scale), ...]."""
    import matplotlib
    if not writes_files():
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (ylabel, keys, yscale) in zip(axes[0], panels):
        for key in keys:
            ax.plot(epochs, [h[key] for h in history], marker='.', label=key)
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.set_yscale(yscale)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)


# ---------------------------------------------------------------- writing and reading files

def atomic_write(path, write):
    """Call write(temp_path), then move the result into place: a reader never sees half a file.

    Where writing fails (a full disk, no permission, a file where a folder should be), the file at path
    stays as it was, the temporary file is removed, and one line names the path, the cause and what to do.
    Under torchrun only rank 0 writes.
    """
    if not writes_files():
        return
    root, extension = os.path.splitext(path)
    temp = f"{root}.tmp{os.getpid()}{extension}"  # the extension kept: image writers pick the format by it
    try:
        write(temp)
        with open(temp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        output_failed(path, e)
    finally:
        if os.path.lexists(temp):
            os.remove(temp)


def save_json(obj, path):
    def write(temp):
        with open(temp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def save_bytes(data, path):
    """Write data atomically, through Python's file write, which reports a full disk as the OSError it is."""
    def write(temp):
        with open(temp, 'wb') as f:
            f.write(data)
    atomic_write(path, write)


def save_torch(obj, path):
    """torch.save, atomically. Serialised in memory first: torch's own file writer turns a full disk into
    a RuntimeError that has lost the cause."""
    data = io.BytesIO()
    torch.save(obj, data)
    save_bytes(data.getbuffer(), path)


def make_folder(path):
    """os.makedirs, or one line saying why the folder cannot be made (a file of that name, no permission)."""
    try:
        os.makedirs(path or '.', exist_ok=True)
    except OSError as e:
        output_failed(path, e, 'make the folder')


_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, 'EDQUOT', errno.ENOSPC)}


def output_failed(path, error, action='write'):
    """Stop with one line naming the output that could not be written, the cause and what to do."""
    code = error.errno
    if code in _FULL:
        remedy = "free some space (or lift the limit on file sizes), then run the same command again"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        remedy = "make its folder writable or choose another, then run the same command again"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        remedy = "a file stands where a folder should be; move it away or choose another folder"
    elif code == errno.EISDIR:
        remedy = "a folder stands where the file should be; move it away or choose another folder"
    else:
        remedy = "fix that, then run the same command again"
    fail(f"cannot {action} {path} ({error.strerror or error}); {remedy}")


def load_torch(path, remedy):
    """What torch.save wrote to path, read as weights only, so no code in the file runs. A file that cannot
    be read that way is damaged (or no file of weights) and stops the script with one line ending in
    remedy: torch's advice to retry with weights_only=False would run whatever code the file holds."""
    try:
        f = open(path, 'rb')
    except OSError as e:  # no permission, say: the file itself may be fine
        fail(f"cannot read {path} ({e.strerror or e}); {remedy}")
    with f, warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch warns of a pickle protocol before refusing the file anyway
        try:
            return torch.load(f, map_location='cpu', weights_only=True)
        except Exception:  # whatever a truncated or garbled file makes the reader raise, it means the same
            fail(f"{path} is damaged: it cannot be read as a file of weights; {remedy}")


def is_state_dict(state):
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def generator_weights(results_dir, model_name, generate_from):
    """The generator file --generate samples from: the best by fid, or the last epoch's."""
    if generate_from not in ('best', 'last'):
        fail(f"--generate_from={generate_from}: choose best or last", 2)
    best = os.path.join(results_dir, f"{model_name}_generator_best.pt")
    if generate_from == 'best' and os.path.exists(best):
        return best
    last = os.path.join(results_dir, f"{model_name}_generator.pt")
    if generate_from == 'best' and os.path.exists(last):
        print(f"no {best} (quality was not measured); sampling from the last generator")
    return last


def load_weights(model, path):
    """Load a state_dict saved by a training run, or stop with one line saying how to get it.

    A training run replaces its weight files atomically, so this reads complete files while it trains.
    """
    if not os.path.exists(path):
        fail(f"no trained generator at {path}; train first (run the script without --generate)")
    retrain = "delete it and train again (run the script without --generate)"
    state = load_torch(path, retrain)
    if not is_state_dict(state):
        fail(f"{path} is damaged: it holds no state_dict of weights; {retrain}")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        fail(f"{path} was trained with other model constants (z_dim, d, img_size, ...) or by another script; "
             f"pass the constants it was trained with (its *_train_hist.json lists them) or another --results_dir")
    return model


def ema_model(model, decay):
    """An exponential moving average of model's weights and BatchNorm statistics, for sampling.

    decay 0 makes it a plain copy of the latest weights, the original recipe. Made before model is
    compiled, so the copy is a plain module.
    """
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def ema(ema_params, current_params, steps):
        # A short memory at first, (1 + n) / (10 + n), so early grids do not show the random start.
        n = int(steps)
        keep = min(decay, (1 + n) / (10 + n))
        for average, current in zip(ema_params, current_params):
            if average.is_floating_point():
                average.lerp_(current, 1 - keep)
            else:  # BatchNorm's step counter
                average.copy_(current)
    return AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


class EpochMeans:
    """Named scalars of every step (losses, D's outputs), summed where they live and read once an epoch,
    so the steps never wait for the device."""

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, **values):
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def read(self):
        """{name: mean over the epoch's steps of every process} as Python floats, in one transfer."""
        sums = torch.stack(list(self.sums.values()))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return dict(zip(self.sums, sums.div(self.steps * world_size()).tolist()))


def bce_floor(label_smoothing):
    """The least BCE loss of a discriminator's real half: the entropy of its target 1 - label_smoothing."""
    target = 1 - label_smoothing
    return -sum(p * math.log(p) for p in (target, 1 - target) if p > 0)


class CollapseCheck:
    """Says plainly when a run falls apart: fid far above its best, or the discriminator winning outright.

    D 'wins outright' when its mean loss over an epoch is within WON_MARGIN of its floor: it then gives
    G no gradient. Only a fall counts: D often wins the first epochs outright and G still learns
    (the non-saturating loss), so an epoch counts only after an earlier, contested one.
    """
    WON_MARGIN = 0.05

    def __init__(self, label_smoothing, stop_on_collapse, fid_factor=None):
        self.floor = bce_floor(label_smoothing)  # of loss_d = real half + fake half; the fake half can reach 0
        self.stop = stop_on_collapse
        self.factor = fid_factor

    def won_outright(self, loss_d):
        return loss_d - self.floor < self.WON_MARGIN

    def stops(self, run):
        """Check run's last epoch; print a COLLAPSE line if it fell apart. True when training should stop."""
        *earlier, last = run.history
        best = run.best()
        signs = []
        if self.factor and 'fid' in last and last['fid'] > self.factor * best['fid']:
            signs.append(f"fid {last['fid']:.1f} is over {self.factor:g} times the best, "
                         f"{best['fid']:.1f} at epoch {best['epoch']}")
        contested_before = not all(self.won_outright(h['loss_d']) for h in earlier)
        if contested_before and self.won_outright(last['loss_d']):
            signs.append(f"the discriminator's loss averaged {last['loss_d']:.3f} over the epoch, "
                         f"{last['loss_d'] - self.floor:.3f} above its floor")
        if signs:
            going = "stopping (stop_on_collapse)" if self.stop else "going on"
            kept = f" The best generator stays in {run.best_generator_path()}" if best else ""
            print(f"COLLAPSE at epoch {last['epoch']}: {'; '.join(signs)}; {going}.{kept}", flush=True)
        return from_rank0(bool(signs) and self.stop)  # rank 0's scores decide, so every process stops


def gather(obj):
    """[obj of each process] of a torchrun, in rank order; [obj] for a single process."""
    if not torch.distributed.is_initialized():
        return [obj]
    objects = [None] * world_size()
    torch.distributed.all_gather_object(objects, obj)
    return objects


def constants(namespace):
    """A script's constants and their values now: what a run records and a checkpoint must match."""
    return {name: namespace[name] for name in constant_names(namespace)}


LOCK_FILE = 'run.lock'


def lock_folder(folder):
    """Claim folder for this process alone: an exclusive lock on folder/run.lock, which the OS releases
    when the process ends, however it ends, so a killed run leaves no stale lock. Returns the open lock
    file, to be kept open while the run writes; a second process stops here with one line naming the
    process that holds the lock. Where the file system cannot lock (no fcntl, as on Windows; an NFS
    mount without a lock service) one line warns that nothing keeps a second run out, and the run goes on.
    """
    path = os.path.join(folder, LOCK_FILE)
    try:
        lock = open(path, 'a+')  # not truncated on opening: the holder's line stays readable
    except OSError as e:
        output_failed(path, e)
    try:
        import fcntl
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held: EWOULDBLOCK
        lock.seek(0)
        holder = lock.read().strip() or 'another process that is just starting'
        fail(f"{folder}/ is in use by another run ({holder}); wait for it to end, or pass another --results_dir")
    except (ImportError, OSError) as e:  # no fcntl, or ENOLCK / EOPNOTSUPP from the file system
        cause = getattr(e, 'strerror', None) or 'this system has no fcntl'
        print(f"warning: cannot lock {path} ({cause}); nothing stops a second run from writing to "
              f"{folder}/ at the same time, so start only one there", file=sys.stderr, flush=True)
        return lock
    import socket
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M}: "
               f"{' '.join(sys.argv)}\n")
    lock.flush()
    return lock


class Run:
    """The files of one training run in results_dir and what survives an interruption.

    The run holds results_dir alone from start to finish (lock_folder). After every epoch: the grids,
    the weights, the JSON history and last a checkpoint with everything needed to continue (models,
    optimizers, GradScaler, history, fixed inputs, RNG states, constants, and which script and model
    made it), each replaced atomically so a kill at any moment leaves the last complete epoch; only
    then the epoch's line is printed, so a printed epoch is a saved one.
    """
    RUN_CONTROL = {'train_epoch', 'resume', 'generate', 'device', 'results_dir', 'data_dir', 'train_limit',
                   'precision', 'channels_last', 'compile'}

    def __init__(self, model_name, config, models, optimizers, exports, scaler=None, best_by=None):
        """config: the script's constants; models, optimizers and the scaler go into the checkpoint;
        exports are saved as <Model>_<name>.pt; best_by: the history key (lower is better) whose best
        epoch's generator is kept as <Model>_generator_best.pt."""
        self.name = model_name
        self.script = os.path.basename(sys.argv[0])
        self.config = config
        self.dir = config['results_dir']
        self.models = models
        self.optimizers = optimizers
        self.scaler = scaler
        self.exports = exports
        self.best_by = best_by
        self.history = []
        self.fixed = {}
        self.saved_epoch = 0  # the epoch checkpoint.pt holds: what an interruption keeps
        self.checkpoint_path = os.path.join(self.dir, 'checkpoint.pt')
        self.lock = None
        if writes_files():
            make_folder(self.dir)
            self.lock = lock_folder(self.dir)  # open until the process ends, and the lock with it

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def start(self, make_fixed_inputs):
        """The first epoch to train: 1, or the one after the checkpoint's when resuming.

        The fixed inputs are drawn even when resuming: their shapes are what the checkpoint's must have
        (quality_samples sets one), and the random state restored afterwards makes the draw harmless.
        Called once the models are made, from the same seed in every process, so all start alike; from
        here each process of a torchrun draws its own noise (rank 0 the stream a single process draws).
        """
        if rank():
            torch.manual_seed(hash((self.config['seed'], rank())))
        self.fixed = make_fixed_inputs()
        if self.config['resume'] and os.path.exists(self.checkpoint_path):
            return self._restore()
        return 1

    def _restore(self):
        afresh = "delete it or pass --resume=false to start afresh, or pass another --results_dir"
        state = load_torch(self.checkpoint_path, afresh)
        keys = {'epoch', 'config', 'history', 'fixed', 'models', 'optimizers', 'rng'}
        if not isinstance(state, dict) or not keys <= state.keys() or not is_state_dict(state['fixed']):
            fail(f"{self.checkpoint_path} is damaged: it is not a checkpoint of these scripts; {afresh}")
        made_by = state.get('model', self.name)  # checkpoints from before the model was recorded: try them
        if made_by != self.name:
            script = state.get('script', 'another script')
            fail(f"{self.checkpoint_path} is a checkpoint of {made_by} (made by {script}), not of {self.name}; "
                 f"pass another --results_dir")
        changed = [f"{k}={state['config'].get(k)!r} (now {v!r})" for k, v in self.config.items()
                   if k not in self.RUN_CONTROL and state['config'].get(k) != v]
        misfit = (f"{self.checkpoint_path} was made with other constants: {', '.join(changed)}; pass those, use "
                  f"another --results_dir, or --resume=false to start afresh" if changed else
                  f"{self.checkpoint_path} does not fit the models of this {self.script} (an older version made it?); "
                  f"{afresh}")
        shapes = {name: tuple(tensor.shape) for name, tensor in self.fixed.items()}
        if {name: tuple(tensor.shape) for name, tensor in state['fixed'].items()} != shapes:
            fail(misfit)
        try:
            for name, model in self.models.items():
                model.load_state_dict(state['models'][name])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state['optimizers'][name])
        except (RuntimeError, ValueError, KeyError):
            fail(misfit)
        if self.scaler is not None and state.get('scaler'):  # empty where the run was not fp16
            self.scaler.load_state_dict(state['scaler'])
        self.history = state['history']
        self.fixed = state['fixed']
        self.saved_epoch = epoch = state['epoch']
        streams = state['rng']  # one per process of the run that saved it
        if len(streams) == world_size():
            torch.set_rng_state(streams[rank()]['cpu'])
            if torch.cuda.is_available() and streams[rank()]['cuda'] is not None:
                torch.cuda.set_rng_state(streams[rank()]['cuda'])
        else:
            torch.manual_seed(hash((self.config['seed'], rank(), epoch)))
            print(f"{self.checkpoint_path} was saved by {len(streams)} process(es) and this run has {world_size()}: "
                  f"it resumes with new random streams, so its noise differs from an uninterrupted run's")
        if epoch >= self.config['train_epoch']:
            print(f"{self.dir}: already trained {epoch} epochs; rebuilding the final outputs "
                  f"(raise --train_epoch to train on)")
        else:
            print(f"{self.dir}: resuming after epoch {epoch}")
        return epoch + 1

    def end_epoch(self, epoch, scores, seconds, n_images, grids):
        """Record a finished epoch: check it, save grids, weights, history and last the checkpoint, then
        print its line.

        scores: the epoch's named means and quality scores, e.g. {'loss_d': ..., 'fid': ...};
        grids: {path: (images, columns)}, captioned "Epoch N"; n_images: this process's, of all processes'.
        Under torchrun rank 0 writes while the others wait.
        """
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            kept = (f"the checkpoint of epoch {self.saved_epoch} is kept in {self.dir}" if self.saved_epoch else
                    "no epoch was saved")
            fail(f"epoch {epoch}: {', '.join(bad)} became {scores[bad[0]]}; training diverged and {kept}; "
                 f"try a lower --lr")
        stats = {'epoch': epoch, **scores, 'seconds': seconds, 'images_per_second': n_images * world_size() / seconds}
        self.history.append(stats)
        for path, (images, columns) in grids.items():
            save_grid(images, path, columns, label=f"Epoch {epoch}")
        for name, model in self.exports.items():
            save_torch(model.state_dict(), self.path(f"{self.name}_{name}.pt"))
        self._keep_if_best(epoch)
        self.save_history()
        state = {'epoch': epoch, 'model': self.name, 'script': self.script, 'config': self.config,
                 'history': self.history, 'fixed': self.fixed,
                 'models': {n: m.state_dict() for n, m in self.models.items()},
                 'optimizers': {n: o.state_dict() for n, o in self.optimizers.items()},
                 'scaler': self.scaler.state_dict() if self.scaler is not None else {},
                 'rng': gather({'cpu': torch.get_rng_state(),
                                'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None})}
        save_torch(state, self.checkpoint_path)
        self.saved_epoch = epoch
        named = ''.join(f", {name}: {value:.3f}" for name, value in scores.items())
        print(f"[{epoch}/{self.config['train_epoch']}] - ptime: {seconds:.2f}{named}, "
              f"{stats['images_per_second']:.0f} img/s", flush=True)
        barrier()

    def best(self):
        """The history entry of the lowest best_by score, or None where none is measured."""
        if self.best_by is None:
            return None
        return min((h for h in self.history if self.best_by in h), key=lambda h: h[self.best_by], default=None)

    def best_generator_path(self):
        return self.path(f"{self.name}_generator_best.pt")

    def _keep_if_best(self, epoch):
        best = self.best()
        if best is not None and best['epoch'] == epoch:
            save_torch(self.exports['generator'].state_dict(), self.best_generator_path())

    def save_history(self):
        seconds = sum(h['seconds'] for h in self.history)
        save_json({'model': self.name, 'config': self.config, 'total_seconds': seconds, 'epochs': self.history},
                  self.path(f"{self.name}_train_hist.json"))

    def fixed_grid_path(self, epoch):
        return self.path('Fixed_results', f"{self.name}_{epoch}.png")

    def random_grid_path(self, epoch):
        return self.path('Random_results', f"{self.name}_{epoch}.png")

    def finish(self):
        """Loss plot, animation and the closing timing line, from the whole history; then the folder is free."""
        if self.history:
            self._final_outputs()
        if self.lock is not None:
            self.lock.close()  # and with the file, the lock: a run in this same process may take the folder

    def _final_outputs(self):
        plot_curves(self.history, [('loss', ['loss_d', 'loss_g'], 'linear')], self.path(f"{self.name}_train_hist.png"))
        frames = [self.fixed_grid_path(h['epoch']) for h in self.history]
        save_animation([p for p in frames if os.path.exists(p)], self.path(f"{self.name}_generation_animation.gif"))
        seconds = [h['seconds'] for h in self.history]
        print(f"Avg one epoch ptime: {sum(seconds) / len(seconds):.2f}, "
              f"total {len(seconds)} epochs ptime: {sum(seconds):.2f}")
        print(f"outputs in {self.dir}/")
        best = self.best()
        if best is not None:
            print(f"best generator: epoch {best['epoch']}, {self.best_by} {best[self.best_by]:.2f}, "
                  f"in {self.best_generator_path()}")

    def interrupted(self, cause):
        """Stop on one of INTERRUPTIONS with one line: what stopped the run and what checkpoint.pt really holds."""
        if not self.saved_epoch:
            saved = "no epoch was saved yet; run the same command again to start"
        else:
            saved = f"{self.checkpoint_path} holds epoch {self.saved_epoch}. Run the same command again to resume"
        if isinstance(cause, KeyboardInterrupt):
            fail(f"interrupted before the first epoch was saved; run the same command again to start"
                 if not self.saved_epoch else f"interrupted; {saved}", 130)
        if isinstance(cause, Stopped):
            fail(f"stopped by SIGTERM; {saved}", 143, every_rank=True)
        if world_size() == 1:  # a RuntimeError of one process is a bug to see in full
            raise cause
        fail(f"stopped: {type(cause).__name__}: {str(cause).splitlines()[0]} (if another process of this run "
             f"failed, its own output says why); {saved}", 1, every_rank=True)


# ---------------------------------------------------------------- CelebA images

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def scan_image_folder(folder):
    """(class names, image paths, int64 labels, fingerprint) of a folder with one subfolder per class.

    Classes and images come in sorted order, as torchvision's ImageFolder reads them. The fingerprint
    (count, newest mtime, a hash of the names) changes when an image is added, removed or rewritten.
    """
    import hashlib
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()) if os.path.isdir(folder) else []
    paths, labels, newest, names = [], [], 0, hashlib.sha256()
    for label, name in enumerate(classes):
        entries = [e for e in os.scandir(os.path.join(folder, name)) if e.name.lower().endswith(IMAGE_SUFFIXES)]
        for entry in sorted(entries, key=lambda e: e.name):
            paths.append(entry.path)
            labels.append(label)
            newest = max(newest, entry.stat().st_mtime_ns)
            names.update(f"{name}/{entry.name}\n".encode())
    return classes, paths, torch.tensor(labels, dtype=torch.long), f"{len(paths)} {newest} {names.hexdigest()}"


def image_folder_tensor(folder, size, command):
    """The images of a class-per-subfolder folder as uint8 (N, 3, size, size), int64 labels and class names.

    They are decoded once into <folder>.u8 beside the folder and memory-mapped from it afterwards, so no
    epoch decodes a JPEG; <folder>.u8.json holds the shape and the folder's fingerprint, and a changed
    folder is decoded again. command is what makes the folder, for the one-line errors.
    """
    try:
        classes, paths, labels, fingerprint = scan_image_folder(folder)
    except OSError as e:  # an unreadable class folder, a broken link
        fail(f"cannot read {e.filename or folder} ({e.strerror or e}); fix it or make {folder}/ again with: {command}")
    if not paths:
        fail(f"{folder}/ is missing or has no class folders of images; make it with: {command}")
    data_path = os.path.normpath(folder) + '.u8'
    index = {'fingerprint': fingerprint, 'shape': [len(paths), 3, size, size]}
    if not cache_is_current(index, data_path) and writes_files():
        decode_into(data_path, paths, index['shape'], folder, command)
        save_json(index, data_path + '.json')  # last: a cache without its index is never trusted
    while not cache_is_current(index, data_path):  # under torchrun: rank 0 decodes, for minutes on all of CelebA
        time.sleep(1)
    try:
        images = torch.from_file(data_path, shared=False, size=math.prod(index['shape']), dtype=torch.uint8)
    except RuntimeError as e:  # torch's reason, e.g. no permission to read it
        fail(f"cannot read the cache {data_path} ({str(e).splitlines()[0]}); delete it, and it is decoded again")
    return images.view(index['shape']), labels, classes


def cache_is_current(index, data_path):
    """Whether data_path holds the images its index describes, of the folder as it is now. A damaged index
    or a cache of the wrong size (cut short by a full disk, say) is not: it is decoded again."""
    try:
        with open(data_path + '.json') as f:
            return json.load(f) == index and os.path.getsize(data_path) == math.prod(index['shape'])
    except (OSError, ValueError):  # no cache yet, or a damaged index: decode again
        return False


def decode_into(data_path, paths, shape, folder, command):
    """Decode the images into the raw uint8 file data_path, atomically, with a progress bar."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    print(f"decoding the {len(paths)} images of {folder}/ once into {data_path}; later runs reuse it", flush=True)

    def write(temp):
        with open(temp, 'wb') as f:  # made here, not by from_file, for the usual permissions (umask, not 0600)
            f.truncate(math.prod(shape))
        images = torch.from_file(temp, shared=True, size=math.prod(shape), dtype=torch.uint8).view(shape)
        for i, path in enumerate(progress(paths, 'decoding')):
            try:
                with Image.open(path) as im:
                    if im.size != (shape[3], shape[2]):
                        fail(f"{path} is {im.width}x{im.height}, not {shape[3]}x{shape[2]}; "
                             f"delete {folder}/ and make it again with: {command}")
                    images[i] = pil_to_tensor(im.convert('RGB'))
            except Exception:  # whatever a damaged file makes the decoder raise (OSError mostly), it means the same
                fail(f"cannot decode {path}: it is damaged; delete it and make it again with: {command}")
    atomic_write(data_path, write)


def evenly_spaced(n, count):
    """count indices spread evenly over range(n): a sample of a class-sorted set that keeps its class mix."""
    return torch.linspace(0, n - 1, count).round().long()


def celeba_folder(isCrop):
    """Where celeba_preprocess.py writes female/ and male/ by default, and the training scripts read them."""
    return 'data/resized_celebA_crop' if isCrop else 'data/resized_celebA'


def celeba_preprocess_command(data_dir, isCrop):
    """The command that writes the faces the training scripts read from data_dir."""
    import shlex
    args = ['--isCrop=True'] if isCrop else []
    if os.path.normpath(data_dir) != os.path.normpath(celeba_folder(isCrop)):
        args.append(f"--output_dir={data_dir}")
    return shlex.join(['python', 'celeba_preprocess.py', *args])


def load_celeba(data_dir, isCrop, img_size, train_limit, batch_size, device):
    """The faces celeba_preprocess.py wrote: uint8 images (N, 3, img_size, img_size) and labels, female 0, male 1.

    On a CUDA device when they take under half its free memory, so batches are sliced there; else the
    memory-mapped cache, whose batches are sliced on the host and copied over.
    """
    command = celeba_preprocess_command(data_dir, isCrop)
    images, labels, classes = image_folder_tensor(data_dir, img_size, command)
    if classes != ['female', 'male'] or 0 in labels.bincount(minlength=2):
        fail(f"{data_dir}/ should hold faces in female/ and male/ and no other folder; make it with: {command}")
    if train_limit:
        keep = evenly_spaced(len(images), min(train_limit, len(images)))
        images, labels = images[keep], labels[keep]
    require_a_batch(len(images), batch_size)
    if device.type == 'cuda' and images.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
        images, labels = images.to(device), labels.to(device)
    return images, labels
