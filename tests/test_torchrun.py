"""Several processes (README, Several GPUs and machines): the training scripts under torchrun (gloo on the CPU, two
processes, tiny sizes), and torchrun's variables left set without it. On GPUs, mocked: test_gpu_paths.py."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import OFFLINE, REPO, tiny
from plumbing.interrupts import Stopped

TINY = {'mnist_cgan.py': ('MNIST_cGAN', []), 'mnist_cdcgan.py': ('MNIST_cDCGAN', ['--d=8'])}

# Runs the script as torchrun does, and saves this process's models after every epoch, to compare the ranks.
RECORDER = '''
import runpy, sys, torch
sys.path.insert(0, {repo!r})
import common
from plumbing import distributed
from plumbing.results_folder import RunFolder
end_epoch = RunFolder.end_epoch
def recording_end_epoch(self, epoch, *args, **kwargs):
    end_epoch(self, epoch, *args, **kwargs)
    torch.save({{name: model.state_dict() for name, model in self.models.items()}},
               f"{{self.dir}}.rank{{distributed.rank()}}.epoch{{epoch}}.pt")
RunFolder.end_epoch = recording_end_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def env():
    return {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def tiny_args(script, mnist_dir, out, epochs):
    return [f'--data_dir={mnist_dir}', f'--results_dir={out}', f'--train_epoch={epochs}', '--train_limit=128',
            '--batch_size=32', '--quality_samples=100', *TINY[script][1]]


def torchrun(script, args, cwd, record=False, timeout=300):
    """torchrun --standalone --nproc_per_node=2 script -- args; returns the CompletedProcess."""
    # '--' ends torchrun's own options: without it, it would take --d=8 for an abbreviation of one of them.
    target = [str(cwd / 'recorder.py'), '--', str(REPO / script)] if record else [str(REPO / script), '--']
    if record:
        (cwd / 'recorder.py').write_text(RECORDER.format(repo=str(REPO)))
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           *target, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def single(script, args, cwd):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=300)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_by_hand(script, args, cwd):
    """Two processes with torchrun's environment but no torchrun agent (as on several machines, where no
    agent stops the others): what the scripts themselves do when one fails."""
    common = {**env(), 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
              'MASTER_PORT': str(free_port())}
    return [subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, text=True,
                             env={**common, 'RANK': str(rank), 'LOCAL_RANK': str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]


def history(out, model):
    with open(out / f'{model}_train_hist.json') as f:
        return json.load(f)['epochs']


@pytest.fixture(scope='module', params=list(TINY))
def trained(request, mnist_dir, tmp_path_factory):
    script = request.param
    cwd = tmp_path_factory.mktemp('torchrun')
    result = torchrun(script, tiny_args(script, mnist_dir, cwd / 'out', 2), cwd, record=True)
    assert result.returncode == 0, result.stderr
    return {'script': script, 'model': TINY[script][0], 'cwd': cwd, 'out': cwd / 'out', 'stdout': result.stdout}


def test_both_processes_end_with_the_same_weights(trained):
    for epoch in (1, 2):
        ranks = [torch.load(trained['cwd'] / f'out.rank{rank}.epoch{epoch}.pt', weights_only=True) for rank in (0, 1)]
        for name in ('generator', 'discriminator', 'generator_average'):
            zero, one = ranks[0][name], ranks[1][name]
            weights = [key for key in zero if 'running' not in key and 'num_batches' not in key]  # BatchNorm: per rank
            assert all(torch.equal(zero[key], one[key]) for key in weights), (name, epoch)
    first = torch.load(trained['cwd'] / 'out.rank0.epoch1.pt', weights_only=True)['generator']
    last = torch.load(trained['cwd'] / 'out.rank0.epoch2.pt', weights_only=True)['generator']
    assert any(not torch.equal(first[key], last[key]) for key in first)  # they trained


def test_rank_0_alone_prints_each_line_once_and_writes_each_output_once(trained):
    lines = trained['stdout'].splitlines()
    assert sum(line.startswith('cpu, ') for line in lines) == 1
    assert [line.split(' - ')[0] for line in lines if ' - ptime' in line] == ['[1/2]', '[2/2]']
    assert sum(line.startswith('Avg one epoch ptime') for line in lines) == 1
    model, out = trained['model'], trained['out']
    assert sorted(os.listdir(out / 'Fixed_results')) == [f'{model}_1.png', f'{model}_2.png']
    assert not [name for name in os.listdir(out) if '.tmp' in name]
    assert [e['epoch'] for e in history(out, model)] == [1, 2]
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 2 and len(state['rng']) == 2  # each process's random state
    assert not torch.equal(state['rng'][0]['cpu'], state['rng'][1]['cpu'])  # each draws its own noise


def test_the_global_batch_is_split_not_multiplied(trained, mnist_dir, tmp_path):
    """img/s counts both processes' images; an epoch is the same 4 global batches of 32 as in one process."""
    epoch = history(trained['out'], trained['model'])[-1]
    assert epoch['images_per_second'] == pytest.approx(128 / epoch['seconds'])


def losses(out, model):
    return [(e['loss_d'], e['loss_g'], e['d_real'], e['d_fake']) for e in history(out, model)]


def test_torchrun_resumes_under_torchrun_exactly_where_it_stopped(trained, mnist_dir, tmp_path):
    script, model = trained['script'], trained['model']
    if script != 'mnist_cgan.py':
        pytest.skip('one script is enough: resuming is the same code for all, and each torchrun costs seconds')
    out = tmp_path / 'out'
    assert torchrun(script, tiny_args(script, mnist_dir, out, 1), tmp_path).returncode == 0
    result = torchrun(script, tiny_args(script, mnist_dir, out, 2), tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'resuming after epoch 1' in result.stdout and 'new random streams' not in result.stdout
    assert losses(out, model) == losses(trained['out'], model)


@pytest.mark.parametrize('first, then', [('torchrun', 'single'), ('single', 'torchrun')])
def test_a_run_resumes_in_another_world_size_and_says_its_noise_differs(mnist_dir, tmp_path, first, then):
    script, model = 'mnist_cgan.py', 'MNIST_cGAN'
    out = tmp_path / 'out'
    start = {'torchrun': torchrun, 'single': single}
    assert start[first](script, tiny_args(script, mnist_dir, out, 1), tmp_path).returncode == 0
    result = start[then](script, tiny_args(script, mnist_dir, out, 2), tmp_path)
    assert result.returncode == 0, result.stderr
    saved_by = {'torchrun': 2, 'single': 1}[first]
    assert (f"was saved by {saved_by} process(es) and this run has {3 - saved_by}: it resumes with new random "
            f"streams") in result.stdout
    assert 'resuming after epoch 1' in result.stdout
    assert [e['epoch'] for e in history(out, model)] == [1, 2]


def test_a_world_size_that_does_not_divide_the_batch_is_one_line_and_status_2(mnist_dir, tmp_path):
    processes = launch_by_hand('mnist_cgan.py', [f'--data_dir={mnist_dir}', f'--results_dir={tmp_path / "out"}',
                                                 '--batch_size=33'], tmp_path)
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [2, 2]
    assert outputs[0][1] == ("error: batch_size=33 does not split over 2 processes: start a number of processes "
                             "that divides 33\n")
    assert outputs[1][1] == ''  # the same trouble in every process: rank 0 says it once
    assert not (tmp_path / 'out').exists()


def test_when_one_process_is_killed_the_other_stops_with_a_clear_line(mnist_dir, tmp_path):
    args = tiny_args('mnist_cgan.py', mnist_dir, tmp_path / 'out', 200)
    rank0, rank1 = launch_by_hand('mnist_cgan.py', args, tmp_path)
    assert rank0.stdout.readline().startswith('cpu, ')
    assert rank0.stdout.readline().startswith('[1/200] - ptime')
    assert rank0.stdout.readline().startswith('[2/200] - ptime')  # so epoch 1 is surely saved
    rank1.send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, error = rank0.communicate(timeout=200)
    assert time.monotonic() - start < 180 and rank0.returncode == 1
    assert error.startswith('error: rank 0: stopped: RuntimeError: ') and error.count('\n') == 1
    assert 'another process of this run failed' in error and 'Run the same command again to resume' in error
    assert torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] >= 1


def test_sync_batchnorm_on_cpus_is_one_line(mnist_dir, tmp_path):
    processes = launch_by_hand('mnist_cdcgan.py', [f'--data_dir={mnist_dir}', '--sync_batchnorm=True'], tmp_path)
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [2, 2]
    assert outputs[0][1] == "error: --sync_batchnorm=True needs GPUs: gloo, the CPUs' backend, cannot run SyncBatchNorm\n"


def test_a_batch_share_of_one_image_is_one_line_and_status_2(mnist_dir, tmp_path):
    processes = launch_by_hand('mnist_cgan.py', [f'--data_dir={mnist_dir}', f'--results_dir={tmp_path / "out"}',
                                                 '--batch_size=2'], tmp_path)
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [2, 2]
    assert outputs[0][1] == ("error: batch_size=2 over 2 processes leaves each one image a step, and BatchNorm needs "
                             "2 at least: pass --batch_size=4 or more, or start fewer processes\n")
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------- torchrun's variables without it; a failed collective

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
                          env={**env(), **variables}, capture_output=True, text=True, timeout=120)
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
