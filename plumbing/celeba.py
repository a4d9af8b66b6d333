"""CelebA: the female/ and male/ faces celeba_preprocess.py writes, decoded once into a memory-mapped cache."""
import json
import math
import os
import time

import torch

from plumbing.data import evenly_spaced, require_a_batch
from plumbing.files import atomic_write, save_json
from plumbing.machine import fail, progress, writes_files


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
