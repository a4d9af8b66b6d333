"""A small MNIST classifier, and MnistQuality: scores for GAN samples measured with it.

Train:  python mnist_classifier.py        (any constant below: --name=value, e.g. --train_epoch=5)
        writes mnist_classifier_retrained.pt beside this file; no file is replaced without --overwrite=True,
        least of all the shipped mnist_classifier.pt, the yardstick every MNIST run is scored with
Use:    quality = MnistQuality('data', img_size=64, device='cpu')
        quality.score(images, labels)  ->  {'fid': ..., 'class_entropy': ..., 'class_acc': ...}

fid is a Frechet distance between Gaussians fitted to the classifier's penultimate features of the
images and of the 10,000 MNIST test images (FID with this classifier in place of Inception).
class_entropy is the entropy in nats of the predicted classes: log(10) = 2.303 when every digit is
equally common, 0 when all images look like one digit. class_acc is the share of images classified
as the digit they were generated for.
"""
import hashlib
import math
import os
import time

import common  # noqa: F401  first: from here on a Ctrl-C is one line, even while torch loads
import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.config import configure
from plumbing.data import load_mnist, resize_images, shuffled_batches, to_unit_range
from plumbing.files import check_output_path, load_state_dict, save_torch
from plumbing.images import plot_curves
from plumbing.machine import fail, pick_device, progress, synchronize

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = os.path.join(HERE, 'mnist_classifier.pt')  # shipped: the yardstick MnistQuality scores with
RETRAINED_WEIGHTS = os.path.join(HERE, 'mnist_classifier_retrained.pt')
CLASSIFIER_SIZE = 28   # the classifier reads 28x28 images, MNIST's own size
EVAL_BATCH = 500       # images per forward pass when not training: bounds memory, not results

data_dir = 'data'             # holds MNIST/raw/ with the four IDX files
weights = RETRAINED_WEIGHTS   # non-empty: file the trained state_dict is written to
overwrite = False             # replace the file at --weights if there is one (the shipped one included)
train_epoch = 3               # [1, 10000]: epochs to train
batch_size = 128              # >= 2: images per step
lr = 0.003                    # > 0: peak AdamW learning rate of the one-cycle schedule
weight_decay = 0.0001         # >= 0: AdamW weight decay
device = 'auto'               # auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps
seed = 0                      # [0, 4294967295]: seed of the initial weights and the batch order


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


def load_classifier(path, run_device):
    """The trained classifier in eval mode, or stop with one line saying how to get it."""
    if not os.path.exists(path):
        fail(f"no trained MNIST classifier at {path}; run python mnist_classifier.py to train it")
    model = Classifier()
    retrain = "run python mnist_classifier.py to train it again"
    state = load_state_dict(path, retrain)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        fail(f"{path} does not fit this Classifier; {retrain}")
    return model.to(run_device).eval()


def weights_digest(path):
    """The sha256 of the weights file at path, in hex: pins which yardstick a run's scores were measured with."""
    digest = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
    except OSError as e:
        fail(f"cannot read {path} ({e.strerror or e}); if it is the shipped mnist_classifier.pt, restore it "
             f"from git, else run python mnist_classifier.py to train one")
    return digest.hexdigest()


@torch.no_grad()
def accuracy(model, images, labels):
    """Share of images (N, 1, 28, 28) in [-1, 1] whose predicted class is their label."""
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item()
                  for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)))
    return correct / len(labels)


# ---------------------------------------------------------------- the Frechet distance

def sqrt_eigenvalues(symmetric):
    """Square roots of a symmetric PSD matrix's eigenvalues; rounding's tiny negatives count as 0."""
    return torch.linalg.eigvalsh(symmetric).clamp(min=0).sqrt()


def sqrtm_psd(symmetric):
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(symmetric)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """Frechet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2), in float64.

    |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr(sqrt(sqrt(cov1) cov2 sqrt(cov1))): the matrix
    inside the last square root is symmetric, unlike cov1 cov2, so eigh applies.
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, cov1, mu2, cov2))
    root1 = sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    middle = (middle + middle.T) / 2  # symmetric but for rounding
    distance = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * sqrt_eigenvalues(middle).sum()
    return distance.item()


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
        self.weights, self.digest = weights, weights_digest(weights)  # the yardstick, pinned in each run
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

    @staticmethod
    def plot(history, path):
        """fid and the class shares of a run's history, epoch by epoch."""
        shares = [key for key in ('class_acc', 'class_entropy') if key in history[0]]
        # fid falls from ~1000 to single digits: only a log scale shows the late epochs.
        plot_curves(history, [('fid (lower is better)', ['fid'], 'log'), ('share or nats', shares, 'linear')],
                           path)


# ---------------------------------------------------------------- training

def load_split(train, run_device):
    images, labels = load_mnist(data_dir, train=train)
    return to_unit_range(images.unsqueeze(1)).to(run_device), labels.to(run_device)


def check_weights_path():
    """Stop with one line, before any training, where --weights could not be written or names a file that is
    there already and --overwrite=True was not passed: an hour of training must not end at the save."""
    path = weights
    check_output_path('weights', path, path, os.path.basename(RETRAINED_WEIGHTS))
    if os.path.exists(path) and not overwrite:
        if os.path.exists(DEFAULT_WEIGHTS) and os.path.samefile(path, DEFAULT_WEIGHTS):
            fail(f"--weights={path} is the shipped classifier that scores every MNIST run; pass another --weights "
                 f"(without one it writes {RETRAINED_WEIGHTS}), or add --overwrite=True to replace it", 2)
        fail(f"--weights={path} exists; add --overwrite=True to replace it, or pass another --weights", 2)


def check_batch(n_train):
    """Training takes full batches only: say so before training, in the classifier's own constants (it has no
    --train_limit, which plumbing.data.require_a_batch advises). load_mnist refuses fewer than 2 images."""
    where = os.path.join(data_dir, 'MNIST', 'raw')
    if n_train < batch_size:
        fail(f"--batch_size={batch_size} is more than the {n_train} training images in {where}; "
             f"pass --batch_size={n_train} or lower", 2)


def train(run_device):
    images, labels = load_split(True, run_device)
    check_batch(len(images))
    test_images, test_labels = load_split(False, run_device)
    model = Classifier().to(run_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(images) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=train_epoch * steps_per_epoch)
    total = 0.0
    try:
        for epoch in range(1, train_epoch + 1):
            model.train()
            loss_sum = torch.zeros((), device=run_device)  # read once per epoch, not per step
            start = time.perf_counter()
            batches = shuffled_batches(len(images), batch_size, run_device, seed, epoch)
            for index in progress(batches, f"epoch {epoch}"):
                loss = F.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.detach()
            test_accuracy = accuracy(model, test_images, test_labels)
            synchronize(run_device)
            seconds = time.perf_counter() - start
            total += seconds
            train_loss = loss_sum.item() / len(batches)
            if not math.isfinite(train_loss):
                fail(f"epoch {epoch}: the training loss became {train_loss}; try a lower --lr")
            print(f"[{epoch}/{train_epoch}] train loss: {train_loss:.4f}, test accuracy: {test_accuracy:.4f}, "
                  f"{seconds:.1f} s", flush=True)
    except KeyboardInterrupt:
        fail(f"interrupted; {weights} is written only after the last epoch, so it was not changed. "
                    f"Run the same command again to train", 130)
    save_torch(model.state_dict(), weights)
    print(f"wrote {weights} ({os.path.getsize(weights) / 1e3:.0f} kB) after {total:.0f} s of training; "
          f"test accuracy {test_accuracy:.4f}")


if __name__ == '__main__':
    configure(globals())
    check_weights_path()
    run_device = pick_device(device)
    torch.manual_seed(seed)
    train(run_device)
