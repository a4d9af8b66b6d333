"""Damage and limits (issue #19): checksums of what the scripts read back, SIGTERM and Ctrl-C while a
checkpoint loads, too few MNIST images, memory running out, and torchrun's variables without torchrun."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, REPO, tiny
from plumbing.interrupts import Stopped

ENV = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


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
