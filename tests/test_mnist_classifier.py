"""mnist_classifier.py: the shipped weights, the Frechet distance, and the scale of MnistQuality's scores.

Uses the real MNIST in data/MNIST/raw/ and the shipped mnist_classifier.pt.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from plumbing import data  # noqa: E402
from conftest import run_script  # noqa: E402
from mnist_classifier import accuracy  # noqa: E402
from plumbing.mnist_quality import (DEFAULT_WEIGHTS, Classifier, MnistQuality, frechet_distance,  # noqa: E402
                                    load_classifier, weights_digest)

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


def test_training_script_saves_weights(mnist_dir, tmp_path):
    """One short epoch on conftest's tiny fake MNIST: the script runs, reports, and saves loadable weights."""
    weights = tmp_path / 'classifier.pt'
    proc = run_script('mnist_classifier.py', f'--data_dir={mnist_dir}', f'--weights={weights}', '--train_epoch=1',
                      '--batch_size=64', cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '[1/1] train loss:' in proc.stdout and 'test accuracy:' in proc.stdout
    Classifier().load_state_dict(torch.load(weights, weights_only=True))
    assert [p.name for p in tmp_path.iterdir()] == ['classifier.pt']  # no temp file left behind


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
