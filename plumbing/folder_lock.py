"""The lock that gives a results folder to one run at a time."""
import datetime
import os
import sys

from plumbing.console import fail
from plumbing.safe_files import output_failed


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
