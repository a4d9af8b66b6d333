"""Honest resume and true advice (issue #19): which constants a resume may change and the record of each
change, starting afresh, a stop on collapse that stays stopped, lost stdout, paths, and the messages of
a finished or interrupted run."""
import os
import subprocess
import sys

import torch

from conftest import OFFLINE, REPO, start, tiny


def test_losing_stdout_does_not_stop_the_training(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 3), tmp_path)
    assert process.stdout.readline().startswith('cpu, ')  # `| head -1`: one line read, then the pipe closes
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert 'Traceback' not in stderr and 'BrokenPipe' not in stderr
    assert torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] == 3


def test_the_default_data_is_the_mnist_beside_the_scripts_from_any_folder(tmp_path):
    env = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    done = subprocess.run([sys.executable, str(REPO / 'mnist_gan.py'), '--results_dir=out', '--train_epoch=1',
                           '--train_limit=64', '--batch_size=32', '--quality_samples=0', '--device=cpu'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ['out']  # no ./data/MNIST/raw made, nothing downloaded


def test_a_failed_download_leaves_no_empty_folders(script_server, tmp_path):
    result = script_server('mnist_gan.py', ['--data_dir=nowhere', '--results_dir=out'], tmp_path)
    assert result['status'] == 1 and result['stderr'].startswith('error: MNIST is missing from nowhere/MNIST/raw/')
    assert os.listdir(tmp_path) == []
