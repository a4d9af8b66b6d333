"""The yardstick of the MNIST generators: a small MNIST classifier (trained by mnist_classifier.py) and
MnistQuality, the scores of generated digits measured with it.

    quality = MnistQuality('data', img_size=64, device='cpu')
    quality.score(images, labels)  ->  {'fid': ..., 'class_entropy': ..., 'class_acc': ...}

fid is a Frechet distance between Gaussians fitted to the classifier's penultimate features of the
images and of the 10,000 MNIST test images (FID with this classifier in place of Inception).
class_entropy is the entropy in nats of the predicted classes: log(10) = 2.303 when every digit is
equally common, 0 when all images look like one digit. class_acc is the share of images classified
as the digit they were generated for.
"""
import math
import os
import shlex

import torch
import torch.nn as nn

from plumbing.console import fail
from plumbing.data import load_mnist, resize_images, to_unit_range
from plumbing.frechet import frechet_distance
from plumbing.safe_files import file_sha256, load_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WEIGHTS = os.path.join(REPO, 'mnist_classifier.pt')  # shipped: the yardstick MnistQuality scores with
CLASSIFIER_SIZE = 28   # the classifier reads 28x28 images, MNIST's own size
EVAL_BATCH = 500       # images per forward pass when not training: bounds memory, not results


# ---------------------------------------------------------------- the classifier

def conv_block(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Classifier(nn.Module):
    """conv16-pool-conv32-conv32-pool-conv64-conv64-pool-linear128-linear10, about 145k weights.

    Narrow at full resolution on purpose: on a CPU the 28x28 layers cost the most, and scoring
    must stay cheap enough to run after every GAN epoch.
    """
    FEATURES = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            *conv_block(1, 16), nn.MaxPool2d(2),                          # 14x14
            *conv_block(16, 32), *conv_block(32, 32), nn.MaxPool2d(2),    # 7x7
            *conv_block(32, 64), *conv_block(64, 64), nn.MaxPool2d(2),    # 3x3
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, self.FEATURES), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.FEATURES, 10))
        # Convolutions and max pooling run about twice as fast on a CPU in channels-last layout;
        # the input follows the weights' layout.
        self.to(memory_format=torch.channels_last)

    def features(self, x):
        """(N, 1, 28, 28) images in [-1, 1] -> (N, 128) penultimate activations."""
        return self.body(x)

    def forward(self, x):
        """(N, 1, 28, 28) images in [-1, 1] -> (N, 10) logits."""
        return self.head(self.features(x))


def how_to_restore(path):
    """What makes a classifier at path again: the shipped file from git, or a training run written there."""
    train = shlex.join(['python', 'mnist_classifier.py', f'--weights={path}', '--overwrite=True'])
    if os.path.abspath(path) == DEFAULT_WEIGHTS:
        return (f"restore the shipped file (in a clone: git checkout -- mnist_classifier.pt), or train one there: "
                f"{train}")
    return f"train one there: {train}"


def load_classifier(path, run_device):
    """The trained classifier in eval mode, or stop with one line saying how to get it."""
    if not os.path.exists(path):
        fail(f"no trained MNIST classifier at {path}; {how_to_restore(path)}")
    model = Classifier()
    state = load_state_dict(path, how_to_restore(path))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        fail(f"{path} does not fit this Classifier; {how_to_restore(path)}")
    return model.to(run_device).eval()


def weights_digest(path):
    """The sha256 of the weights file at path, in hex: pins which yardstick a run's scores were measured with."""
    return file_sha256(path, how_to_restore(path))


# ---------------------------------------------------------------- the Gaussian of features

def gaussian(features):
    """Mean and covariance of (N, F) features, in float64."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def class_entropy(predicted):
    """Entropy in nats of the histogram of predicted classes."""
    share = torch.bincount(predicted, minlength=10).double() / len(predicted)
    share = share[share > 0]
    return (share * share.reciprocal().log()).sum().item()  # not -sum(p log p), which gives -0.0


# ---------------------------------------------------------------- scoring generated images

def to_classifier_size(images):
    """Float images (N, 1, S, S) -> (N, 1, 28, 28), antialiased; identity when S is 28."""
    from torchvision.transforms.functional import resize
    if images.shape[-1] == CLASSIFIER_SIZE:
        return images
    return resize(images, [CLASSIFIER_SIZE, CLASSIFIER_SIZE], antialias=True)


class MnistQuality:
    """Scores batches of generated digits at img_size against the MNIST test set.

    The reference images take the same road as generated ones: resized from 28 to img_size, as the
    GANs' training data is, then back to 28 for the classifier. So the blur of resizing costs no
    model anything, and real training images score near the floor at every img_size.
    """

    def __init__(self, data_dir, img_size, device, weights=DEFAULT_WEIGHTS):
        self.img_size = img_size
        self.device = torch.device(device)
        self.classifier = load_classifier(weights, self.device)
        self.yardstick = {'classifier': weights, 'sha256': weights_digest(weights)}  # pinned in each run
        images, _ = load_mnist(data_dir, train=False)
        reference = to_unit_range(resize_images(images, img_size))
        features, _ = self._classify(reference)
        self.mu, self.cov = gaussian(features)

    @torch.no_grad()
    def _classify(self, images):
        """Features (N, F) and predicted classes (N,) of float images (N, 1, img_size, img_size)."""
        features, predicted = [], []
        for batch in images.split(EVAL_BATCH):
            f = self.classifier.features(to_classifier_size(batch.to(self.device, torch.float32)))
            features.append(f)
            predicted.append(self.classifier.head(f).argmax(1))
        return torch.cat(features), torch.cat(predicted)

    def score(self, images, labels=None):
        """fid, class_entropy and (given labels) class_acc of images (N, 1, img_size, img_size) in [-1, 1]."""
        expected = (1, self.img_size, self.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or len(images) < 2:
            raise ValueError(f"score() takes at least 2 images of shape (N, {', '.join(map(str, expected))}); "
                             f"got {tuple(images.shape)}")
        if not torch.isfinite(images).all():  # a diverged generator: no distance to measure, and eigh would fail
            names = ('fid', 'class_entropy') + (('class_acc',) if labels is not None else ())
            return dict.fromkeys(names, math.nan)
        features, predicted = self._classify(images)
        scores = {'fid': frechet_distance(*gaussian(features), self.mu, self.cov),
                  'class_entropy': class_entropy(predicted.cpu())}
        if labels is not None:
            scores['class_acc'] = (predicted.cpu() == labels.cpu()).double().mean().item()
        return scores
