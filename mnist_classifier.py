"""Trains the small MNIST classifier that scores the MNIST generators (plumbing/mnist_quality.py holds it
and the scores: fid, class_entropy, class_acc).

Train:  python mnist_classifier.py        (any constant below: --name=value, e.g. --train_epoch=5)
        writes mnist_classifier_retrained.pt beside this file; no file is replaced without --overwrite=True,
        least of all the shipped mnist_classifier.pt, the yardstick every MNIST run is scored with
"""
import math
import os
import time

import common  # noqa: F401  first: from here on a Ctrl-C is one line, even while torch loads
import torch
import torch.nn.functional as F

from plumbing.config import configure
from plumbing.console import fail, progress
from plumbing.data import load_mnist, shuffled_batches, to_unit_range
from plumbing.hardware import pick_device, synchronize
from plumbing.mnist_quality import DEFAULT_WEIGHTS, EVAL_BATCH, Classifier
from plumbing.safe_files import check_output_path, save_torch

RETRAINED_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_classifier_retrained.pt')

data_dir = 'data'             # holds MNIST/raw/ with the four IDX files
weights = RETRAINED_WEIGHTS   # non-empty: file the trained state_dict is written to
overwrite = False             # replace the file at --weights if there is one (the shipped one included)
train_epoch = 3               # [1, 10000]: epochs to train
batch_size = 128              # >= 2: images per step
lr = 0.003                    # > 0: peak AdamW learning rate of the one-cycle schedule
weight_decay = 0.0001         # >= 0: AdamW weight decay
device = 'auto'               # auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps
seed = 0                      # [0, 4294967295]: seed of the initial weights and the batch order


# ---------------------------------------------------------------- training

@torch.no_grad()
def accuracy(model, images, labels):
    """Share of images (N, 1, 28, 28) in [-1, 1] whose predicted class is their label."""
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item()
                  for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)))
    return correct / len(labels)


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
    --train_limit). load_mnist refuses fewer than 2 images."""
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
