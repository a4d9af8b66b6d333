"""Honest resume and true advice (issue #19): which constants a resume may change and the record of each
change, starting afresh, a stop on collapse that stays stopped, lost stdout, paths, and the messages of
a finished or interrupted run."""
import torch

from conftest import start, tiny


def test_losing_stdout_does_not_stop_the_training(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 3), tmp_path)
    assert process.stdout.readline().startswith('cpu, ')  # `| head -1`: one line read, then the pipe closes
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert 'Traceback' not in stderr and 'BrokenPipe' not in stderr
    assert torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] == 3
