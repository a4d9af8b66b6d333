"""The files of one training run in its results folder: the checkpoint and resuming from it, the history,
the best generator and the final outputs."""
import math
import os
import re
import sys
import warnings

import torch

from plumbing.console import fail
from plumbing.distributed import barrier, from_rank0, gather, rank, world_size, writes_files
from plumbing.folder_lock import lock_folder
from plumbing.images import plot_curves, plot_quality, save_animation, save_grid
from plumbing.safe_files import (is_state_dict, load_torch, make_folder, output_failed, remove_dead_temporaries,
                                 save_json, save_torch)


class RunFolder:
    """The files of one training run in results_dir and what survives an interruption.

    The run holds results_dir alone from start to finish (lock_folder). After every epoch: the grids,
    first a checkpoint with everything needed to continue (models, optimizers, GradScaler, history, fixed
    inputs, RNG states, constants, the best generator, and which script and model made it), then what can
    be made from it: the weights, the best generator and the JSON history. Each file is replaced
    atomically, and a resume (or the rerun of a finished run) writes the latter again from the checkpoint,
    so a kill at any moment leaves the last complete epoch, and its files agree with it once resumed. Only
    then the epoch's line is printed, so a printed epoch is a saved one.
    """
    # What a resume may change: how long to train and how the run is carried out. Every other constant
    # defines the experiment and must match the checkpoint's (quality_samples too: it sets the fixed inputs).
    MAY_CHANGE_ON_RESUME = {'train_epoch', 'data_dir', 'results_dir', 'train_limit', 'resume', 'device',
                            'precision', 'channels_last', 'sync_batchnorm', 'compile', 'quality_every',
                            'inception_weights', 'collapse_factor', 'stop_on_collapse', 'generate', 'generate_from',
                            'score'}
    # A yardstick's kind, as a refused resume names it: (what scored the checkpoint, what to put back).
    YARDSTICKS = {'classifier': ('another MNIST classifier', 'that classifier'),
                  'inception_weights': ('other Inception weights', 'those weights')}

    def __init__(self, model_name, config, models, optimizers, exports, scaler=None, best_by=None, yardstick=None):
        """config: the script's constants; models, optimizers and the scaler go into the checkpoint;
        exports are saved as <Model>_<name>.pt; best_by: the history key (lower is better) whose best
        epoch's generator is kept as <Model>_generator_best.pt; yardstick: what scores the epochs ({'classifier'
        or 'inception_weights': path, 'sha256': its digest}), which a resume must find unchanged."""
        self.name = model_name
        self.script = os.path.basename(sys.argv[0])
        self.config = config
        self.dir = config['results_dir']
        self.models = models
        self.optimizers = optimizers
        self.scaler = scaler
        self.exports = exports
        self.best_by = best_by
        self.yardstick = yardstick
        self.history = []
        self.best_state = None  # the best generator's weights (best_by), kept in the checkpoint
        self.config_changes = []  # [{'epoch': the first trained with them, name: [before, now], ...}, ...]
        self.fixed = {}
        self.saved_epoch = 0  # the epoch checkpoint.pt holds: what an interruption keeps
        self.resuming = False  # while the checkpoint loads: an interruption leaves it as it was
        self.checkpoint_path = os.path.join(self.dir, 'checkpoint.pt')
        self.lock = None
        if writes_files():
            make_folder(self.dir)
            self.lock = lock_folder(self.dir)  # open until the process ends, and the lock with it
            for folder in (self.dir, self.path('Fixed_results'), self.path('Random_results')):
                remove_dead_temporaries(folder)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def start(self, make_fixed_inputs):
        """The first epoch to train: 1, or the one after the checkpoint's when resuming.

        The fixed inputs are drawn even when resuming: their shapes are what the checkpoint's must have
        (quality_samples sets one), and the random state restored afterwards makes the draw harmless.
        Called once the models are made, from the same seed in every process, so all start alike; from
        here each process of a torchrun draws its own noise (rank 0 the stream a single process draws).
        """
        if rank():
            torch.manual_seed(hash((self.config['seed'], rank())))
        self.fixed = make_fixed_inputs()
        resume = self.config['resume'] and os.path.exists(self.checkpoint_path)
        refusal = self._refusal(resume) if writes_files() else None
        if from_rank0(refusal is not None):  # rank 0 looked; every process stops alike
            fail(refusal)
        if resume:
            self.resuming = True
            first_epoch = self._restore()
            self.resuming = False
            self._write_what_the_checkpoint_makes()
            return first_epoch
        if writes_files():
            self._remove_earlier_outputs()
        return 1

    def _refusal(self, resume):
        """Why this run cannot start in its folder, before it trains or removes anything, or None: a folder
        where one of its files goes (it would fail at the first save), or, starting afresh, another model's
        checkpoint (a fresh start removes only what this model made)."""
        for path in [self.checkpoint_path, self.best_generator_path(), self.path(f"{self.name}_train_hist.json"),
                     *(self.path(f"{self.name}_{name}.pt") for name in self.exports)]:
            if os.path.isdir(path):
                return f"{path} is a folder, where this run writes a file; move it away or pass another --results_dir"
        owner = None if resume else checkpoint_owner(self.checkpoint_path)
        if owner not in (None, self.name):
            return (f"{self.checkpoint_path} is the checkpoint of another model, {owner}; a fresh start of {self.name} "
                    f"would remove it: pass another --results_dir")
        return None

    def _remove_earlier_outputs(self):
        """Starting afresh: the outputs an earlier run of this model left here would pass for this run's
        (its best generator, say, until this run saves one), so they go; nothing else in the folder does."""
        names = [f"{self.name}_{kind}" for kind in ('generator.pt', 'discriminator.pt', 'generator_best.pt',
                                                    'train_hist.json', 'train_hist.png', 'quality.png',
                                                    'generation_animation.gif', 'generated.png', 'morp.png')]
        earlier = [self.path(name) for name in ['checkpoint.pt', *names] if os.path.isfile(self.path(name))]
        grid = re.compile(rf'{re.escape(self.name)}_\d+\.png$')
        for grids in ('Fixed_results', 'Random_results'):
            if os.path.isdir(self.path(grids)):
                earlier += [self.path(grids, name) for name in os.listdir(self.path(grids)) if grid.match(name)]
        for path in earlier:
            try:
                os.remove(path)
            except OSError as e:
                output_failed(path, e, 'remove')
        if earlier:
            print(f"{self.dir}: starting afresh; removed the {len(earlier)} outputs of an earlier run of {self.name}")

    def _restore(self):
        afresh = "delete it or pass --resume=false to start afresh, or pass another --results_dir"
        state = load_torch(self.checkpoint_path, afresh)
        keys = {'epoch', 'config', 'history', 'fixed', 'models', 'optimizers', 'rng'}
        if not isinstance(state, dict) or not keys <= state.keys() or not is_state_dict(state['fixed']):
            fail(f"{self.checkpoint_path} is damaged: it is not a checkpoint of these scripts; {afresh}")
        made_by = state.get('model', self.name)  # checkpoints from before the model was recorded: try them
        if made_by != self.name:
            script = state.get('script', 'another script')
            fail(f"{self.checkpoint_path} is a checkpoint of {made_by} (made by {script}), not of {self.name}; "
                 f"pass another --results_dir")
        saved = state['config']  # a constant newer than the checkpoint is taken as unchanged
        differing = {k: [saved[k], v] for k, v in self.config.items() if k in saved and saved[k] != v}
        changed = [f"{k}={before!r} (now {now!r})" for k, (before, now) in differing.items()
                   if k not in self.MAY_CHANGE_ON_RESUME]
        if changed:
            fail(f"{self.checkpoint_path} was made with other constants: {', '.join(changed)}; pass those, use "
                 f"another --results_dir, or --resume=false to start afresh")
        scored_with = state.get('yardstick')  # None in a checkpoint from before it was recorded
        if scored_with and self.yardstick and scored_with['sha256'] != self.yardstick['sha256']:
            (kind, path), = ((key, value) for key, value in self.yardstick.items() if key != 'sha256')
            other, that = self.YARDSTICKS[kind]
            fail(f"{self.checkpoint_path} was scored with {other} than {path} holds now (sha256 "
                 f"{scored_with['sha256'][:12]}..., now {self.yardstick['sha256'][:12]}...): its fid would not compare "
                 f"with this run's; put {that} back, or pass --resume=false or another --results_dir")
        misfit = (f"{self.checkpoint_path} does not fit the models of this {self.script} (an older version made "
                  f"it?); {afresh}")
        shapes = {name: tuple(tensor.shape) for name, tensor in self.fixed.items()}
        if {name: tuple(tensor.shape) for name, tensor in state['fixed'].items()} != shapes:
            fail(misfit)
        try:
            for name, model in self.models.items():
                model.load_state_dict(state['models'][name])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state['optimizers'][name])
        except (RuntimeError, ValueError, KeyError):
            fail(misfit)
        if self.scaler is not None and state.get('scaler'):  # empty where the run was not fp16
            self.scaler.load_state_dict(state['scaler'])
        self.history = state['history']
        self.best_state = state.get('best_generator')  # None in a checkpoint from before it was kept there
        self.fixed = state['fixed']
        self.saved_epoch = epoch = state['epoch']
        self.config_changes = state.get('config_changes', [])
        if differing:
            self.config_changes.append({'epoch': epoch + 1, **differing})
        streams = state['rng']  # one per process of the run that saved it
        if len(streams) == world_size():
            torch.set_rng_state(streams[rank()]['cpu'])
            if torch.cuda.is_available() and streams[rank()]['cuda'] is not None:
                torch.cuda.set_rng_state(streams[rank()]['cuda'])
        else:
            torch.manual_seed(hash((self.config['seed'], rank(), epoch)))
            print(f"{self.checkpoint_path} was saved by {len(streams)} process(es) and this run has {world_size()}: "
                  f"it resumes with new random streams, so its noise differs from an uninterrupted run's")
        if epoch >= self.config['train_epoch']:
            print(f"{self.dir}: already trained {epoch} epochs; rebuilding the final outputs "
                  f"(raise --train_epoch to train on)")
        else:
            print(f"{self.dir}: resuming after epoch {epoch}")
        return epoch + 1

    def end_epoch(self, epoch, scores, seconds, n_images, grids):
        """Record a finished epoch: check it, save its grids, the checkpoint and then the files made from it
        (weights, best generator, history), then print its line.

        scores: the epoch's named means and quality scores, e.g. {'loss_d': ..., 'fid': ...};
        grids: {path: (images, columns)}, captioned "Epoch N"; n_images: this process's, of all processes'.
        Under torchrun rank 0 writes while the others wait.
        """
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            kept = (f"the checkpoint of epoch {self.saved_epoch} is kept in {self.dir}" if self.saved_epoch else
                    "no epoch was saved")
            fail(f"epoch {epoch}: {', '.join(bad)} became {scores[bad[0]]}; training diverged and {kept}; "
                 f"try a lower --lr")
        stats = {'epoch': epoch, **scores, 'seconds': seconds, 'images_per_second': n_images * world_size() / seconds}
        self.history.append(stats)
        for path, (images, columns) in grids.items():
            save_grid(images, path, columns, label=f"Epoch {epoch}")
        best = self.best()
        if best is not None and best['epoch'] == epoch:  # a copy: the state_dict's tensors are the live weights
            self.best_state = {k: v.detach().clone() for k, v in self.exports['generator'].state_dict().items()}
        state = {'epoch': epoch, 'model': self.name, 'script': self.script, 'config': self.config,
                 'config_changes': self.config_changes, 'yardstick': self.yardstick,
                 'history': self.history, 'fixed': self.fixed,
                 'models': {n: m.state_dict() for n, m in self.models.items()},
                 'optimizers': {n: o.state_dict() for n, o in self.optimizers.items()},
                 'scaler': self.scaler.state_dict() if self.scaler is not None else {},
                 'best_generator': self.best_state,
                 'rng': gather({'cpu': torch.get_rng_state(),
                                'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None})}
        save_torch(state, self.checkpoint_path)
        self.saved_epoch = epoch
        self._write_what_the_checkpoint_makes()
        named = ''.join(f", {name}: {value:.3f}" for name, value in scores.items())
        print(f"[{epoch}/{self.config['train_epoch']}] - ptime: {seconds:.2f}{named}, "
              f"{stats['images_per_second']:.0f} img/s", flush=True)
        barrier()

    def best(self):
        """The history entry of the lowest best_by score, or None where none is measured."""
        if self.best_by is None:
            return None
        return min((h for h in self.history if self.best_by in h), key=lambda h: h[self.best_by], default=None)

    def best_generator_path(self):
        return self.path(f"{self.name}_generator_best.pt")

    def _write_what_the_checkpoint_makes(self):
        """The files made from the checkpoint's state: the weights, the best generator and the history."""
        for name, model in self.exports.items():
            save_torch(model.state_dict(), self.path(f"{self.name}_{name}.pt"))
        if self.best_state is not None:
            save_torch(self.best_state, self.best_generator_path())
        self.save_history()

    def save_history(self):
        seconds = sum(h['seconds'] for h in self.history)
        save_json({'model': self.name, 'config': self.config, 'config_changes': self.config_changes,
                   'scored_with': self.yardstick, 'total_seconds': seconds, 'epochs': self.history},
                  self.path(f"{self.name}_train_hist.json"))

    def fixed_grid_path(self, epoch):
        return self.path('Fixed_results', f"{self.name}_{epoch}.png")

    def random_grid_path(self, epoch):
        return self.path('Random_results', f"{self.name}_{epoch}.png")

    def finish(self):
        """Loss and quality plots, animation and the closing timing line, from the whole history; then the
        folder is free."""
        if self.history:
            self._final_outputs()
        if self.lock is not None:
            self.lock.close()  # and with the file, the lock: a run in this same process may take the folder

    def _final_outputs(self):
        plot_curves(self.history, [('loss', ['loss_d', 'loss_g'], 'linear')], self.path(f"{self.name}_train_hist.png"))
        if self.best_by:
            plot_quality(self.history, self.best_by, self.path(f"{self.name}_quality.png"))
        frames = [path for path in map(self.fixed_grid_path, (h['epoch'] for h in self.history))
                  if os.path.exists(path)]
        if frames:
            save_animation(frames, self.path(f"{self.name}_generation_animation.gif"))
        else:
            print(f"no grids in {self.path('Fixed_results')}/: the animation is left as it was")
        seconds = [h['seconds'] for h in self.history]
        print(f"Avg one epoch ptime: {sum(seconds) / len(seconds):.2f}, "
              f"total {len(seconds)} epochs ptime: {sum(seconds):.2f}")
        print(f"outputs in {self.dir}/")
        best = self.best()
        if best is not None:
            print(f"best generator: epoch {best['epoch']}, {self.best_by} {best[self.best_by]:.2f}, "
                  f"in {self.best_generator_path()}")


def checkpoint_owner(path):
    """The model whose checkpoint path holds, or None where there is none or it cannot be read as one (a
    damaged checkpoint is no run's to keep)."""
    if not os.path.isfile(path):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # reads only what it needs
        except Exception:  # whatever a damaged file makes the reader raise: it is no checkpoint to keep
            return None
    return state.get('model') if isinstance(state, dict) else None
