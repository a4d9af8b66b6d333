"""CelebA: the female/ and male/ faces celeba_preprocess.py writes, decoded once into a memory-mapped cache."""
import errno
import json
import math
import os
import shlex
import time
import zlib

import torch

from plumbing.data import evenly_spaced, require_a_batch
from plumbing.console import fail, progress
from plumbing.distributed import barrier, writes_files
from plumbing.safe_files import atomic_write, remove_dead_temporaries, save_json


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
CLASSES = ['female', 'male']
# celeba_preprocess.py records the settings it made a folder with here, so that a rerun with other
# settings, or a training run on faces of another crop or size, is refused instead of mixing them.
SETTINGS_FILE = 'celeba_preprocess.json'
SETTINGS = ('isCrop', 'img_size')
# What CelebA as downloaded holds (celeba_preprocess.py reads it), never the faces the scripts train on.
DOWNLOADED = ('img_align_celeba', 'img_align_celeba.zip', 'list_attr_celeba.txt', 'list_attr_celeba.csv')


# ---------------------------------------------------------------- what celeba_preprocess.py recorded

def read_settings(folder):
    """The settings ({'isCrop': bool, 'img_size': int}) celeba_preprocess.py made folder with, or None
    where it recorded none: a folder it did not make, or one made before it recorded them."""
    path = os.path.join(folder, SETTINGS_FILE)
    try:
        with open(path) as f:
            settings = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        settings = getattr(e, 'strerror', None) or 'not JSON'
    if not (isinstance(settings, dict) and sorted(settings) == sorted(SETTINGS) and
            type(settings['isCrop']) is bool and type(settings['img_size']) is int):
        fail(f"cannot read {path} ({settings if isinstance(settings, str) else 'not the settings it should hold'}); "
             f"delete it (celeba_preprocess.py wrote it), and its next run into {folder}/ tells the settings "
             f"from the faces and writes it again")
    return settings


def flags(settings):
    """The command-line form of settings: --isCrop=False --img_size=64."""
    return ' '.join(f"--{name}={settings[name]}" for name in SETTINGS if name in settings)


# ---------------------------------------------------------------- the decoded cache of a folder of images

def scan_image_folder(folder):
    """(class names, image paths, int64 labels, fingerprint) of a folder with one subfolder per class.

    Classes and images come in sorted order, as torchvision's ImageFolder reads them. The fingerprint
    hashes each image's name, size, mtime, ctime and inode, so it changes when an image is added,
    removed or rewritten, even by a copy that keeps the old mtime (cp -p): that changes the ctime and
    the inode. It costs one stat per image, as the count and newest mtime did before (10,000 images:
    0.15 s against their 0.13 s, warm disk, 2 shared cores); the pixels are not read, so only an image
    rewritten in place with its size, mtime and ctime all as before (a clock set back) goes unnoticed.
    """
    import hashlib
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()) if os.path.isdir(folder) else []
    paths, labels, digest = [], [], hashlib.sha256()
    for label, name in enumerate(classes):
        entries = [e for e in os.scandir(os.path.join(folder, name)) if e.name.lower().endswith(IMAGE_SUFFIXES)]
        for entry in sorted(entries, key=lambda e: e.name):
            paths.append(entry.path)
            labels.append(label)
            info = entry.stat()
            digest.update(f"{name}/{entry.name} {info.st_size} {info.st_mtime_ns} {info.st_ctime_ns} "
                          f"{info.st_ino}\n".encode())
    return classes, paths, torch.tensor(labels, dtype=torch.long), f"{len(paths)} {digest.hexdigest()}"


def image_folder_tensor(folder, size, command, elsewhere=None):
    """The images of a class-per-subfolder folder as uint8 (N, 3, size, size), int64 labels and class names.

    They are decoded once into <folder>.u8 beside the folder and memory-mapped from it afterwards, so no
    epoch decodes a JPEG; <folder>.u8.json holds the shape and the folder's fingerprint, and a changed
    folder is decoded again. command is what makes the folder, for the one-line errors; elsewhere, what
    to do where the folder holds images of another size (by default: make it with command).
    """
    try:
        classes, paths, labels, fingerprint = scan_image_folder(folder)
    except OSError as e:  # an unreadable class folder, a broken link
        fail(f"cannot read {e.filename or folder} ({e.strerror or e}); fix it or make {folder}/ again with: {command}")
    if not paths:
        fail(f"{folder}/ is missing or has no class folders of images; make it with: {command}")
    data_path = cache_path(folder)
    index = {'fingerprint': fingerprint, 'shape': [len(paths), 3, size, size]}
    # Under torchrun rank 0 alone checks the cache, and removes the index of one it will decode again before
    # the others pass the barrier; they then wait for a current index (for minutes, on all of CelebA: longer
    # than a collective may wait), so no process maps a cache that is not sound.
    decode = writes_files() and not cache_is_sound(index, data_path)
    if decode and os.path.exists(data_path + '.json'):
        os.remove(data_path + '.json')
    barrier()
    if decode:
        cache_name = os.path.splitext(os.path.basename(data_path))[0]  # faces: faces.tmp123.u8, faces.u8.tmp123.json
        remove_dead_temporaries(os.path.dirname(data_path), prefix=cache_name + '.')
        made_here = read_settings(folder) is not None
        decode_into(data_path, paths, index['shape'], folder, command if made_here else None,
                    elsewhere or f"make it with: {command}")
        # last: a cache without its index is never trusted
        save_json({**index, 'crc32': file_crc32(data_path)}, data_path + '.json')
    while not cache_is_current(index, data_path):
        time.sleep(1)
    try:
        images = torch.from_file(data_path, shared=False, size=math.prod(index['shape']), dtype=torch.uint8)
    except RuntimeError as e:  # torch's reason, e.g. no permission to read it
        fail(f"cannot read the cache {data_path} ({str(e).splitlines()[0]}); delete it, and it is decoded again")
    return images.view(index['shape']), labels, classes


def cache_path(folder):
    """Where the decoded images of folder are kept: <folder>.u8 beside it, its index in <folder>.u8.json."""
    return os.path.normpath(folder) + '.u8'


def stored_index(data_path):
    """The cache's index as written, or None where there is none or it is damaged."""
    try:
        with open(data_path + '.json') as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def cache_is_current(index, data_path):
    """Whether data_path holds the images its index describes, of the folder as it is now. A damaged index
    or a cache of the wrong size (cut short by a full disk, say) is not: it is decoded again."""
    stored = stored_index(data_path)
    try:
        return stored is not None and {key: stored.get(key) for key in index} == index and \
            os.path.getsize(data_path) == math.prod(index['shape'])
    except OSError:  # no cache yet
        return False


def cache_is_sound(index, data_path):
    """cache_is_current, and its bytes still those its index's CRC-32 was taken of: a damaged cache (a
    zeroed stretch, say) is decoded again. Reading it costs about a second a GB; decoding, minutes."""
    if not cache_is_current(index, data_path):
        return False
    if file_crc32(data_path) == stored_index(data_path).get('crc32'):
        return True
    print(f"{data_path} does not match its checksum (damaged, or made by an older version): decoding it again",
          flush=True)
    return False


def file_crc32(path):
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def reserve(f, size):
    """Allocate the file's space before it is written through a memory map: a full disk then fails here,
    as the OSError ENOSPC that atomic_write turns into one line, and not as a SIGBUS (a 'Bus error')
    at the first page the map cannot back. Where the file system cannot allocate ahead the file stays
    sparse, as it does where the OS has no posix_fallocate (macOS, Windows)."""
    f.truncate(size)
    if hasattr(os, 'posix_fallocate'):
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, 'ENOTSUP', errno.EOPNOTSUPP)):
                raise


def decode_into(data_path, paths, shape, folder, command, elsewhere):
    """Decode the images into the raw uint8 file data_path, atomically, with a progress bar.

    command is given only where celeba_preprocess.py made the folder (it recorded its settings there), so
    only then does a damaged image's line say to delete it and make it again; elsewhere is what to do if
    the images are of another size."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    print(f"decoding the {len(paths)} images of {folder}/ once into {data_path}; later runs reuse it", flush=True)
    height, width = shape[2:]

    def write(temp):
        with open(temp, 'wb') as f:  # made here, not by from_file, for the usual permissions (umask, not 0600)
            reserve(f, math.prod(shape))
        images = torch.from_file(temp, shared=True, size=math.prod(shape), dtype=torch.uint8).view(shape)
        misfits = []  # (path, size) of the images of another size
        for i, path in enumerate(progress(paths, 'decoding')):
            pixels = None
            try:
                with Image.open(path) as im:
                    found = im.size
                    if found == (width, height):
                        pixels = pil_to_tensor(im.convert('RGB'))
            except Exception:  # whatever a damaged file makes the decoder raise (OSError mostly), it means the same
                remedy = (f"delete it and make it again with: {command} (with --celeba_dir=FOLDER where CelebA as "
                          f"downloaded is not in data/celebA/)" if command else
                          f"replace it with a good copy, or move it out of {folder}/")
                fail(f"cannot decode {path}: it is damaged; {remedy}")
            if pixels is None:
                misfits.append((path, found))
            else:
                images[i] = pixels
        if len(misfits) == len(paths):
            path, found = misfits[0]
            fail(f"{path} is {found[0]}x{found[1]}, not {width}x{height}: {folder}/ holds images of another "
                 f"size, not faces celeba_preprocess.py made at img_size {width}; {elsewhere}")
        if misfits:
            named = ', '.join(f"{path} ({found[0]}x{found[1]})" for path, found in misfits[:3])
            more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
            fail(f"{len(misfits)} of the {len(paths)} images in {folder}/ are not {width}x{height}: {named}{more}; "
                 f"move them out of {folder}/")
    atomic_write(data_path, write)


# ---------------------------------------------------------------- the faces the training scripts read

def celeba_folder(isCrop):
    """Where celeba_preprocess.py writes female/ and male/ by default, and the training scripts read them."""
    return 'data/resized_celebA_crop' if isCrop else 'data/resized_celebA'


def celeba_preprocess_command(data_dir, isCrop, celeba_dir=None):
    """The command that writes the faces the training scripts read from data_dir."""
    args = [f"--celeba_dir={celeba_dir}"] if celeba_dir else []
    args += ['--isCrop=True'] if isCrop else []
    if os.path.normpath(data_dir) != os.path.normpath(celeba_folder(isCrop)):
        args.append(f"--output_dir={data_dir}")
    return shlex.join(['python', 'celeba_preprocess.py', *args])


def make_elsewhere(data_dir, isCrop, img_size, celeba_dir=None):
    """How to make faces for this training run where data_dir cannot take them (it holds other images):
    in the default folder, or beside it where data_dir is the default folder."""
    default = celeba_folder(isCrop)
    if os.path.normpath(data_dir) != os.path.normpath(default):
        return f"make them with: {celeba_preprocess_command(default, isCrop, celeba_dir)} and train without --data_dir"
    other = f"{default}_{img_size}"
    return (f"make them in another folder with: {celeba_preprocess_command(other, isCrop, celeba_dir)} "
            f"and pass {shlex.quote(f'--data_dir={other}')}")


def check_made_for(data_dir, isCrop, img_size):
    """Stop with one line where data_dir is CelebA as downloaded, or faces made with other settings."""
    downloaded = [name for name in DOWNLOADED if os.path.exists(os.path.join(data_dir, name))]
    if downloaded:
        fail(f"{data_dir}/ is CelebA as downloaded (it holds {downloaded[0]}), not the faces the scripts train on; "
             + make_elsewhere(data_dir, isCrop, img_size, celeba_dir=data_dir).replace('make them', 'make those', 1))
    settings = read_settings(data_dir) if os.path.isdir(data_dir) else None
    wanted = {'isCrop': isCrop, 'img_size': img_size}
    if settings and settings != wanted:
        other_crop = settings['img_size'] == img_size  # then only the crop differs, and the run can follow it
        fail(f"{data_dir}/ holds faces made with {flags(settings)} (its {SETTINGS_FILE} says so), not {flags(wanted)}; "
             + (f"train on them with --isCrop={settings['isCrop']}, or " if other_crop else "")
             + make_elsewhere(data_dir, isCrop, img_size).replace('make them', f"make {flags(wanted)} faces", 1))


def load_celeba(data_dir, isCrop, img_size, train_limit, batch_size, device):
    """The faces celeba_preprocess.py wrote: uint8 images (N, 3, img_size, img_size) and labels, female 0, male 1.

    On a CUDA device when they take under half its free memory, so batches are sliced there; else the
    memory-mapped cache, whose batches are sliced on the host and copied over.
    """
    command = celeba_preprocess_command(data_dir, isCrop)
    check_made_for(data_dir, isCrop, img_size)
    images, labels, classes = image_folder_tensor(data_dir, img_size, command,
                                                  make_elsewhere(data_dir, isCrop, img_size))
    if classes != CLASSES or 0 in labels.bincount(minlength=2):
        fail(f"{data_dir}/ should hold faces in female/ and male/ and no other folder; make it with: {command}")
    if train_limit:
        keep = evenly_spaced(len(images), min(train_limit, len(images)))
        images, labels = images[keep], labels[keep]
    require_a_batch(len(images), batch_size, data_dir)
    if device.type == 'cuda' and images.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
        images, labels = images.to(device), labels.to(device)
    return images, labels
