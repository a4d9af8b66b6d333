"""Measuring the MNIST generators (README): the shipped classifier, the Frechet distance, the scale of
MnistQuality's scores, the digest that pins a run to the classifier, and the collapse check.

The scores use the real MNIST in data/MNIST/raw/ and the shipped mnist_classifier.pt; mnist_classifier.py,
which trains a classifier, is tested in test_tools.py.
"""
import hashlib
import math
import os

import pytest
import torch

from plumbing import data
from plumbing.collapse import CollapseCheck
from plumbing.results_folder import RunFolder
from conftest import REPO, as_if_made_with, history, run_script, tiny_args
from mnist_classifier import accuracy
from plumbing.mnist_quality import (DEFAULT_WEIGHTS, Classifier, MnistQuality, frechet_distance, load_classifier,
                                    weights_digest)

DATA = str(REPO / 'data')
N = 2000
FLOOR = 5.0  # fid of N real training images is about 1.5-2.5: the sampling noise of N images


@pytest.fixture(scope='module')
def train_set():
    return data.load_mnist(DATA, train=True)


@pytest.fixture(scope='module')
def real(train_set):
    """N random training images (uint8, 28x28) and their labels."""
    images, labels = train_set
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:N]
    return images[index], labels[index]


@pytest.fixture(scope='module')
def quality():
    return MnistQuality(DATA, 28, 'cpu')


def at_size(images_uint8, size):
    """Images as a GAN trained at size sees them: resized, in [-1, 1]."""
    return data.to_unit_range(data.resize_images(images_uint8, size))


def uniform_noise(size):
    return torch.rand(N, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------- the classifier

def test_shipped_weights_are_small_and_load_safely():
    assert os.path.getsize(DEFAULT_WEIGHTS) < 1_000_000
    state = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    Classifier().load_state_dict(state)


def test_shipped_classifier_reaches_99_percent_on_the_test_set():
    images, labels = data.load_mnist(DATA, train=False)
    model = load_classifier(DEFAULT_WEIGHTS, torch.device('cpu'))
    assert accuracy(model, data.to_unit_range(images.unsqueeze(1)), labels) >= 0.99


def test_features_are_the_penultimate_layer():
    model = load_classifier(DEFAULT_WEIGHTS, torch.device('cpu'))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (4, Classifier.FEATURES)
        torch.testing.assert_close(model.head(features), model(x))


def test_missing_weights_say_how_to_train(tmp_path, capsys):
    with pytest.raises(SystemExit):
        MnistQuality(DATA, 28, 'cpu', weights=str(tmp_path / 'absent.pt'))
    assert 'python mnist_classifier.py' in capsys.readouterr().err


def test_the_advice_for_a_missing_classifier_writes_one_where_it_is_looked_for(tmp_path, mnist_dir, capsys):
    from plumbing.mnist_quality import load_classifier
    path = tmp_path / 'mnist_classifier.pt'
    with pytest.raises(SystemExit):
        load_classifier(str(path), 'cpu')
    line = capsys.readouterr().err
    assert line == (f"error: no trained MNIST classifier at {path}; train one there: python mnist_classifier.py "
                    f"--weights={path} --overwrite=True\n")
    advised = line.split('train one there: python ')[1].split()
    result = run_script(*advised, f'--data_dir={mnist_dir}', '--train_epoch=1', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_classifier(str(path), 'cpu') is not None


def test_the_shipped_classifiers_advice_restores_it(monkeypatch, tmp_path, capsys):
    from plumbing import mnist_quality
    monkeypatch.setattr(mnist_quality, 'DEFAULT_WEIGHTS', str(tmp_path / 'mnist_classifier.pt'))
    with pytest.raises(SystemExit):
        mnist_quality.load_classifier(mnist_quality.DEFAULT_WEIGHTS, 'cpu')
    advice = capsys.readouterr().err
    assert 'restore the shipped file (in a clone: git checkout -- mnist_classifier.pt), or train one there: ' \
           f'python mnist_classifier.py --weights={tmp_path}/mnist_classifier.pt --overwrite=True' in advice


# ---------------------------------------------------------------- the Frechet distance

def test_frechet_distance_of_identical_gaussians_is_zero():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, generator=generator, dtype=torch.float64)
    mu, cov = torch.randn(20, generator=generator, dtype=torch.float64), a @ a.T
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians():
    # |mu1 - mu2|^2 = 1 + 4, and per axis (sd1 - sd2)^2 = (1 - 2)^2 + (2 - 3)^2
    distance = frechet_distance(torch.tensor([0., 0.]), torch.diag(torch.tensor([1., 4.])),
                                torch.tensor([1., 2.]), torch.diag(torch.tensor([4., 9.])))
    assert distance == pytest.approx(7, abs=1e-9)


def test_frechet_distance_of_non_commuting_covariances():
    # For 2x2 PSD M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); here M's trace is tr(C1 C2), its det det(C1) det(C2).
    c1 = torch.tensor([[2., 1.], [1., 2.]], dtype=torch.float64)
    c2 = torch.tensor([[3., 0.], [0., 1.]], dtype=torch.float64)
    trace_sqrt = math.sqrt((c1 @ c2).trace().item() + 2 * math.sqrt(torch.det(c1).item() * torch.det(c2).item()))
    expected = c1.trace().item() + c2.trace().item() - 2 * trace_sqrt
    zero = torch.zeros(2)
    assert frechet_distance(zero, c1, zero, c2) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------- the scale of the scores

def test_real_images_score_near_the_floor(quality, real):
    images, labels = real
    scores = quality.score(at_size(images, 28), labels)
    assert all(type(v) is float for v in scores.values())
    assert scores['fid'] < FLOOR
    assert scores['class_entropy'] == pytest.approx(math.log(10), abs=0.02)
    assert scores['class_acc'] > 0.97


def test_shifted_labels_score_near_zero_class_accuracy(quality, real):
    images, labels = real
    assert quality.score(at_size(images, 28), (labels + 1) % 10)['class_acc'] < 0.01


def test_uniform_noise_scores_a_far_larger_fid(quality):
    assert quality.score(uniform_noise(28))['fid'] > 50 * FLOOR


def test_one_digit_collapse_scores_a_large_fid_and_no_class_entropy(quality, train_set):
    images, labels = train_set
    ones = images[labels == 1][:N]
    scores = quality.score(at_size(ones, 28))
    assert scores['fid'] > 50 * FLOOR
    assert scores['class_entropy'] < 0.05


def test_score_rejects_images_of_another_size(quality):
    with pytest.raises(ValueError, match='shape'):
        quality.score(torch.zeros(8, 1, 32, 32))


@pytest.mark.parametrize('size', [32, 64])
def test_other_image_sizes_score_real_images_near_the_floor(size, real):
    images, labels = real
    quality = MnistQuality(DATA, size, 'cpu')
    scores = quality.score(at_size(images, size), labels)
    assert scores['fid'] < FLOOR
    assert scores['class_entropy'] == pytest.approx(math.log(10), abs=0.02)
    assert scores['class_acc'] > 0.97
    assert quality.score(uniform_noise(size))['fid'] > 50 * FLOOR


# ---------------------------------------------------------------- the yardstick's digest

SHIPPED_DIGEST = '2d128113b3ac01732ba7a62cbfc48d60f81012a89553384291cf5005220925cb'  # sha256sum mnist_classifier.pt


def test_the_shipped_weights_are_the_ones_every_score_was_measured_with():
    """Every fid in the README and docs/results.md was measured with this file: a retrained one changes them all."""
    assert weights_digest(DEFAULT_WEIGHTS) == SHIPPED_DIGEST


def test_weights_digest_is_the_sha256_of_the_file(tmp_path):
    a, b = tmp_path / 'a.pt', tmp_path / 'b.pt'
    a.write_bytes(b'\x00' * (3 << 20) + b'a')  # beyond one read of 1 MiB: every chunk counts
    b.write_bytes(b'\x00' * (3 << 20) + b'b')
    assert weights_digest(str(a)) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(DEFAULT_WEIGHTS) == hashlib.sha256(open(DEFAULT_WEIGHTS, 'rb').read()).hexdigest()


def test_weights_digest_of_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        weights_digest(tmp_path / 'absent.pt')
    assert stop.value.code == 1
    assert capsys.readouterr().err == (
        f"error: cannot read {tmp_path / 'absent.pt'} (No such file or directory); train one there: "
        f"python mnist_classifier.py --weights={tmp_path / 'absent.pt'} --overwrite=True\n")


# ---------------------------------------------------------------- the collapse check

def test_a_forced_collapse_is_reported_and_the_best_generator_kept(mnist_dir, tmp_path):
    out = tmp_path / 'collapsing'
    args = tiny_args('mnist_cgan.py', mnist_dir, out, 2)
    assert run_script('mnist_cgan.py', *args, cwd=tmp_path).returncode == 0
    best_before = (out / 'MNIST_cGAN_generator_best.pt').read_bytes()
    best_epoch = min(history(out, 'MNIST_cGAN')['epochs'], key=lambda e: e['fid'])['epoch']
    # An absurd learning rate wrecks the generator in one epoch; its fid soars over its best.
    as_if_made_with(out / 'checkpoint.pt', lr=0.5)
    collapse = ['--train_epoch=6', '--lr=0.5', '--collapse_factor=1.3', '--stop_on_collapse=true']
    result = run_script('mnist_cgan.py', *args, *collapse, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'COLLAPSE at epoch 3: fid ' in result.stdout and 'stopping (stop_on_collapse)' in result.stdout
    assert [e['epoch'] for e in history(out, 'MNIST_cGAN')['epochs']] == [1, 2, 3]
    assert (out / 'MNIST_cGAN_generator_best.pt').read_bytes() == best_before
    assert f'best generator: epoch {best_epoch}' in result.stdout


def run_with_losses(tmp_path, losses_d):
    """A Run whose history holds epochs with these mean D losses, the last one just finished."""
    run = RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    run.history = [{'epoch': epoch, 'loss_d': loss_d} for epoch, loss_d in enumerate(losses_d, 1)]
    return run


@pytest.mark.parametrize('smoothing, loss_d, collapsed', [(0.0, 0.03, True), (0.0, 0.34, False),
                                                         (0.1, 0.34, True), (0.1, 0.45, False)])
def test_a_discriminator_at_its_least_loss_is_a_collapse(tmp_path, capsys, smoothing, loss_d, collapsed):
    # With real targets of 0.9, D's loss cannot go below 0.325: a D that wins outright sits there, not at 0.
    run = run_with_losses(tmp_path, [0.9, 0.8, loss_d])
    assert CollapseCheck(smoothing, stop_on_collapse=True).stops(run) == collapsed
    assert ('COLLAPSE at epoch 3' in capsys.readouterr().out) == collapsed


@pytest.mark.parametrize('first_epochs', [[0.027], [0.027, 0.01]])
def test_a_discriminator_winning_from_the_start_is_not_a_collapse(tmp_path, capsys, first_epochs):
    # Measured here: the MNIST DCGAN at d = 16 began with loss_d 0.027 over epoch 1 and then learned normally.
    run = run_with_losses(tmp_path, first_epochs)
    assert not CollapseCheck(0.0, stop_on_collapse=True).stops(run)
    assert 'COLLAPSE' not in capsys.readouterr().out
