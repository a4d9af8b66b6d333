"""Damage and limits (issue #19): checksums of what the scripts read back, SIGTERM and Ctrl-C while a
checkpoint loads, too few MNIST images, memory running out, and torchrun's variables without torchrun."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, REPO, assert_refused, tiny, write_faces, write_idx
from plumbing.interrupts import Stopped

ENV = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


@pytest.mark.parametrize('count', [0, 1])
def test_an_mnist_file_of_too_few_images_is_one_line_before_training(mnist_dir, tmp_path, script_server, count):
    data = tmp_path / 'data'
    shutil.copytree(mnist_dir, data)
    raw = data / 'MNIST' / 'raw'
    images, labels = torch.zeros(count, 28, 28, dtype=torch.uint8), torch.zeros(count, dtype=torch.uint8)
    write_idx(raw / 't10k-images-idx3-ubyte.gz', images)
    write_idx(raw / 't10k-labels-idx1-ubyte.gz', labels)
    assert_refused(script_server('mnist_gan.py', tiny(data, 'out', 1), tmp_path), 1,
                   f'{raw}/t10k-images-idx3-ubyte.gz holds {count} image(s), too few to train or measure with; '
                   f'replace it with a good copy, or delete it to download MNIST again')
    assert not (tmp_path / 'out' / 'checkpoint.pt').exists()


@pytest.mark.parametrize('variables, line', [
    ({'WORLD_SIZE': '2', 'RANK': '1'}, 'WORLD_SIZE=2 is set, but not MASTER_ADDR and MASTER_PORT: start the script '
     'with torchrun (python -m torch.distributed.run --nproc_per_node=2 ...), or unset RANK, WORLD_SIZE and '
     'LOCAL_RANK to run one process'),
    ({'RANK': '1'}, 'RANK=1 does not fit WORLD_SIZE=1: start the script with torchrun, or unset RANK, WORLD_SIZE and '
     'LOCAL_RANK to run one process'),
    ({'WORLD_SIZE': 'two'}, "WORLD_SIZE='two' is not a process number: start the script with torchrun, or unset "
     "RANK, WORLD_SIZE and LOCAL_RANK to run one process")])
def test_torchrun_s_variables_left_set_without_torchrun_are_one_line(mnist_dir, tmp_path, variables, line):
    done = subprocess.run([sys.executable, str(REPO / 'mnist_gan.py'), *tiny(mnist_dir, 'out', 1)], cwd=tmp_path,
                          env={**ENV, **variables}, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, f'error: {line}\n')
    assert not (tmp_path / 'out').exists()


def test_a_zeroed_stretch_of_the_celeba_cache_is_decoded_again(tmp_path, capsys):
    from plumbing import celeba
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    images, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    original = images.clone()
    cache = tmp_path / 'faces.u8'
    content = bytearray(cache.read_bytes())
    content[len(content) // 2:] = bytes(len(content) - len(content) // 2)
    cache.unlink()
    cache.write_bytes(bytes(content))
    capsys.readouterr()
    again, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert f'{cache} does not match its checksum (damaged, or made by an older version): decoding it again' in \
        capsys.readouterr().out
    assert torch.equal(again, original)


def test_only_a_failed_collective_is_an_interruption(monkeypatch):
    from plumbing import torchrun
    from plumbing.run import is_interruption
    gloo = RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:525] Read error [127.0.0.1]:8623: '
                        'Connection reset by peer')
    bug = RuntimeError('mat1 and mat2 shapes cannot be multiplied (32x100 and 10x256)')
    assert is_interruption(KeyboardInterrupt()) and is_interruption(Stopped())
    assert not is_interruption(gloo) and not is_interruption(bug)  # one process: no collective to fail
    monkeypatch.setattr(torchrun, 'world_size', lambda: 2)
    assert is_interruption(gloo) and is_interruption(torch.distributed.DistBackendError('NCCL error'))
    assert not is_interruption(bug) and not is_interruption(ValueError('a bug'))  # seen in full, under torchrun too
