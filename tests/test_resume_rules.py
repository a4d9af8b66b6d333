"""Honest resume and true advice (issue #19): which constants a resume may change and the record of each
change, starting afresh, a stop on collapse that stays stopped, lost stdout, paths, and the messages of
a finished or interrupted run."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, REPO, assert_refused, folder_state, history, start, tiny
from plumbing.results_folder import RunFolder
from test_hardening import wait_for_line


@pytest.mark.parametrize('override, before', [('--lr=0.01', 'lr=0.0002 (now 0.01)'),
                                              ('--seed=7', 'seed=0 (now 7)'),
                                              ('--batch_size=16', 'batch_size=32 (now 16)'),
                                              ('--ema_decay=0.5', 'ema_decay=0.999 (now 0.5)'),
                                              ('--label_smoothing=0.3', 'label_smoothing=0.0 (now 0.3)')],
                         ids=['lr', 'seed', 'batch_size', 'ema_decay', 'label_smoothing'])
def test_a_resume_refuses_a_changed_experiment_constant_naming_it(work, script_server, mnist_dir, override, before):
    state = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2, override), work), 1,
                   f'out/checkpoint.pt was made with other constants: {before}; pass those, use another '
                   f'--results_dir, or --resume=false to start afresh')
    assert folder_state(work) == state


def test_a_resume_names_every_changed_experiment_constant(work, script_server, mnist_dir):
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2, '--lr=0.01', '--beta1=0.5'), work)
    assert result['status'] == 1
    assert 'lr=0.0002 (now 0.01), beta1=0.9 (now 0.5);' in result['stderr']


def test_a_resume_may_change_the_run_s_constants_and_records_each_change(work, script_server, mnist_dir):
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 3, '--train_limit=96', '--precision=fp32'), work)
    assert result['status'] == 0, result['stderr']
    assert 'resuming after epoch 1' in result['stdout']
    record = history(work / 'out')
    assert [e['epoch'] for e in record['epochs']] == [1, 2, 3]
    assert record['config_changes'] == [{'epoch': 2, 'train_epoch': [1, 3], 'train_limit': [64, 96],
                                         'precision': ['auto', 'fp32']}]
    assert record['config']['train_limit'] == 96
    again = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 3, '--train_limit=96', '--precision=fp32'), work)
    assert again['status'] == 0 and 'already trained 3 epochs' in again['stdout']
    assert history(work / 'out')['config_changes'] == record['config_changes']  # nothing changed this time
    assert torch.load(work / 'out' / 'checkpoint.pt', weights_only=True)['config_changes'] == record['config_changes']


def test_starting_afresh_removes_the_earlier_run_s_outputs_and_nothing_else(work, script_server, mnist_dir):
    (work / 'out' / 'notes.txt').write_text('mine')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1, '--resume=false', '--quality_samples=0'), work)
    assert result['status'] == 0, result['stderr']
    assert 'starting afresh; removed the' in result['stdout']
    assert not (work / 'out' / 'MNIST_GAN_generator_best.pt').exists()  # the earlier run's, scored by fid
    assert (work / 'out' / 'notes.txt').read_text() == 'mine'
    assert 'fid' not in history(work / 'out')['epochs'][0]
    generated = script_server('mnist_gan.py', [*tiny(mnist_dir, 'out', 1), '--generate=4'], work)
    assert generated['status'] == 0, generated['stderr']
    assert 'sampling from the last generator' in generated['stdout']


def test_ctrl_c_of_a_run_that_started_afresh_says_how_to_resume_it(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1000, '--resume=false'), tmp_path)
    wait_for_line(process, '[1/1000]')
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    saved = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch']
    assert process.returncode == 130
    assert stderr == (f'error: interrupted; out/checkpoint.pt holds epoch {saved}. Run the command again without '
                      f'--resume=false to resume (with it, the run starts afresh)\n')


def test_a_run_stopped_by_a_collapse_stays_stopped_when_run_again(script_server, mnist_dir, tmp_path):
    # A collapse_factor just over 1 calls any epoch whose fid is not a new best a collapse.
    args = tiny(mnist_dir, 'out', 8, '--stop_on_collapse=True', '--collapse_factor=1.0001')
    first = script_server('mnist_gan.py', args, tmp_path)
    assert first['status'] == 0, first['stderr']
    stopped = len(history(tmp_path / 'out')['epochs'])
    assert stopped < 8 and 'stopping (stop_on_collapse)' in first['stdout']
    again = script_server('mnist_gan.py', args, tmp_path)
    assert again['status'] == 0, again['stderr']
    assert len(history(tmp_path / 'out')['epochs']) == stopped
    assert f'[{stopped + 1}/8]' not in again['stdout'] and 'stopping (stop_on_collapse)' in again['stdout']
    on = script_server('mnist_gan.py', [*args, '--stop_on_collapse=False'], tmp_path)
    assert on['status'] == 0 and len(history(tmp_path / 'out')['epochs']) == 8  # asked to go on: it does


def test_a_finished_run_without_its_grids_rebuilds_what_it_can(work, script_server, mnist_dir):
    shutil.rmtree(work / 'out' / 'Fixed_results')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1), work)
    assert result['status'] == 0, result['stderr']
    assert "no grids in out/Fixed_results/: the animation is left as it was" in result['stdout']
    assert (work / 'out' / 'MNIST_GAN_train_hist.png').exists()


def test_generating_from_the_last_generator_when_only_the_best_is_there_says_so(work, script_server, mnist_dir):
    (work / 'out' / 'MNIST_GAN_generator.pt').unlink()
    assert_refused(script_server('mnist_gan.py', [*tiny(mnist_dir, 'out', 1), '--generate=4', '--generate_from=last'],
                                 work), 1,
                   'no out/MNIST_GAN_generator.pt, the last epoch\'s generator; out/MNIST_GAN_generator_best.pt is '
                   'there: pass --generate_from=best to sample from it')


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


def test_an_interrupted_run_folder_without_resume_in_its_config_advises_the_same_command(tmp_path, capsys):
    run = RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    run.saved_epoch = 3
    with pytest.raises(SystemExit):
        run.interrupted(KeyboardInterrupt())
    assert capsys.readouterr().err.endswith('holds epoch 3. Run the same command again to resume\n')
