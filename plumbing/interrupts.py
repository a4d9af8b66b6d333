"""Ctrl-C and SIGTERM as one line: the Stopped exception, and the hook that catches them at start-up.

Imports nothing heavy, so common.py can install the hook before torch loads.
"""
import os
import sys


# What the process is doing while no Run explains an interruption: what its one line says it was doing.
doing = "while starting, before any epoch was trained"


class Stopped(BaseException):
    """SIGTERM: a job scheduler stopping the run, or torchrun stopping it after another process failed.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` (around a decoder, a loader)
    takes it for a damaged file."""


def raise_stopped(signum, frame):
    raise Stopped()


def _one_line_interrupt(kind, value, traceback, previous=sys.excepthook):
    """A Ctrl-C or SIGTERM that reaches the top of a script (start-up, not training: the Run says what an
    epoch saved). World turns SIGTERM into Stopped; before it, SIGTERM ends the process the default way."""
    if not issubclass(kind, (KeyboardInterrupt, Stopped)) or sys.flags.interactive or hasattr(sys, 'ps1'):
        return previous(kind, value, traceback)
    cause, status = ("interrupted", 130) if issubclass(kind, KeyboardInterrupt) else ("stopped by SIGTERM", 143)
    print(f"error: {cause} {doing}; run the same command again",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # an excepthook cannot raise SystemExit, and Python would otherwise end by the signal


def make_start_up_interrupts_one_line():
    sys.excepthook = _one_line_interrupt
