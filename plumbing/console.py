"""What a person sees of a run on the terminal: fail(), the one-line stop that every part of the collection
uses (under torchrun, rank 0 alone says it); a stdout whose lost reader is no reason to stop; the progress bar."""
import os
import sys

from plumbing.distributed import rank, world_size


def fail(message, status=1, every_rank=False):
    """Stop with one line on stderr: the error and what to do about it.

    Under torchrun every process meets the same bad input, so rank 0 alone says it, unless the trouble
    is this process's own (every_rank), and then the line names the rank.
    """
    if every_rank or rank() == 0:
        where = f"rank {rank()}: " if every_rank and world_size() > 1 else ""
        print(f"error: {where}{message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


class _LosableStdout:
    """sys.stdout that, once its reader has gone (`python mnist_gan.py | head -1`) or its disk is full
    (`> /dev/full`), sends what follows to os.devnull instead of raising: losing the output must not stop
    a training."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:  # BrokenPipeError, or ENOSPC
            self._lost()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._lost()

    def _lost(self):
        # Onto the descriptor itself, so the interpreter's last flush at exit finds a file that takes it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def __getattr__(self, name):
        return getattr(self._stream, name)


def keep_training_without_stdout():
    if sys.stdout is None:  # started with stdout closed (>&-): Python then has none
        sys.stdout = open(os.devnull, 'w')
    if not isinstance(sys.stdout, _LosableStdout):
        sys.stdout = _LosableStdout(sys.stdout)


def progress(iterable, description):
    """A tqdm bar when a person watches stdout; silent in logs and CI."""
    from tqdm import tqdm
    return tqdm(iterable, desc=description, leave=False, disable=not sys.stdout.isatty())
