"""The one module the experiment scripts import: the few names they call, from the machinery in plumbing/.

A script's __main__ is common.main(globals(), train, generate_samples); its train(run) reaches what is not
the experiment (the device and precision, the results folder and its resume, torchrun, the epochs and
batches, each epoch's record) through the Run that main() hands it. Nothing here is a model or a training
step; each script keeps its own.
"""
from plumbing import interrupts

# First, before torch loads (seconds): the scripts import this module before torch, so from here on a
# Ctrl-C, even while torch loads, is one line and not a traceback.
interrupts.make_start_up_interrupts_one_line()

# numpy before torch: torch 2.4 imports numpy from its C code, which drops a Ctrl-C that lands there.
import numpy  # noqa: E402,F401

from plumbing.celeba import load_celeba  # noqa: E402
from plumbing.celeba_fid import CelebaFid  # noqa: E402
from plumbing.data import evenly_spaced, mnist_training_set  # noqa: E402
from plumbing.images import sample, square_side  # noqa: E402
from plumbing.mnist_quality import MnistQuality  # noqa: E402
from plumbing.moving_average import moving_average  # noqa: E402
from plumbing.run import main  # noqa: E402

__all__ = ['CelebaFid', 'MnistQuality', 'evenly_spaced', 'load_celeba', 'main', 'mnist_training_set', 'moving_average',
           'sample', 'square_side']
