"""Shared fixtures: the repository on sys.path, tiny MNIST files in the real IDX format, script runners."""
import gzip
import json
import os
import shutil
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


def folder_state(root, ignore=('run.lock',)):
    """{relative path: (size, mtime, inode)} of everything under root: equal states mean nothing was
    written, replaced or removed there (the scripts replace files, so a rewrite changes the inode).
    run.lock is ignored: a run that takes the folder writes its own name there before it may refuse."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if name not in ignore:
                info = os.lstat(path)
                state[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return state


@pytest.fixture(scope='session')
def script_server():
    """run(script, args, cwd, timeout=60) -> {'status', 'stdout', 'stderr'}: each run in a fresh process
    forked from tests/script_server.py, which loaded torch once, so a run that stops at once takes
    milliseconds, not the seconds of a new Python loading torch."""
    env = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    server = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'script_server.py')], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)

    def run(script, args, cwd, timeout=60):
        server.stdin.write(json.dumps({'script': script, 'args': list(map(str, args)), 'cwd': str(cwd),
                                       'timeout': timeout}) + '\n')
        server.stdin.flush()
        return json.loads(server.stdout.readline())
    yield run
    server.stdin.close()
    server.wait(timeout=60)


def copy_results(source, target):
    """A copy of a folder of results in hard links, made in no time: the scripts only ever replace their
    files, never change one in place, so a run on the copy leaves the source as it was. run.lock, which
    is written in place, is copied. A test that damages a file of the copy must replace it too."""
    def link(source_file, target_file):
        (shutil.copy2 if os.path.basename(source_file) == 'run.lock' else os.link)(source_file, target_file)
    shutil.copytree(source, target, copy_function=link)
