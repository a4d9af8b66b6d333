"""Files written atomically and read safely: a write that fails is one line and leaves the old file, a torch
file is read as weights only and after its checksums."""
import errno
import hashlib
import io
import json
import os
import re
import warnings
import zipfile

import torch

from plumbing.console import fail
from plumbing.distributed import writes_files


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


TEMPORARY = re.compile(r'.+\.tmp(\d+)(\.\w+)?')  # atomic_write's temporary files, its writer's PID the group


def remove_dead_temporaries(folder, prefix=''):
    """Remove the temporary files of atomic writes that a killed process left in folder (a checkpoint's,
    or 2.5 GB of CelebA cache), those starting with prefix whose writer's PID runs no process now. A live
    PID's file is kept: it may be another process's write in progress. Only on POSIX, where
    os.kill(pid, 0) asks without signalling (on Windows it would send a Ctrl-C)."""
    if os.name != 'posix' or not os.path.isdir(folder or '.'):
        return
    freed = []
    for name in os.listdir(folder or '.'):
        match = TEMPORARY.fullmatch(name)
        if name.startswith(prefix) and match and not is_running(int(match.group(1))):
            path = os.path.join(folder, name)
            freed.append(os.path.getsize(path))
            os.remove(path)
    if freed:
        print(f"removed {len(freed)} temporary file(s) of {sum(freed) / 1e6:.0f} MB left in {folder or '.'}/ "
              f"by a process that was killed", flush=True)


def is_running(pid):
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def check_output_path(flag, value, path, example_name):
    """Stop with one line, before the work, where --flag=value (resolved to path) could not be written: a
    folder stands there, its folder is missing or a file, or it is not writable. Long work must not end at
    the save."""
    named = f"--{flag}={value}" if path == value else f"--{flag}={value}: {path}"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"{named} is a folder; pass the path of a file, like --{flag}={os.path.join(value, example_name)}", 2)
    if not os.path.isdir(folder):
        what = "is a file, not a folder; move it away" if os.path.exists(folder) else "does not exist; make that folder"
        fail(f"--{flag}={value}: {folder} {what} or pass another --{flag}", 2)
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--{flag}={value}: cannot write in {folder}; make it writable or pass another --{flag}")


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
    be read that way, or whose checksums do not match, is damaged and stops the script with one line
    ending in remedy: torch's advice to retry with weights_only=False would run whatever code it holds.

    torch.save writes a zip archive with a CRC-32 of every record, and torch.load does not check them:
    a few flipped bytes in a tensor load as wrong weights. Every record's CRC is checked here first.
    """
    try:
        f = open(path, 'rb')
    except OSError as e:  # no permission, say: the file itself may be fine
        fail(f"cannot read {path} ({e.strerror or e}); {remedy}")
    with f, warnings.catch_warnings():
        try:
            damaged = zipfile.ZipFile(f).testzip()
        except (zipfile.BadZipFile, EOFError, OSError):  # no archive at all: torch.load says what it is
            damaged = None
        if damaged is not None:
            fail(f"{path} is damaged: its checksums do not match (in {damaged}); {remedy}")
        f.seek(0)
        warnings.simplefilter('ignore')  # torch warns of a pickle protocol before refusing the file anyway
        try:
            return torch.load(f, map_location='cpu', weights_only=True)
        except Exception:  # whatever a garbled file makes the reader raise, it means the same
            fail(f"{path} is damaged: it cannot be read as a file of weights; {remedy}")


def file_sha256(path, remedy, described=None):
    """The sha256 of the file at path, in hex; one line if it cannot be read: `cannot read <described, or the
    path> (why); <remedy>`."""
    digest = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
    except OSError as e:
        fail(f"cannot read {described or path} ({e.strerror or e}); {remedy}")
    return digest.hexdigest()


def is_state_dict(state):
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_state_dict(path, remedy):
    """The state_dict of weights torch.save wrote to path, or stop with one line ending in remedy."""
    state = load_torch(path, remedy)
    if not is_state_dict(state):
        fail(f"{path} is damaged: it holds no state_dict of weights; {remedy}")
    return state
