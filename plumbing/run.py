"""The run around a training script's loop: main(), a script's whole __main__, and the Run it hands to
train(run): the device and precision, the results folder (locked, resumed), the epochs and batches, each
epoch's record, and the one line that ends an interrupted run or one out of memory."""
import os
import re
import time

import torch

from plumbing import interrupts
from plumbing.collapse import CollapseCheck
from plumbing.config import resolve
from plumbing.console import fail, keep_training_without_stdout, progress
from plumbing.data import real_batch, shuffled_batches, to_unit_range
from plumbing.distributed import world_size
from plumbing.hardware import autocast_dtype, synchronize
from plumbing.images import save_grid
from plumbing.interrupts import Stopped
from plumbing.results_folder import RunFolder
from plumbing.safe_files import load_state_dict
from plumbing.torchrun import World, failed_collective


def main(namespace, train, generate_samples, score_samples=None):
    """The whole __main__ block of a training script: resolve its configuration once (the command line's
    overrides of the script's constants, namespace being its globals()), join torchrun's processes if it
    started them, seed, then train(run), or generate_samples(run) for --generate, score_samples(run) for
    --score (the CelebA scripts)."""
    keep_training_without_stdout()
    config = resolve(namespace)
    constants = config.constants
    world = World(constants['device'], constants['batch_size'], constants['generate'] or constants.get('score', 0),
                  constants.get('sync_batchnorm', False))
    torch.manual_seed(constants['seed'])
    if constants['generate'] and constants.get('score'):
        fail(f"--generate={constants['generate']} and --score={constants['score']}: pass one of them", 2)
    if constants['generate']:
        interrupts.doing = "while writing samples, before any was saved; no trained file was changed"
        generate_samples(Run(config, world))
    elif constants.get('score'):
        interrupts.doing = "while scoring samples; no trained file was changed"
        score_samples(Run(config, world))
    else:
        with Run(config, world) as run:
            train(run)


def is_interruption(error):
    """What ends training early but keeps its last checkpoint: Ctrl-C, SIGTERM, and under torchrun a failed
    collective (another process died or stopped answering). Any other error is a bug, seen in full."""
    return isinstance(error, (KeyboardInterrupt, Stopped)) or failed_collective(error)


def is_out_of_memory(error):
    """Memory running out: CUDA's allocator, the CPU's (whose error is a RuntimeError naming it), or
    oneDNN failing to make a bf16 kernel for a batch too large for memory."""
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or isinstance(error, RuntimeError) and any(
        sign in str(error) for sign in ("can't allocate memory", "could not create a primitive"))


def stop_after_interruption(folder, cause):
    """Stop with one line on an interruption (see is_interruption): what stopped the run and what
    checkpoint.pt (of the RunFolder folder) really holds."""
    again = ("Run the same command again to resume" if folder.config.get('resume', True) else
             "Run the command again without --resume=false to resume (with it, the run starts afresh)")
    if folder.resuming:
        saved = f"it was resuming, and {folder.checkpoint_path} is as it was. {again}"
    elif not folder.saved_epoch:
        saved = "no epoch was saved yet; run the same command again to start"
    else:
        saved = f"{folder.checkpoint_path} holds epoch {folder.saved_epoch}. {again}"
    if isinstance(cause, KeyboardInterrupt):
        fail("interrupted before the first epoch was saved; run the same command again to start"
             if not (folder.saved_epoch or folder.resuming) else f"interrupted; {saved}", 130)
    if isinstance(cause, Stopped):
        fail(f"stopped by SIGTERM; {saved}", 143, every_rank=True)
    fail(f"stopped: {type(cause).__name__}: {str(cause).splitlines()[0]} (if another process of this run "
         f"failed, its own output says why); {saved}", 1, every_rank=True)


class Run:
    """One run of a training script, made by main() from its resolved configuration.

    As a `with` block around training: the precision chosen on entering (run.dtype); on leaving, the final
    outputs, or after an interruption one line saying what the checkpoint holds. Inside it,
    lock_folder_and_resume() takes the results folder, ddp() wraps a model for torchrun, epochs() and
    batches() are the two loops, log() takes each step's scalars and end_epoch() records the epoch. For
    --generate: trained_generator() and save_grid().
    """

    def __init__(self, config, world):
        self.config = config.constants
        self.name = config.model
        self.bf16_by_default = config.bf16_by_default
        self.dir = self.config['results_dir']
        self.world = world
        self.device = world.device
        self.dtype = None  # autocast's dtype (None: fp32), chosen on entering the with block
        self.folder = None  # the RunFolder, from lock_folder_and_resume() on

    # ------------------------------------------------ the with block

    def __enter__(self):
        self.dtype = autocast_dtype(self.config['precision'], self.device, self.bf16_by_default)
        return self

    def __exit__(self, kind, error, traceback):
        if error is None and self.folder is not None:
            try:
                self.folder.finish()
            except BaseException as late:
                self._stop_with_one_line(late)
                raise
        elif error is not None:
            self._stop_with_one_line(error)
        return False

    def _stop_with_one_line(self, error):
        """Stop with one line where error is the user's situation, not a bug: memory running out, or (once
        the run has its folder) an interruption. Before that, a Ctrl-C is the start-up hook's one line."""
        if is_out_of_memory(error):
            self._out_of_memory(error)
        if self.folder is not None and is_interruption(error):
            stop_after_interruption(self.folder, error)

    def _out_of_memory(self, error):
        config, saved = self.config, self.folder.saved_epoch if self.folder is not None else 0
        smaller = f"--batch_size (now {config['batch_size']})" + (f" or --d (now {config['d']})" if 'd' in config else '')
        asked = re.search(r'[Tt]ried to allocate (\S+ \w+)', str(error))
        cause = f"it tried to allocate {asked.group(1)} more" if asked else type(error).__name__
        if saved:
            fail(f"out of memory on {self.device} ({cause}); {self.folder.checkpoint_path} holds epoch {saved}: "
                 f"free some memory and run the same command again to resume, or lower {smaller} with "
                 f"--resume=false to start afresh", every_rank=True)
        fail(f"out of memory on {self.device} ({cause}); lower {smaller}, or free some memory, and run again",
             every_rank=True)

    # ------------------------------------------------ training

    def lock_folder_and_resume(self, G, D, G_ema, opt_G, opt_D, scaler, fixed_inputs, scored_by=None):
        """Take the results folder for this run alone, and resume from its checkpoint if there is one and
        resume is on: the models, G's average, the optimizers, the scaler, the fixed inputs and the random
        state come back as saved. Else fixed_inputs(device) draws the inputs kept for the whole run.

        scored_by: the MnistQuality or CelebaFid that scores the epochs; a resume must find its yardstick (the
        classifier, or the Inception weights) unchanged.
        Returns the fixed inputs ({name: tensor}) on the device.
        """
        config = self.config
        folder = RunFolder(self.name, config,
                           models={'generator': G, 'discriminator': D, 'generator_average': G_ema},
                           optimizers={'generator': opt_G, 'discriminator': opt_D}, scaler=scaler,
                           exports={'generator': G_ema.module, 'discriminator': D},
                           best_by='fid' if config.get('quality_samples') else None,
                           yardstick=scored_by.yardstick if scored_by else None)
        self.folder = folder  # from here an interruption is the folder's to explain
        self.first_epoch = folder.start(lambda: fixed_inputs(self.device))
        self.optimizers = (opt_G, opt_D)
        self.collapse = CollapseCheck(config['label_smoothing'], config['stop_on_collapse'],
                                      config.get('collapse_factor'))
        return {name: tensor.to(self.device) for name, tensor in folder.fixed.items()}

    def ddp(self, model):
        """model in DistributedDataParallel under torchrun, so that its gradients are averaged over the
        processes; model itself in a single process."""
        return self.world.parallel(model)

    def epochs(self, learning_rate):
        """The epochs left to train. Before each, both optimizers take learning_rate(epoch); after each, a
        collapse stops training where stop_on_collapse asks for it."""
        resumed_after_a_stop = 1 < self.first_epoch <= self.config['train_epoch'] and self.config['stop_on_collapse']
        if resumed_after_a_stop and self.collapse.stops(self.folder):
            return  # the last epoch saved collapsed, and stop_on_collapse stopped the run there
        for epoch in range(self.first_epoch, self.config['train_epoch'] + 1):
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group['lr'] = learning_rate(epoch)
            self.epoch, self.means = epoch, EpochMeans()
            yield epoch
            if self.collapse.stops(self.folder):
                return

    def batches(self, images, labels=None):
        """This process's share of each full batch of the epoch's permutation of the uint8 images: x as
        floats in [-1, 1] on the device, in the models' memory format, or (x, y) given the labels."""
        config = self.config
        batches = shuffled_batches(len(images), config['batch_size'], images.device, config['seed'], self.epoch)
        memory_format = torch.channels_last if config.get('channels_last') else torch.contiguous_format
        self.images_seen = batches.numel()
        start = time.perf_counter()
        for index in progress(batches, f"epoch {self.epoch}"):
            x = real_batch(images, index, self.device, memory_format)
            yield x if labels is None else (x, labels[index].to(self.device))
        synchronize(self.device)
        self.seconds = time.perf_counter() - start  # the training steps alone, not the grids and scores

    def log(self, **values):
        """A step's scalars (losses, D's mean outputs), averaged over the epoch into its record."""
        self.means.add(**values)

    def end_epoch(self, fixed_grid, random_grid=None, scores=None):
        """Record the epoch: its means and scores ({name: float}, e.g. fid), the grid of the fixed inputs
        and the one of fresh noise ((images, columns) each), the weights, history and checkpoint."""
        grids = {self.folder.fixed_grid_path(self.epoch): fixed_grid}
        if random_grid is not None:
            grids[self.folder.random_grid_path(self.epoch)] = random_grid
        self.folder.end_epoch(self.epoch, {**self.means.read(), **(scores or {})}, self.seconds,
                              self.images_seen, grids)

    # ------------------------------------------------ --generate, and other pictures

    def trained_generator(self, G):
        """G with the trained weights --generate samples from (generate_from: best by fid, or last), on the device."""
        return load_weights(G, generator_weights(self.dir, self.name, self.config['generate_from'])).to(self.device)

    def save_grid(self, name, images, nrow):
        """images (uint8 pixels, or floats in [-1, 1]) as one grid PNG named name in the results folder;
        returns its path."""
        path = os.path.join(self.dir, name)
        save_grid(to_unit_range(images) if images.dtype == torch.uint8 else images, path, nrow)
        return path


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




def generator_weights(results_dir, model_name, generate_from):
    """The generator file --generate samples from: the best by fid, or the last epoch's."""
    if generate_from not in ('best', 'last'):
        fail(f"--generate_from={generate_from}: choose best or last", 2)
    best = os.path.join(results_dir, f"{model_name}_generator_best.pt")
    if generate_from == 'best' and os.path.exists(best):
        return best
    last = os.path.join(results_dir, f"{model_name}_generator.pt")
    if generate_from == 'best' and os.path.exists(last):
        print(f"no {best}: a run keeps one where it measures quality (quality_samples > 0), and a resume "
              f"writes it again from the checkpoint; sampling from the last generator")
    if generate_from == 'last' and not os.path.exists(last) and os.path.exists(best):
        fail(f"no {last}, the last epoch's generator; {best} is there: pass --generate_from=best to sample from it")
    return last


def load_weights(model, path):
    """Load a state_dict saved by a training run, or stop with one line saying how to get it.

    A training run replaces its weight files atomically, so this reads complete files while it trains.
    """
    if not os.path.exists(path):
        fail(f"no trained generator at {path}; train first (run the script without --generate)")
    state = load_state_dict(path, "delete it and train again (run the script without --generate)")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        fail(f"{path} was trained with other model constants (z_dim, d, img_size, ...) or by another script; "
             f"pass the constants it was trained with (its *_train_hist.json lists them) or another --results_dir")
    return model
