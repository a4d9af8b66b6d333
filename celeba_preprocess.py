"""Resize CelebA's aligned faces into female/ and male/ folders of img_size x img_size JPEGs.

Reads img_align_celeba/ (or img_align_celeba.zip, left packed) and list_attr_celeba.txt from
celeba_dir; torchvision's celeba/ subfolder and Kaggle's layout (img_align_celeba/img_align_celeba/,
list_attr_celeba.csv) work too. A rerun skips the images already written, so an interrupted run is
finished by running the same command again.

The output folder records the settings it was made with (isCrop, img_size) in celeba_preprocess.json,
and a run with other settings is refused rather than mix them. A folder from an older version, which
recorded none, is judged by its faces: their size, and whether one of them matches its source made
again cropped or whole; the settings found are then recorded.
"""
import common  # noqa: F401  first: from here on a Ctrl-C is one line, even while the other modules load

import contextlib
import functools
import math
import os
import shlex
import signal
import time
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from io import BytesIO
from multiprocessing import Event

from PIL import Image, ImageChops, ImageStat, UnidentifiedImageError
from tqdm import tqdm

from plumbing.celeba import SETTINGS, SETTINGS_FILE, celeba_folder, flags, read_settings
from plumbing.config import configure
from plumbing.console import fail
from plumbing.interrupts import Stopped, raise_stopped
from plumbing.safe_files import make_folder, output_failed, save_json

celeba_dir = 'data/celebA'  # folder holding img_align_celeba/ (or img_align_celeba.zip) and list_attr_celeba.txt
isCrop = False             # keep only the centred 108x108 face instead of the whole centred 178x178 square
img_size = 64               # [1, 1024]: side of the square output images, in pixels
output_dir = ''             # where female/ and male/ go; '' = data/resized_celebA (data/resized_celebA_crop if isCrop)
workers = 0                 # [0, 256]: processes resizing in parallel; 0 = all cores

CELEBA_PAGE = 'http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html'
# Kaggle's doubly nested folder first: its outer img_align_celeba/ holds only the inner one.
IMAGE_PLACES = ('img_align_celeba/img_align_celeba', 'img_align_celeba', 'img_align_celeba.zip')
ATTRIBUTE_PLACES = ('list_attr_celeba.txt', 'list_attr_celeba.csv')
CLASSES = {-1: 'female', 1: 'male'}  # by the value in the Male column
CROP_SIDE = 108    # the face crop of the DCGAN-era CelebA experiments
JPEG_QUALITY = 95
TEMP_SUFFIX = '.tmp'  # each output is written as .NAME.tmp and then renamed, so a killed run leaves no half file
SHOWN = 5          # names listed per kind of problem in the summary


# ---------------------------------------------------------------- finding and reading CelebA

def locate(root):
    """(image folder or zip, attribute file) in root or torchvision's root/celeba/; fail if either is absent."""
    def first_existing(places):
        paths = [os.path.join(base, place) for base in (root, os.path.join(root, 'celeba')) for place in places]
        return next((path for path in paths if os.path.exists(path)), None)

    images, attributes = first_existing(IMAGE_PLACES), first_existing(ATTRIBUTE_PLACES)
    lacking = [what for what, found in (('img_align_celeba/ or img_align_celeba.zip', images),
                                        ('list_attr_celeba.txt', attributes)) if not found]
    if lacking:
        fail(f"{root}/ has no {' and no '.join(lacking)}: download \"Align&Cropped Images\" img_align_celeba.zip "
             f"and Anno/list_attr_celeba.txt from the CelebA page of MMLAB, CUHK ({CELEBA_PAGE}) and put both "
             f"in {root}/ (the zip may stay packed), or point --celeba_dir at them")
    return images, attributes


def read_table(path):
    """The attribute file as (column names, rows of [image name, values ...]); fail if its header is wrong."""
    try:
        with open(path, encoding='utf-8-sig', errors='replace') as f:  # -sig: a BOM an editor added is no name
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:  # a folder of that name, no permission
        fail(f"cannot read {path} ({e.strerror or e}); it should be CelebA's attribute file, readable")
    if path.endswith('.csv'):  # Kaggle: image_id,5_o_Clock_Shadow,...  then  000001.jpg,-1,1,...
        header = lines[0].split(',') if lines else []
        if header[:1] != ['image_id']:
            fail(f"{path}: line 1 should be image_id and the 40 attribute names, separated by commas")
        return header[1:], [line.split(',') for line in lines[1:]]
    # Official: the image count, the 40 names, then rows whose columns are separated by one or more spaces.
    if len(lines) < 2 or not lines[0].strip().isdigit() or lines[1].split()[0].endswith('.jpg'):
        fail(f"{path}: line 1 should be the image count and line 2 the 40 attribute names "
             f"(5_o_Clock_Shadow ... Young); download Anno/list_attr_celeba.txt again from {CELEBA_PAGE}")
    rows = [line.split() for line in lines[2:]]
    if int(lines[0]) != len(rows):  # a cut-off download
        fail(f"{path}: line 1 says {int(lines[0])} images but {len(rows)} are listed; download it again")
    return lines[1].split(), rows


def read_genders(path):
    """Map each listed image name to -1 (female) or 1 (male), from the Male column."""
    names, rows = read_table(path)
    if 'Male' not in names:
        fail(f"{path} has no Male column (its columns: {' '.join(names[:4])} ...); "
             f"it should be CelebA's list_attr_celeba.txt")
    column = names.index('Male') + 1
    genders = {}
    for row in rows:
        if len(row) != len(names) + 1 or row[column] not in ('1', '-1'):
            fail(f"{path}: cannot read the row {' '.join(row)[:50]!r}...: expected an image name "
                 f"and {len(names)} values of 1 or -1")
        genders[row[0]] = int(row[column])
    return genders


def list_images(images):
    """Map each .jpg name to its path in the folder, or its member name in the zip."""
    try:
        if images.endswith('.zip'):
            with zipfile.ZipFile(images) as z:
                found = {os.path.basename(n): n for n in z.namelist() if n.endswith('.jpg')}
        else:
            found = {n: os.path.join(images, n) for n in os.listdir(images) if n.endswith('.jpg')}
    except zipfile.BadZipFile as e:
        fail(f"cannot read {images} ({e}); download it again from {CELEBA_PAGE}")
    except OSError as e:  # a file where the folder should be, a folder where the zip should be, no permission
        what = "the zip of CelebA's faces" if images.endswith('.zip') else "CelebA's folder of faces"
        fail(f"cannot read {images} ({e.strerror or e}); it should be {what}, readable")
    if not found:
        fail(f"{images} holds no .jpg images; it should hold CelebA's 000001.jpg ... 202599.jpg")
    return found


# ---------------------------------------------------------------- resizing one image (in a worker)

@functools.lru_cache(maxsize=None)
def open_zip(path):
    """The zip, opened once per worker process: reading the index of 202,599 members is slow."""
    return zipfile.ZipFile(path)


def square_face(im, size, crop):
    """The centred square face (whole 178x178, or 108x108 if crop) of a CelebA image, as size x size RGB."""
    width, height = im.size
    side = CROP_SIDE if crop else min(width, height)
    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, as far as the square keeps >= size pixels: the main saving.
    drafted = im.draft('RGB', (math.ceil(width * size / side), math.ceil(height * size / side)))
    scale = drafted[1][2] / width if drafted else 1  # draft gives the whole image's box in decoded pixels
    left, top = (width - side) / 2 * scale, (height - side) / 2 * scale
    box = (left, top, left + side * scale, top + side * scale)
    return im.resize((size, size), Image.LANCZOS, box=box).convert('RGB')


def too_small(im, crop):
    """Whether the image cannot hold the crop box: then it is no CelebA aligned face, and is skipped."""
    return crop and (im.width < CROP_SIDE or im.height < CROP_SIDE)


stop_requested = None  # in a worker: the main process's Event, set when the rest is to be skipped


def convert(job, zip_path, size, crop):
    """Write one resized face atomically; return (name, None, None), or (name, 'corrupt', why) if the source
    is damaged, (name, 'small', 'WxH') if it is too small for the crop box, (name, 'unwritable', OSError) if
    the face could not be written, or (name, 'skipped', None) once the main process asked the workers to stop."""
    name, source, target = job
    if stop_requested.is_set():
        return name, 'skipped', None
    try:
        with Image.open(BytesIO(open_zip(zip_path).read(source)) if zip_path else source) as im:
            if too_small(im, crop):
                return name, 'small', f'{im.width}x{im.height}'
            face = square_face(im, size, crop)
    except UnidentifiedImageError:
        return name, 'corrupt', 'not an image'
    except Exception as e:  # whatever a damaged file makes the decoder raise, skip it and go on
        return name, 'corrupt', str(e) or type(e).__name__
    temp = os.path.join(os.path.dirname(target), '.' + name + TEMP_SUFFIX)
    jpeg = BytesIO()  # encoded in memory: PIL's JPEG encoder writing to a file ignores a full disk
    face.save(jpeg, 'JPEG', quality=JPEG_QUALITY)
    try:
        with open(temp, 'wb') as f:
            f.write(jpeg.getbuffer())
        os.replace(temp, target)
    except OSError as e:  # a full disk, no permission: the main process stops with one line naming the target
        return name, 'unwritable', OSError(e.errno, e.strerror, target)
    finally:  # and leaves no temp file
        if os.path.lexists(temp):
            os.remove(temp)
    return name, None, None


def start_worker(stop):
    """Leave Ctrl-C and SIGTERM to the main process, which stops the pool: no traceback from every worker (a
    SIGTERM sent to a worker itself ends it the default way, silently). Keep the main process's stop flag,
    which convert checks before each face."""
    global stop_requested
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop_requested = stop


def convert_all(jobs, zip_path, size, crop, processes):
    """Run convert over the jobs on all processes, with a progress bar; return its results. After a failed
    write, Ctrl-C or SIGTERM the workers skip what is left and the pool is shut down. A worker that dies (the
    out-of-memory killer, a kill -9) breaks the pool: that stops the preprocessing with one line, and a
    rerun converts what is left."""
    work = functools.partial(convert, zip_path=zip_path, size=size, crop=crop)
    chunk = max(1, min(64, len(jobs) // (4 * processes)))  # big enough to save IPC, small enough to share out
    stop = Event()
    results = []
    with ProcessPoolExecutor(processes, initializer=start_worker, initargs=(stop,)) as pool:
        try:
            for result in tqdm(pool.map(work, jobs, chunksize=chunk), total=len(jobs), unit='img', disable=None):
                results.append(result)
                if result[1] == 'unwritable':
                    stop.set()
        except BrokenProcessPool:
            fail(f"a worker process died (killed, or out of memory) after {len(results)} of {len(jobs)} faces; "
                 f"run the same command again: it converts those not written yet")
        finally:
            stop.set()
            pool.shutdown(cancel_futures=True)
    return results


# ---------------------------------------------------------------- the output folder

def written_names(out):
    """Names already written in each class folder; deletes the temp files a killed run left behind."""
    done = {}
    for cls in CLASSES.values():
        folder = os.path.join(out, cls)
        make_folder(folder)
        names = os.listdir(folder)
        for name in names:
            if name.endswith(TEMP_SUFFIX):
                os.remove(os.path.join(folder, name))
        done[cls] = {name for name in names if name.endswith('.jpg')}
    return done


def made_with(out, done, available, zip_path):
    """(the settings out/ was made with, whether it recorded them): None for a folder with no faces yet.

    A folder of an older version recorded none: its size is its first face's, and its crop is the one
    whose remake of a face from its source comes closer to that face (the crop and the whole square
    differ by far more than the JPEG's rounding). Where no face's source can be read, its crop cannot
    be told and this run's is taken.
    """
    recorded = read_settings(out)
    if recorded is not None:
        return recorded, True
    written = sorted((name, cls) for cls, names in done.items() for name in names)
    if not written:
        return None, False
    sizes = ((face_size(os.path.join(out, cls, name)), cls) for name, cls in written)
    first = next(((size, cls) for size, cls in sizes if size), None)
    if first is None:  # none of its images opens: nothing to tell its settings by
        return None, False
    (width, height), cls = first
    if width != height:  # no face this script wrote
        fail(f"{out}/{cls}/ holds {width}x{height} images, not the square faces celeba_preprocess.py writes; "
             f"give another --output_dir")
    found = {'isCrop': isCrop, 'img_size': width}
    with zipfile.ZipFile(zip_path) if zip_path else contextlib.nullcontext() as z:  # not open_zip: workers fork
        for name, cls in written[:SHOWN]:
            if name in available:
                crop = crop_of(os.path.join(out, cls, name), BytesIO(z.read(available[name])) if z
                               else available[name], width)
                if crop is not None:
                    found['isCrop'] = crop
                    break
    return found, False


def face_size(path):
    """The image's (width, height), or None if it cannot be read as an image."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # whatever a damaged file makes the decoder raise
        return None


def crop_of(face, source, size):
    """Whether the face was made from source cropped (True) or whole (False); None if source cannot be read."""
    try:
        with Image.open(face) as im:
            written = im.convert('RGB')
        distance = {}
        for crop in (False, True):
            with Image.open(source) as im:
                if too_small(im, crop):
                    return False
                distance[crop] = sum(ImageStat.Stat(ImageChops.difference(square_face(im, size, crop), written)).mean)
            if hasattr(source, 'seek'):
                source.seek(0)
    except Exception:  # whatever a damaged file makes the decoder raise: try another face
        return None
    return min(distance, key=distance.get)


def check_settings(out, done, available, zip_path):
    """Stop with one line if out/ holds faces made with other settings; else record this run's there,
    first, so that even a run stopped at once leaves the folder's settings told."""
    settings = {name: globals()[name] for name in SETTINGS}
    found, recorded = made_with(out, done, available, zip_path)
    if found is not None and found != settings:
        differing = {name: found[name] for name in SETTINGS if found[name] != settings[name]}
        way = flags(differing)
        if not output_dir and 'isCrop' in differing:  # --isCrop alone would pick the other default folder
            way += ' ' + shlex.quote(f"--output_dir={out}")
        told = (f"as its {SETTINGS_FILE} records" if recorded else
                f"told from its faces: it has no {SETTINGS_FILE}, from an older celeba_preprocess.py")
        fail(f"{out}/ holds faces made with {flags(found)} ({told}), not {flags(settings)}; "
             f"give another --output_dir, or pass {way} to add to them")
    if not recorded:
        save_json(settings, os.path.join(out, SETTINGS_FILE))


def some(names):
    """The first few of the names, for one summary line."""
    names = sorted(names)
    return ', '.join(names[:SHOWN]) + (', ...' if len(names) > SHOWN else '')


def main():
    configure(globals())
    signal.signal(signal.SIGTERM, raise_stopped)  # from here on SIGTERM is one line, as Ctrl-C is
    try:
        preprocess()
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to finish (the images written so far are kept)", 130)
    except Stopped:
        fail("stopped by SIGTERM; run the same command again to finish (the images written so far are kept)", 143)


def preprocess():
    started = time.time()
    images, attributes = locate(celeba_dir)
    genders = read_genders(attributes)
    available = list_images(images)
    out = output_dir or celeba_folder(isCrop)
    zip_path = images if images.endswith('.zip') else None
    done = written_names(out)
    check_settings(out, done, available, zip_path)

    jobs, missing, present = [], [], 0
    for name, gender in genders.items():
        cls = CLASSES[gender]
        if name in done[cls]:
            present += 1
        elif name not in available:
            missing.append(name)
        else:
            jobs.append((name, available[name], os.path.join(out, cls, name)))
    results = convert_all(jobs, zip_path, img_size, isCrop, workers or os.cpu_count()) if jobs else []
    unwritable = [error for _, problem, error in results if problem == 'unwritable']
    if unwritable:  # a worker could not write a face: a full disk, no permission
        output_failed(unwritable[0].filename, unwritable[0])

    seconds = time.time() - started
    written = Counter(CLASSES[genders[name]] for name, problem, _ in results if problem is None)
    corrupt = [f'{name} ({why})' for name, problem, why in results if problem == 'corrupt']
    small = [f'{name} ({why})' for name, problem, why in results if problem == 'small']
    unlisted = available.keys() - genders.keys()
    print(f"wrote {written['female']} female and {written['male']} male faces to {out}/ "
          f"({present} already there) in {seconds:.1f} s, {sum(written.values()) / seconds:.0f} images/s")
    if missing:
        print(f"skipped {len(missing)} listed but missing from {images}: {some(missing)}")
    if corrupt:
        print(f"skipped {len(corrupt)} corrupt or truncated: {some(corrupt)}")
    if small:
        print(f"skipped {len(small)} too small for the {CROP_SIDE}x{CROP_SIDE} crop: {some(small)}")
    if unlisted:
        print(f"ignored {len(unlisted)} not listed in {attributes}: {some(unlisted)}")


if __name__ == '__main__':
    main()
