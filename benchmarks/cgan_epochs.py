"""The MNIST cGAN epoch by epoch, from a copy of its checkpoint after every epoch: what changes late in training.

Copies:  python mnist_cgan.py --results_dir=R &  while sleep 2; do ...; done   (see docs/results.md: a loop that
         copies R/checkpoint.pt to R_epochs/ each time it is replaced)
Measure: python benchmarks/cgan_epochs.py R_epochs/ R_epochs.json          (a few minutes on one core)
Plot:    python benchmarks/cgan_epochs.py --plot A.json,B.json 'label A,label B' docs/cgan_late_epochs.png

For each epoch: D's mean output (sigmoid) on 10,000 training images (a fixed random draw) and on the 10,000
test images, in train mode and batches of 128 as D sees real images in training; on 10,000 fakes of the raw
G; and the fid and class_acc (2,000 samples of the run's fixed inputs, as the run scores them) of the
averaged G and of the raw G, each with its BatchNorm's running statistics (eval) and with batch statistics.
"""
import copy
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist_cgan  # noqa: E402  (the repository is on the path from here)
from plumbing.data import load_mnist, to_unit_range  # noqa: E402
from plumbing.mnist_quality import MnistQuality  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


@torch.no_grad()
def mean_output(D, images, labels):
    D = copy.deepcopy(D).train()  # batch statistics, as in training; the copy's running statistics may change
    outputs = [D(x, y).sigmoid() for x, y in zip(images.split(128), labels.split(128)) if len(x) == 128]
    return torch.cat(outputs).mean().item()


@torch.no_grad()
def scores(G, quality, z, labels, batch_statistics):
    G = copy.deepcopy(G).train(batch_statistics)
    return quality.score(torch.cat([G(a, b) for a, b in zip(z.split(128), labels.split(128))]), labels)


def measure(epochs_dir):
    quality = MnistQuality(DATA, 28, 'cpu')
    train_x, train_y = load_mnist(DATA, train=True)
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:10_000]
    train_x, train_y = to_unit_range(train_x[pick].unsqueeze(1)), train_y[pick]
    test_x, test_y = load_mnist(DATA, train=False)
    test_x = to_unit_range(test_x.unsqueeze(1))
    rows = []
    for path in sorted(glob.glob(os.path.join(epochs_dir, '*.pt'))):
        state = torch.load(path, weights_only=True)
        D, G, averaged = mnist_cgan.Discriminator(), mnist_cgan.Generator(), mnist_cgan.Generator()
        D.load_state_dict(state['models']['discriminator'])
        G.load_state_dict(state['models']['generator'])
        average = state['models']['generator_average']
        averaged.load_state_dict({k.removeprefix('module.'): v for k, v in average.items() if k.startswith('module.')})
        draw = torch.Generator().manual_seed(state['epoch'])
        fake_z = torch.rand(10_000, mnist_cgan.z_dim, generator=draw)
        fake_labels = torch.randint(0, 10, (10_000,), generator=draw)
        raw = copy.deepcopy(G).train()
        with torch.no_grad():
            fakes = torch.cat([raw(a, b) for a, b in zip(fake_z.split(128), fake_labels.split(128))])
        row = {'epoch': state['epoch'], 'lr': state['optimizers']['generator']['param_groups'][0]['lr'],
               'd_train': mean_output(D, train_x, train_y), 'd_test': mean_output(D, test_x, test_y),
               'd_fake': mean_output(D, fakes, fake_labels)}
        z, labels = state['fixed']['quality_z'], state['fixed']['quality_labels']
        for name, model, batch_statistics in (('ema_eval', averaged, False), ('ema_batch', averaged, True),
                                              ('raw_eval', G, False), ('raw_batch', G, True)):
            s = scores(model, quality, z, labels, batch_statistics)
            row[f'fid_{name}'], row[f'acc_{name}'] = s['fid'], s['class_acc']
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(paths, labels, output):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    runs = [(json.load(open(p)), label, style) for p, label, style in zip(paths, labels, ('-', '--', ':'))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for rows, label, style in runs:
        epochs = [r['epoch'] for r in rows]
        left.plot(epochs, [r['fid_ema_eval'] for r in rows], style, color='C0', label=f'averaged G, {label}')
        left.plot(epochs, [r['fid_raw_eval'] for r in rows], style, color='C1', label=f'raw G, {label}')
        right.plot(epochs, [r['d_train'] for r in rows], style, color='C2', label=f'training images, {label}')
        right.plot(epochs, [r['d_test'] for r in rows], style, color='C3', label=f'test images, {label}')
    left.set_yscale('log')
    left.set_ylim(2, 60)
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.yaxis.set_minor_formatter(ScalarFormatter())
    left.set_ylabel('fid (2,000 samples; lower is better)')
    left.set_title('fid by epoch')
    right.set_ylabel("D's mean output (sigmoid)")
    right.set_title('D on 10,000 training and the 10,000 test images')
    for ax in (left, right):
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=90)


if __name__ == '__main__':
    torch.set_num_threads(1)
    if sys.argv[1] == '--plot':
        plot(sys.argv[2].split(','), sys.argv[3].split(','), sys.argv[4])
    else:
        with open(sys.argv[2], 'w') as f:
            json.dump(measure(sys.argv[1]), f, indent=1)
