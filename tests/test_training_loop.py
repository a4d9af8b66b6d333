"""What every script's training step and epoch really do, watched from outside through model and optimizer hooks.

Each script's command line runs in this process (run_in_process) while a ModelWatch records every call of its
Generator and Discriminator. The expectations come from the experiments' definitions, not from the scripts'
helpers: the README (the table of the scripts, Reading order, Departures from the originals) and the papers
(Goodfellow et al. 2014 for the losses, Mirza & Osindero 2014 for the labels): which images and labels D is
shown, the losses of D's outputs, the batch order, the average of G's weights, and the learning rate of every
optimizer step. And whole runs, compared by their histories: the same seed trains to the same losses, and the
average changes what is sampled, not the training.
"""
import importlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ModelWatch, fake_digits, history, run_in_process, run_script, tiny_args, write_faces

MNIST_LIMIT, MNIST_BATCH = 128, 32
FACES = {'female': 24, 'male': 16}
FACES_BATCH = 8

# script, model name, conditional
SCRIPTS = [('mnist_gan.py', 'MNIST_GAN', False), ('mnist_cgan.py', 'MNIST_cGAN', True),
           ('mnist_dcgan.py', 'MNIST_DCGAN', False), ('mnist_cdcgan.py', 'MNIST_cDCGAN', True),
           ('celeba_dcgan.py', 'CelebA_DCGAN', False), ('celeba_cdcgan.py', 'CelebA_cDCGAN', True)]
CONDITIONAL = [s[0] for s in SCRIPTS if s[2]]
NOISY = ['mnist_cgan.py', 'mnist_cdcgan.py']  # the scripts with instance_noise (README, Departures from the originals)

# The schedules of the README's table of the scripts: (epochs, the epochs at whose start the lr is divided by
# 10); lr 0.0002, the originals' (README, Departures from the originals).
SCHEDULES = {'mnist_gan.py': (100, ()), 'mnist_cgan.py': (50, (30, 40)), 'mnist_dcgan.py': (20, ()),
             'mnist_cdcgan.py': (20, (11, 16)), 'celeba_dcgan.py': (20, (11, 16)),
             'celeba_cdcgan.py': (20, (11, 16))}
DOCUMENTED_LR = 0.0002


def documented_lr(script, epoch):
    _, drops = SCHEDULES[script]
    return DOCUMENTED_LR * 0.1 ** sum(epoch >= drop for drop in drops)


@pytest.fixture(scope='module')
def faces_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('faces') / 'faces'
    write_faces(folder, FACES)
    return folder


def data_args(script, mnist_dir, faces_dir):
    if script.startswith('mnist'):
        width = ['--d=8'] if 'dcgan' in script else []
        # No instance noise: these tests follow each image to D exactly (the noise has its own test below).
        noise = ['--instance_noise=0'] if script in NOISY else []
        return [f'--data_dir={mnist_dir}', '--quality_samples=0', *width, *noise]
    return [f'--data_dir={faces_dir}', '--d=8', '--quality_samples=0']


def training_images(script, faces_dir):
    """The training set as the test knows it, independently of the scripts' loaders: [-1, 1] images and labels."""
    if script.startswith('mnist'):
        images, labels = fake_digits(512, 0)  # what conftest's mnist_dir holds
        return images[:MNIST_LIMIT, None].float() / 127.5 - 1, labels[:MNIST_LIMIT].long()
    pictures, labels = [], []
    for label, cls in enumerate(('female', 'male')):
        for name in sorted(os.listdir(faces_dir / cls)):
            with Image.open(faces_dir / cls / name) as im:
                pictures.append(torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(pictures).float() / 127.5 - 1, torch.tensor(labels)


def identify(x, reference):
    """The index in reference of each image of x and its distance relative to the second nearest: far below 1
    means it is that training image and no other. The reference is resized to x's size first (antialiased), as
    the README says the MNIST images are for the 32 and 64 pixel models."""
    if x.shape[-1] != reference.shape[-1]:
        reference = F.interpolate(reference, size=x.shape[-2:], mode='bilinear', antialias=True)
    distances = torch.cdist(x.float().flatten(1), reference.flatten(1))
    nearest, index = distances.topk(2, largest=False)
    return index[:, 0], nearest[:, 0] / nearest[:, 1]


@pytest.fixture(scope='module', params=[s[0] for s in SCRIPTS])
def watched(request, mnist_dir, faces_dir, tmp_path_factory):
    """Each script trained 2 tiny epochs in this process, every G and D call and G's weights after each step
    recorded; the D calls sorted into real images (with their training-set indices) and G's fakes."""
    script = request.param
    model = next(m for s, m, _ in SCRIPTS if s == script)
    conditional = script in CONDITIONAL
    out = tmp_path_factory.mktemp(model) / 'out'
    batch = MNIST_BATCH if script.startswith('mnist') else FACES_BATCH
    limit = [f'--train_limit={MNIST_LIMIT}'] if script.startswith('mnist') else []
    with ModelWatch(keep_generator_states=True) as watch:
        run_in_process(script, *data_args(script, mnist_dir, faces_dir), f'--results_dir={out}', '--train_epoch=2',
                       f'--batch_size={batch}', '--device=cpu', *limit)
    images, labels = training_images(script, faces_dir)
    made = watch.of('Generator')
    real, fakes = [], []
    for call in watch.of('Discriminator'):
        x = call.inputs[0].float()
        maker = next((g for g in made if torch.equal(g.output, x)), None)
        if maker is not None:
            fakes.append((call, maker))
            continue
        index, closeness = identify(x, images)
        assert closeness.max() < 0.2, f'{script}: D was shown images that are neither G\'s nor training images'
        real.append((call, index))
    steps_per_epoch = len(images) // batch
    return dict(script=script, model=model, conditional=conditional, out=out, watch=watch, real=real, fakes=fakes,
                labels=labels, n_images=len(images), batch=batch, steps_per_epoch=steps_per_epoch,
                history=json.loads((out / f'{model}_train_hist.json').read_text()))


def test_every_step_shows_d_one_real_batch_and_g_s_fake_batch_twice(watched):
    """One real batch per step; the fake batch goes to D twice, detached for D's step and attached for G's."""
    steps = 2 * watched['steps_per_epoch']
    assert len(watched['watch'].of('Generator')) == steps and len(watched['real']) == steps
    detached = [call for call, _ in watched['fakes'] if not call.input_requires_grad]
    attached = [call for call, _ in watched['fakes'] if call.input_requires_grad]
    assert len(detached) == len(attached) == steps


def test_real_images_reach_d_with_their_own_labels(watched):
    if not watched['conditional']:
        pytest.skip('unconditional model')
    for call, index in watched['real']:
        assert torch.equal(call.inputs[1].cpu(), watched['labels'][index]), 'real images paired with other labels'


def test_fake_images_reach_d_with_the_labels_they_were_made_for(watched):
    if not watched['conditional']:
        pytest.skip('unconditional model')
    for call, maker in watched['fakes']:
        assert torch.equal(call.inputs[1], maker.inputs[1]), 'fakes judged against other labels than their own'
    # And the labels asked of G come from every class.
    drawn = torch.cat([g.inputs[1] for g in watched['watch'].of('Generator')])
    assert set(drawn.tolist()) == set(range(10 if 'mnist' in watched['script'] else 2))


def step_logits(watched):
    """Per training step, in order: D's logits for the real batch, the detached fakes and the fakes G learns from."""
    real = [call.output for call, _ in watched['real']]
    detached = [call.output for call, _ in watched['fakes'] if not call.input_requires_grad]
    attached = [call.output for call, _ in watched['fakes'] if call.input_requires_grad]
    return list(zip(real, detached, attached))


def test_the_history_holds_the_documented_losses_of_d_s_outputs(watched):
    """loss_d = BCE(D(x), 1 - label_smoothing) + BCE(D(G(z)), 0); loss_g = BCE(D(G(z)), 1), the non-saturating
    G loss; D(x), D(G(z)) the mean probabilities; each the mean over the epoch's steps."""
    real_target = 1 - watched['history']['config']['label_smoothing']

    def bce(logits, target):
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
    per_step = torch.tensor([[bce(real, real_target) + bce(fake, 0), bce(for_g, 1), real.sigmoid().mean(),
                              fake.sigmoid().mean()] for real, fake, for_g in step_logits(watched)])
    for epoch in (1, 2):
        n = watched['steps_per_epoch']
        expected = per_step[(epoch - 1) * n: epoch * n].mean(0).tolist()
        entry = watched['history']['epochs'][epoch - 1]
        recorded = [entry[key] for key in ('loss_d', 'loss_g', 'd_real', 'd_fake')]
        assert recorded == pytest.approx(expected, rel=1e-4, abs=1e-6), 'loss_d, loss_g, D(x), D(G(z))'


def test_every_epoch_is_a_fresh_permutation_in_full_batches(watched):
    n, batch, steps = watched['n_images'], watched['batch'], watched['steps_per_epoch']
    epochs = []
    for epoch in range(2):
        batches = [index for _, index in watched['real'][epoch * steps:(epoch + 1) * steps]]
        assert all(len(index) == batch for index in batches), 'a partial batch'
        order = torch.cat(batches)
        assert len(order.unique()) == len(order) == n // batch * batch, 'an image twice in one epoch'
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1]), 'the second epoch repeats the first epoch\'s order'
    assert not torch.equal(epochs[0], torch.arange(len(epochs[0]))), 'the images in file order, not shuffled'


def test_the_saved_generator_is_the_moving_average_of_g_s_weights(watched):
    """README (Departures from the originals): the saved G is an exponential moving average of G's weights, with
    a short warm-up; as plumbing/moving_average.py spells it out, of G's weights and BatchNorm statistics after
    each step, its first value G itself, then decay min(ema_decay, (1 + n) / (10 + n)) after n averaged steps."""
    decay = watched['history']['config']['ema_decay']
    states = watched['watch'].generator_states
    assert len(states) == 2 * watched['steps_per_epoch']
    average = {name: tensor.clone() for name, tensor in states[0].items()}
    for n, state in enumerate(states[1:], start=1):
        keep = min(decay, (1 + n) / (10 + n))
        for name, tensor in state.items():
            if tensor.is_floating_point():
                average[name] = keep * average[name] + (1 - keep) * tensor
            else:  # BatchNorm's step counter
                average[name] = tensor.clone()
    saved = torch.load(watched['out'] / f"{watched['model']}_generator.pt", weights_only=True)
    assert saved.keys() == average.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], average[name], rtol=1e-5, atol=1e-6, msg=name)
    # Not G itself: the average lags behind the last step.
    assert any(not torch.equal(saved[name], states[-1][name]) for name in saved)


# ---------------------------------------------------------------- learning-rate schedules

def original_schedule(script):
    """The overrides that give a script its original's schedule: the cGAN keeps its lr unless told otherwise."""
    return ['--constant_lr=False'] if script == 'mnist_cgan.py' else []


@pytest.mark.parametrize('script', [script for script, (_, drops) in SCHEDULES.items() if drops])
def test_learning_rate_follows_the_documented_schedule(script, monkeypatch):
    module = importlib.import_module(script[:-3])
    if original_schedule(script):
        monkeypatch.setattr(module, 'constant_lr', False)
    epochs, _ = SCHEDULES[script]
    assert module.train_epoch == epochs and module.lr == DOCUMENTED_LR
    assert [module.learning_rate(e) for e in range(1, epochs + 1)] == \
           pytest.approx([documented_lr(script, e) for e in range(1, epochs + 1)], rel=1e-12)


def test_the_cgan_keeps_its_learning_rate_unless_told_to_drop_it_as_the_original():
    """constant_lr (docs/results.md: the drops undo G's moving average): 0.0002 for all 50 epochs by default."""
    module = importlib.import_module('mnist_cgan')
    assert module.constant_lr is True
    assert [module.learning_rate(e) for e in range(1, 51)] == [DOCUMENTED_LR] * 50


class OptimizerSteps:
    """The learning rate of every optimizer step while active, per optimizer."""

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        self.lrs = {}
        self._hook = register_optimizer_step_pre_hook(
            lambda optimizer, args, kwargs: self.lrs.setdefault(id(optimizer), []).append(
                [group['lr'] for group in optimizer.param_groups]))
        return self

    def __exit__(self, *exc):
        self._hook.remove()


@pytest.mark.parametrize('script', list(SCHEDULES))
def test_both_optimizers_use_the_scheduled_rate_every_epoch(script, mnist_dir, faces_dir, tmp_path):
    """The whole documented schedule at one step per epoch (one batch of 2 images): every step of both optimizers
    at the rate of its epoch. The schedules without decay run 3 epochs: their rate never changes."""
    epochs, drops = SCHEDULES[script]
    epochs = epochs if drops else 3
    size = ['--img_size=8'] if script in ('mnist_gan.py', 'mnist_cgan.py') else []  # small weights to checkpoint
    with OptimizerSteps() as steps:
        run_in_process(script, *data_args(script, mnist_dir, faces_dir), f'--results_dir={tmp_path / "out"}',
                       f'--train_epoch={epochs}', '--batch_size=2', '--train_limit=2', '--device=cpu', *size,
                       *original_schedule(script))
    assert len(steps.lrs) == 2, 'one optimizer for G, one for D'
    expected = [documented_lr(script, epoch) for epoch in range(1, epochs + 1)]
    for lrs in steps.lrs.values():
        assert all(len(groups) == 1 for groups in lrs)
        assert [groups[0] for groups in lrs] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- whole runs: the seed, and what the EMA changes

def test_same_seed_same_losses_on_cpu(mnist_dir, tmp_path):
    runs = [tmp_path / 'a', tmp_path / 'b']
    for out in runs:
        result = run_script('mnist_gan.py', *tiny_args('mnist_gan.py', mnist_dir, out, 2), cwd=tmp_path)
        assert result.returncode == 0
    first, second = (history(out, 'MNIST_GAN')['epochs'] for out in runs)
    assert [e['loss_g'] for e in first] == [e['loss_g'] for e in second]


@pytest.mark.parametrize('script, model', [('mnist_cgan.py', 'MNIST_cGAN'), ('mnist_dcgan.py', 'MNIST_DCGAN')])
def test_the_ema_changes_what_is_sampled_and_not_the_training(mnist_dir, tmp_path, script, model):
    """docs/results.md's defaults against the original recipe rest on this: --ema_decay=0 trains to the very
    same losses (README, Departures from the originals)."""
    runs = {'ema': [], 'original': ['--ema_decay=0']}
    for name, extra in runs.items():
        result = run_script(script, *tiny_args(script, mnist_dir, tmp_path / name, 2), *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    ema, original = (history(tmp_path / name, model)['epochs'] for name in runs)
    training = ('loss_d', 'loss_g', 'd_real', 'd_fake')
    assert [[e[k] for k in training] for e in ema] == [[e[k] for k in training] for e in original]
    assert [e['fid'] for e in ema] != [e['fid'] for e in original]


# ---------------------------------------------------------------- instance noise, the conditional models' remedy

# The instance noise of the README's Departures from the originals, by default.
DOCUMENTED_NOISE = {'mnist_cgan.py': 0.1, 'mnist_cdcgan.py': 0.2}


def noisy_steps(script, mnist_dir, out, sigma=None):
    """The script trained one tiny epoch in this process with instance noise sigma (None: its default): per step,
    D's calls on the real batch, on the detached fakes and on the fakes G learns from, and G's call."""
    args = [arg for arg in data_args(script, mnist_dir, None) if not arg.startswith('--instance_noise')]
    args += [] if sigma is None else [f'--instance_noise={sigma}']
    with ModelWatch() as watch:
        run_in_process(script, *args,
                       f'--results_dir={out}', '--train_epoch=1', f'--batch_size={MNIST_BATCH}',
                       f'--train_limit={MNIST_LIMIT}', '--device=cpu')
    d_calls, g_calls = watch.of('Discriminator'), watch.of('Generator')
    steps = MNIST_LIMIT // MNIST_BATCH
    assert len(d_calls) == 3 * steps and len(g_calls) == steps
    return [(*d_calls[3 * k: 3 * k + 3], g_calls[k]) for k in range(steps)]


@pytest.mark.parametrize('script', NOISY)
def test_instance_noise_is_on_every_image_d_sees_and_fresh_each_time(script, mnist_dir, tmp_path):
    """instance_noise (Sonderby et al. 2017): D sees the real batch and both passes of the fakes through Gaussian
    noise of that standard deviation, drawn anew for every image it sees; G's own images are left as they are."""
    sigma = 0.05  # small beside the distance between two training images, so each real one is known
    images, _ = training_images(script, None)
    real_noise, fake_noise = [], []
    for real, detached, attached, made in noisy_steps(script, mnist_dir, tmp_path / 'out', sigma):
        x = real.inputs[0].float()
        index, closeness = identify(x, images)
        assert closeness.max() < 0.5, 'D was shown images that are not training images with a little noise'
        seen_without_noise = F.interpolate(images[index], size=x.shape[-2:], mode='bilinear', antialias=True)
        real_noise.append(x - seen_without_noise)  # the cDCGAN's 32 pixels: the images resized as the README says
        assert made.output.abs().max() <= 1, 'G\'s images are noisy themselves'
        first, second = detached.inputs[0] - made.output, attached.inputs[0] - made.output
        assert not torch.allclose(first, second), 'the same noise on the fakes in D\'s step and in G\'s'
        fake_noise += [first, second]
    for seen in (torch.cat(real_noise), torch.cat(fake_noise)):
        assert not any(torch.allclose(batch[0], batch[1]) for batch in seen.split(MNIST_BATCH)), 'one noise a batch'
        assert abs(seen.mean().item()) < 0.002 and seen.std().item() == pytest.approx(sigma, rel=0.02)


@pytest.mark.parametrize('script', NOISY)
def test_the_default_instance_noise_is_the_documented_one(script, mnist_dir, tmp_path):
    """By default D sees G's images through the documented noise."""
    sigma = DOCUMENTED_NOISE[script]
    for _, detached, attached, made in noisy_steps(script, mnist_dir, tmp_path / 'out'):
        for seen in (detached, attached):
            added = seen.inputs[0] - made.output
            assert added.std().item() == pytest.approx(sigma, rel=0.05)
