"""The run a training script's loop calls around its step: main() (the whole __main__ of a script), Run
(precision, the models' set-up, the epochs and batches, each epoch's record, the one line that ends an
interrupted run or one out of memory) and the GAN bookkeeping it keeps (the moving average of G, the
epoch means, the collapse report)."""
import math
import os
import re
import time

import torch

from plumbing.celeba import celeba_folder
from plumbing.config import configure, constants
from plumbing.data import real_batch, shuffled_batches, to_unit_range
from plumbing.files import generator_weights, load_weights
from plumbing.folder import RunFolder
from plumbing.images import save_grid
from plumbing.interrupts import Stopped
from plumbing.machine import (World, compile_models, fail, failed_collective, from_rank0, has_fused_adam,
                              keep_training_without_stdout, memory_format, mixed_precision, progress, synchronize,
                              world_size)


def main(namespace, train, generate_samples):
    """The whole __main__ block of a training script: apply the command line's overrides to the script's
    constants (namespace, its globals()), join torchrun's processes if it started them, seed, then
    train(run), or generate_samples(run) for --generate."""
    keep_training_without_stdout()
    config = configure(namespace)
    if 0 < config['train_limit'] < config['batch_size']:
        fail(f"--train_limit={config['train_limit']} is less than one batch of {config['batch_size']}; "
             f"raise it or lower --batch_size", 2)
    if 'isCrop' in namespace:  # the CelebA scripts: folders left '' follow the crop, a model of its own
        namespace['data_dir'] = namespace['data_dir'] or celeba_folder(namespace['isCrop'])
        namespace['results_dir'] = namespace['results_dir'] or f"{model_name(namespace)}_results"
    world = World(config['device'], config['batch_size'], config['generate'], config.get('sync_batchnorm', False))
    torch.manual_seed(config['seed'])
    if config['generate']:
        generate_samples(Run(namespace, world))
    else:
        with Run(namespace, world) as run:
            train(run)


def model_name(namespace):
    """The name in every output file: the script's MODEL, and for CelebA's crop variant, a model of its own."""
    return namespace['MODEL'] + ('_crop' if namespace.get('isCrop') else '')


def is_interruption(error):
    """What ends training early but keeps its last checkpoint: Ctrl-C, SIGTERM, and under torchrun a failed
    collective (another process died or stopped answering). Any other error is a bug, seen in full."""
    return isinstance(error, (KeyboardInterrupt, Stopped)) or failed_collective(error)


def is_out_of_memory(error):
    """Memory running out: CUDA's allocator, the CPU's (whose error is a RuntimeError naming it), or
    oneDNN failing to make a bf16 kernel for a batch too large for memory."""
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or isinstance(error, RuntimeError) and any(
        sign in str(error) for sign in ("can't allocate memory", "could not create a primitive"))


class Run:
    """One run of a training script, made by main() from the script's constants.

    As a `with` block around training: the mixed precision (autocast and scaler) on entering; on leaving,
    the final outputs, or after an interruption one line saying what the checkpoint holds. Inside it,
    start() sets up the models and resumes, epochs() and batches() are the two loops, log() takes each
    step's losses and end_epoch() records the epoch. For --generate: trained_generator() and save_grid().
    """

    def __init__(self, namespace, world):
        self.config = constants(namespace)
        self.name = model_name(namespace)
        self.dir = self.config['results_dir']
        self.world = world
        self.device = world.device
        self.rank_batch = self.config['batch_size'] // world.size  # this process's share of every batch
        self.memory_format = memory_format(self.config.get('channels_last', False))
        self.fused_adam = has_fused_adam(self.device)
        self.bf16_by_default = namespace['BF16_BY_DEFAULT']
        self.folder = None  # the RunFolder, from start() on

    # ------------------------------------------------ the with block

    def __enter__(self):
        self.autocast, self.scaler = mixed_precision(self.config['precision'], self.device, self.bf16_by_default)
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
            self.folder.interrupted(error)

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

    def start(self, G, D, opt_G, opt_D, fixed_inputs, scored_by=None):
        """Take the results folder and resume from its checkpoint, if there is one and resume is on.

        Makes the moving average of G (ema_decay), compiles G and D if asked, and draws
        fixed_inputs(device), the inputs kept for the whole run ({name: tensor}, saved in the checkpoint).
        scored_by: the MnistQuality that scores the epochs; its classifier is pinned by its digest.
        Returns G and D as training calls them (in DistributedDataParallel under torchrun), the moving
        average of G, and the fixed inputs on the device.
        """
        config = self.config
        G_ema = ema_model(G, config['ema_decay'])
        if config['compile']:
            compile_models(G, D)
        folder = RunFolder(self.name, config,
                           models={'generator': G, 'discriminator': D, 'generator_average': G_ema},
                           optimizers={'generator': opt_G, 'discriminator': opt_D}, scaler=self.scaler,
                           exports={'generator': G_ema.module, 'discriminator': D},
                           best_by='fid' if config.get('quality_samples') else None,
                           yardstick={'classifier': scored_by.weights, 'sha256': scored_by.digest} if scored_by else None)
        self.folder = folder  # from here an interruption is the folder's to explain
        self.first_epoch = folder.start(lambda: fixed_inputs(self.device))
        self.optimizers = (opt_G, opt_D)
        self.collapse = CollapseCheck(config['label_smoothing'], config['stop_on_collapse'],
                                      config.get('collapse_factor'))
        fixed = {name: tensor.to(self.device) for name, tensor in folder.fixed.items()}
        return self.world.parallel(G), self.world.parallel(D), G_ema, fixed

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
        self.images_seen = batches.numel()
        start = time.perf_counter()
        for index in progress(batches, f"epoch {self.epoch}"):
            x = real_batch(images, index, self.device, self.memory_format)
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

    @property
    def history(self):
        return self.folder.history

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    # ------------------------------------------------ --generate, and other pictures

    def trained_generator(self, G):
        """G with the trained weights --generate samples from (generate_from: best by fid, or last), on the device."""
        return load_weights(G, generator_weights(self.dir, self.name, self.config['generate_from'])).to(self.device)

    def save_grid(self, name, images, nrow):
        """images (uint8 pixels, or floats in [-1, 1]) as one grid PNG named name in the results folder;
        returns its path."""
        path = self.path(name)
        save_grid(to_unit_range(images) if images.dtype == torch.uint8 else images, path, nrow)
        return path


def ema_model(model, decay):
    """An exponential moving average of model's weights and BatchNorm statistics, for sampling.

    decay 0 makes it a plain copy of the latest weights, the original recipe. Made before model is
    compiled, so the copy is a plain module.
    """
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def ema(ema_params, current_params, steps):
        # A short memory at first, (1 + n) / (10 + n), so early grids do not show the random start.
        n = int(steps)
        keep = min(decay, (1 + n) / (10 + n))
        for average, current in zip(ema_params, current_params):
            if average.is_floating_point():
                average.lerp_(current, 1 - keep)
            else:  # BatchNorm's step counter
                average.copy_(current)
    return AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


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


def bce_floor(label_smoothing):
    """The least BCE loss of a discriminator's real half: the entropy of its target 1 - label_smoothing."""
    target = 1 - label_smoothing
    return -sum(p * math.log(p) for p in (target, 1 - target) if p > 0)


class CollapseCheck:
    """Says plainly when a run falls apart: fid far above its best, or the discriminator winning outright.

    D 'wins outright' when its mean loss over an epoch is within WON_MARGIN of its floor: it then gives
    G no gradient. Only a fall counts: D often wins the first epochs outright and G still learns
    (the non-saturating loss), so an epoch counts only after an earlier, contested one.
    """
    WON_MARGIN = 0.05

    def __init__(self, label_smoothing, stop_on_collapse, fid_factor=None):
        self.floor = bce_floor(label_smoothing)  # of loss_d = real half + fake half; the fake half can reach 0
        self.stop = stop_on_collapse
        self.factor = fid_factor

    def won_outright(self, loss_d):
        return loss_d - self.floor < self.WON_MARGIN

    def stops(self, run):
        """Check run's last epoch; print a COLLAPSE line if it fell apart. True when training should stop."""
        *earlier, last = run.history
        best = run.best()
        signs = []
        if self.factor and 'fid' in last and last['fid'] > self.factor * best['fid']:
            signs.append(f"fid {last['fid']:.1f} is over {self.factor:g} times the best, "
                         f"{best['fid']:.1f} at epoch {best['epoch']}")
        contested_before = not all(self.won_outright(h['loss_d']) for h in earlier)
        if contested_before and self.won_outright(last['loss_d']):
            signs.append(f"the discriminator's loss averaged {last['loss_d']:.3f} over the epoch, "
                         f"{last['loss_d'] - self.floor:.3f} above its floor")
        if signs:
            going = "stopping (stop_on_collapse)" if self.stop else "going on"
            kept = f" The best generator stays in {run.best_generator_path()}" if best else ""
            print(f"COLLAPSE at epoch {last['epoch']}: {'; '.join(signs)}; {going}.{kept}", flush=True)
        return from_rank0(bool(signs) and self.stop)  # rank 0's scores decide, so every process stops

