"""Shared fixtures: the repository on sys.path, tiny MNIST files in the real IDX format, a script runner."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_idx(path, array):
    """Write a uint8 tensor as a gzipped IDX file, header and all, as MNIST ships it."""
    header = struct.pack('>HBB', 0, 0x08, array.dim()) + struct.pack(f'>{array.dim()}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.contiguous().numpy().tobytes())


def fake_digits(n, seed):
    """n 28x28 images whose label sets where a bright bar sits, so classes differ visibly."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
    images = (torch.rand(n, 28, 28, generator=generator) * 60).to(torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 4:24, 2 + 2 * label:5 + 2 * label] = 255
    return images, labels


@pytest.fixture(scope='session')
def mnist_dir(tmp_path_factory):
    """A data_dir holding MNIST/raw/ with 512 training and 128 test images."""
    data_dir = tmp_path_factory.mktemp('data')
    raw = data_dir / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for prefix, n, seed in (('train', 512, 0), ('t10k', 128, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f'{prefix}-images-idx3-ubyte.gz', images)
        write_idx(raw / f'{prefix}-labels-idx1-ubyte.gz', labels)
    return data_dir


# Downloads must fail fast and for sure, whatever network the machine has.
OFFLINE = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': ''}


def run_script(script, *args, cwd, timeout=300, **popen):
    """Run a top-level script as a user would, on one CPU thread; return the CompletedProcess."""
    env = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)
