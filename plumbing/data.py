"""MNIST from its IDX files, and the batches every script draws: shuffled, full, on the models' device."""
import contextlib
import gzip
import math
import os
import struct
import zlib

import torch

from plumbing.console import fail
from plumbing.distributed import barrier, rank, world_size, writes_files


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
    if not math.prod(shape):  # a header that announces no data: torch.frombuffer refuses an empty buffer
        return torch.zeros(shape, dtype=torch.uint8)
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
    if images.shape[0] < 2:  # one image has no spread: no fid, and no BatchNorm, can use it
        fail(f"{image_path} holds {images.shape[0]} image(s), too few to train or measure with; {_REPLACE}")
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
    made = [folder for folder in (raw_dir, os.path.dirname(raw_dir), data_dir) if not os.path.isdir(folder)]
    try:
        MNIST(data_dir, train=True, download=True)
        MNIST(data_dir, train=False, download=True)
    except Exception as e:  # any failure of the download means the same thing to the user
        for folder in made:  # the empty folders the downloader made, innermost first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        fail(f"MNIST is missing from {raw_dir}/ and could not be downloaded ({type(e).__name__}); "
             f"put the four IDX files there (gzipped or not): {wanted}")


def mnist_training_set(data_dir, img_size, train_limit, batch_size, device):
    """The MNIST training set once, as uint8 images (N, 1, img_size, img_size) and labels on device."""
    images, labels = load_mnist(data_dir, train=True)
    if train_limit:
        images, labels = images[:train_limit], labels[:train_limit]
    require_a_batch(len(images), batch_size, os.path.join(data_dir, 'MNIST', 'raw'))
    return resize_images(images, img_size).to(device), labels.to(device)


def require_a_batch(n_images, batch_size, where):
    """Training uses full batches only, so it needs at least one of the n_images it takes from where (the
    command line already refused a --train_limit under one batch)."""
    if n_images < batch_size:
        fail(f"{where}/ holds {n_images} training image(s), less than one batch of {batch_size}; "
             + (f"pass --batch_size={n_images} or lower" if n_images >= 2 else "add images"))


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

def shuffled_batches(n, batch_size, device, seed, epoch):
    """This process's share of every full batch (BatchNorm needs > 1) of epoch's permutation of range(n).

    The permutation is drawn from (seed, epoch) alone, so every process of a torchrun agrees on it, a
    resumed run draws the one it would have, and each epoch gets a fresh one.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch)))).to(device)
    batches = order[:n // batch_size * batch_size].view(-1, batch_size)
    return batches.tensor_split(world_size(), dim=1)[rank()]


def evenly_spaced(n, count):
    """count indices spread evenly over range(n): a sample of a class-sorted set that keeps its class mix."""
    return torch.linspace(0, n - 1, count).round().long()

