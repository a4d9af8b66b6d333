"""Checkpoints and resume (README, Resume: never losing a run): the checkpoint on disk before its epoch's line,
a killed or interrupted run resumed from its last complete epoch, what a resume may change, one run per results
folder, damaged files and files carrying code refused before anything is loaded, failed writes and memory
running out stopped with one line.

A resumed run equal to an uninterrupted one: test_mnist_outputs.py and test_celeba_outputs.py, beside the
uninterrupted runs; under torchrun, test_torchrun.py. The files made from the checkpoint, which agree with it after
a kill at any write, and a fresh start in a folder of another model's checkpoint: test_mnist_outputs.py, on its run
of two epochs. Runs that stop at once go through the script server (a fresh process each, without loading torch
each time); what needs a process of its own (two at once, a kill, a Ctrl-C, a file size limit) starts one.
"""
import ast
import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from plumbing import folder_lock, results_folder, safe_files
from plumbing.interrupts import Stopped
from plumbing.results_folder import RunFolder
from plumbing.run import Run, stop_after_interruption
from conftest import ENV, OFFLINE, REPO, as_if_made_with, assert_refused, dead_pid, folder_state, history, one_line, \
    run_in_process, run_script, start, tiny, tiny_args, write_faces


def wait_for_line(process, prefix, timeout=180):
    """The first line of process's stdout that starts with prefix, read as soon as it is printed."""
    deadline = time.time() + timeout
    for line in process.stdout:
        if line.startswith(prefix):
            return line
        assert time.time() < deadline, f'no line starting {prefix!r} in {timeout} s'
    raise AssertionError(f'the process ended without a line starting {prefix!r}: {process.stderr.read()}')


# ---------------------------------------------------------------- the checkpoint: on disk before its epoch's line

def test_an_epoch_line_is_printed_only_once_its_checkpoint_is_on_disk(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1000), tmp_path)
    wait_for_line(process, '[1/1000]')
    process.send_signal(signal.SIGKILL)  # the moment the line appears
    process.communicate()
    assert torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] >= 1


def start_script(script, args, cwd):
    """Start a script as a user's shell would: with SIGINT at its default even if this runner ignores it (as
    some launchers start it), since a Python started with SIGINT ignored never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1'},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_checkpoint(process, checkpoint, timeout=120):
    deadline = time.time() + timeout
    while not checkpoint.exists():
        assert process.poll() is None and time.time() < deadline, 'no checkpoint was written'
        time.sleep(0.02)


@pytest.mark.parametrize('delay', [0.0, 0.3, 0.7])
def test_a_killed_run_resumes_from_its_last_complete_epoch(mnist_dir, tmp_path, delay):
    out = tmp_path / 'killed'
    process = start_script('mnist_gan.py', tiny_args('mnist_gan.py', mnist_dir, out, 100), tmp_path)
    wait_for_checkpoint(process, out / 'checkpoint.pt')
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(out / 'checkpoint.pt', weights_only=True)  # never half written
    done = saved['epoch']
    assert len(saved['history']) == done >= 1
    result = run_script('mnist_gan.py', *tiny_args('mnist_gan.py', mnist_dir, out, done + 1), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f'resuming after epoch {done}' in result.stdout
    assert [e['epoch'] for e in history(out, 'MNIST_GAN')['epochs']] == list(range(1, done + 2))


def test_a_run_removes_what_a_killed_run_s_saves_left_behind(work, script_server, mnist_dir):
    dead, alive = dead_pid(), os.getpid()
    out = work / 'out'
    left = [out / f'checkpoint.tmp{dead}.pt', out / 'Fixed_results' / f'MNIST_GAN_2.tmp{dead}.png']
    kept = [out / f'MNIST_GAN_generated.tmp{alive}.png', out / 'notes.txt']
    for path in left + kept:
        path.write_bytes(b'\0' * 1000)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1), work)
    assert result['status'] == 0, result['stderr']
    assert 'removed 1 temporary file(s) of 0 MB left in out/ by a process that was killed' in result['stdout']
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(mnist_dir, tmp_path):
    out = tmp_path / 'diverged'
    assert run_script('mnist_gan.py', *tiny_args('mnist_gan.py', mnist_dir, out, 1), cwd=tmp_path).returncode == 0
    as_if_made_with(out / 'checkpoint.pt', lr=1e30)
    result = run_script('mnist_gan.py', *tiny_args('mnist_gan.py', mnist_dir, out, 3), '--lr=1e30', cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'training diverged' in result.stderr and 'epoch 1 is kept' in result.stderr
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['epoch'] == 1


def test_a_finished_run_without_its_grids_rebuilds_what_it_can(work, script_server, mnist_dir):
    shutil.rmtree(work / 'out' / 'Fixed_results')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1), work)
    assert result['status'] == 0, result['stderr']
    assert "no grids in out/Fixed_results/: the animation is left as it was" in result['stdout']
    assert (work / 'out' / 'MNIST_GAN_train_hist.png').exists()


# ---------------------------------------------------------------- Ctrl-C and SIGTERM: one line, which epoch is saved

def test_ctrl_c_stops_cleanly_and_says_how_to_resume(mnist_dir, tmp_path):
    out = tmp_path / 'interrupted'
    # Started from a runner that ignores SIGINT, as some launchers do: the script must still get Ctrl-C.
    runner_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = start_script('mnist_gan.py', tiny_args('mnist_gan.py', mnist_dir, out, 100), tmp_path)
    finally:
        signal.signal(signal.SIGINT, runner_handler)
    wait_for_checkpoint(process, out / 'checkpoint.pt')
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert 'Traceback' not in stderr and 'Run the same command again to resume' in stderr
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['epoch'] >= 1


def test_ctrl_c_says_which_epoch_the_checkpoint_really_holds(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1000), tmp_path)
    wait_for_line(process, '[1/1000]')
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    saved = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch']
    assert process.returncode == 130
    assert stderr == (f'error: interrupted; out/checkpoint.pt holds epoch {saved}. '
                      f'Run the same command again to resume\n')


def test_ctrl_c_of_a_run_that_started_afresh_says_how_to_resume_it(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1000, '--resume=false'), tmp_path)
    wait_for_line(process, '[1/1000]')
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    saved = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch']
    assert process.returncode == 130
    assert stderr == (f'error: interrupted; out/checkpoint.pt holds epoch {saved}. Run the command again without '
                      f'--resume=false to resume (with it, the run starts afresh)\n')


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path, capsys):
    run = results_folder.RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    run.history = [{'epoch': 1}]  # recorded, but interrupted before its checkpoint was written
    with pytest.raises(SystemExit) as stop:
        stop_after_interruption(run, KeyboardInterrupt())
    assert stop.value.code == 130
    assert capsys.readouterr().err == ('error: interrupted before the first epoch was saved; '
                                       'run the same command again to start\n')


def test_an_interrupted_run_folder_without_resume_in_its_config_advises_the_same_command(tmp_path, capsys):
    run = RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    run.saved_epoch = 3
    with pytest.raises(SystemExit):
        stop_after_interruption(run, KeyboardInterrupt())
    assert capsys.readouterr().err.endswith('holds epoch 3. Run the same command again to resume\n')


def test_an_interruption_while_resuming_says_the_checkpoint_is_as_it_was(tmp_path, capsys):
    run = RunFolder('M', {'results_dir': str(tmp_path), 'resume': True}, models={}, optimizers={}, exports={})
    run.resuming = True
    with pytest.raises(SystemExit) as stop:
        stop_after_interruption(run, KeyboardInterrupt())
    assert stop.value.code == 130
    assert capsys.readouterr().err == (f'error: interrupted; it was resuming, and {tmp_path}/checkpoint.pt is as it '
                                       f'was. Run the same command again to resume\n')


def test_ctrl_c_while_starting_is_one_line(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1), tmp_path)
    maps = f'/proc/{process.pid}/maps'  # where Linux lists the libraries a process has loaded
    deadline = time.time() + 60
    while 'libtorch' not in open(maps).read():  # not before: Python itself may still be starting
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # while torch loads, a second or so before the script goes on
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr == 'error: interrupted while starting, before any epoch was trained; run the same command again\n'


def test_ctrl_c_while_generating_says_so(mnist_dir, tmp_path):
    code = ('import sys; sys.path.insert(0, {repo!r}); sys.argv = ["mnist_gan.py", "--generate=4"]\n'
            'import mnist_gan\n'
            'def interrupted(run): raise KeyboardInterrupt\n'
            'mnist_gan.common.main(vars(mnist_gan), mnist_gan.train, interrupted)\n').format(repo=str(REPO))
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stderr) == (
        130, 'error: interrupted while writing samples, before any was saved; no trained file was changed; '
             'run the same command again\n')


def test_sigterm_while_starting_is_one_line(tmp_path):
    # What a script does before its training loop: World installs the SIGTERM handler, then the data and
    # the models load; here the signal arrives at that moment, every time.
    starting = ("import os, signal, common\n"
                "from plumbing import torchrun\n"
                "world = torchrun.World('cpu', batch_size=2)\n"
                "os.kill(os.getpid(), signal.SIGTERM)\n"
                "open('loaded_the_data', 'w').close()\n")
    done = subprocess.run([sys.executable, '-c', starting], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO), 'CUDA_VISIBLE_DEVICES': ''}, timeout=120)
    assert (done.returncode, done.stderr) == (
        143, 'error: stopped by SIGTERM while starting, before any epoch was trained; run the same command again\n')
    assert not (tmp_path / 'loaded_the_data').exists()


def test_a_sigterm_while_a_file_loads_is_no_damage(tmp_path, monkeypatch):
    path = tmp_path / 'weights.pt'
    torch.save({'w': torch.ones(3)}, path)

    def stopped(*args, **kwargs):
        raise Stopped()
    monkeypatch.setattr(torch, 'load', stopped)
    with pytest.raises(Stopped):
        safe_files.load_torch(path, 'retrain')


# ---------------------------------------------------------------- what a resume may change, and starting afresh

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


def test_resuming_with_other_quality_samples_names_them(work, script_server, mnist_dir):
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2, '--quality_samples=0'), work), 1,
                   'out/checkpoint.pt was made with other constants: quality_samples=50 (now 0); pass those, '
                   'use another --results_dir, or --resume=false to start afresh')
    assert folder_state(work) == before


def test_a_checkpoint_of_other_constants_gets_one_line(mnist_dir, tmp_path):
    out = tmp_path / 'run'
    assert run_script('mnist_dcgan.py', *tiny_args('mnist_dcgan.py', mnist_dir, out, 1), cwd=tmp_path).returncode == 0
    result = run_script('mnist_dcgan.py', *tiny_args('mnist_dcgan.py', mnist_dir, out, 2), '--d=16', cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1 and 'd=8 (now 16)' in result.stderr


def test_a_checkpoint_of_another_model_is_named_as_such(work, script_server, mnist_dir):
    before = folder_state(work)
    assert_refused(script_server('mnist_cgan.py', tiny(mnist_dir, 'out', 2), work), 1,
                   'out/checkpoint.pt is a checkpoint of MNIST_GAN (made by mnist_gan.py), not of MNIST_cGAN; '
                   'pass another --results_dir')
    assert folder_state(work) == before


def test_a_run_is_pinned_to_the_classifier_that_scores_it(work, script_server, mnist_dir):
    from plumbing.mnist_quality import DEFAULT_WEIGHTS, weights_digest
    shipped = weights_digest(DEFAULT_WEIGHTS)
    record = json.loads((work / 'out' / 'MNIST_GAN_train_hist.json').read_text())
    assert record['scored_with'] == {'classifier': DEFAULT_WEIGHTS, 'sha256': shipped}
    checkpoint = work / 'out' / 'checkpoint.pt'
    state = torch.load(checkpoint, weights_only=True)
    assert state['yardstick']['sha256'] == shipped
    state['yardstick']['sha256'] = 'f' * 64  # as if the classifier had been retrained since
    checkpoint.unlink()
    torch.save(state, checkpoint)
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work), 1,
                   f'out/checkpoint.pt was scored with another MNIST classifier than {DEFAULT_WEIGHTS} holds now '
                   f'(sha256 ffffffffffff..., now {shipped[:12]}...): its fid would not compare with this run\'s; put '
                   f'that classifier back, or pass --resume=false or another --results_dir')
    assert folder_state(work) == before


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


def test_a_checkpoint_from_before_the_resume_records_resumes(work, script_server, mnist_dir):
    checkpoint = work / 'out' / 'checkpoint.pt'
    state = torch.load(checkpoint, weights_only=True)
    for newer in ('config_changes', 'yardstick'):  # fields added since: an older checkpoint lacks them
        del state[newer]
    checkpoint.unlink()
    torch.save(state, checkpoint)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 0, result['stderr']
    assert 'resuming after epoch 1' in result['stdout']
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 2


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


# ---------------------------------------------------------------- one run per results folder

def test_a_second_run_on_a_folder_in_use_stops_and_generate_reads_meanwhile(mnist_dir, tmp_path):
    out = tmp_path / 'out'
    first = start('mnist_gan.py', tiny(mnist_dir, out, 1000), tmp_path)
    try:
        wait_for_line(first, '[1/1000]')
        second = run_script('mnist_gan.py', *tiny(mnist_dir, out, 1000), cwd=tmp_path)
        assert second.returncode == 1 and second.stderr.count('\n') == 1
        assert second.stderr.startswith(f'error: {out}/ is in use by another run (pid {first.pid} on ')
        assert f'mnist_gan.py --data_dir={mnist_dir} --results_dir={out}' in second.stderr
        assert second.stderr.endswith('); wait for it to end, or pass another --results_dir\n')
        # --generate may read while the run trains: it replaces its weight files whole, never writes into them
        sampled = run_script('mnist_gan.py', f'--results_dir={out}', '--generate=4', '--device=cpu', cwd=tmp_path)
        assert sampled.returncode == 0, sampled.stderr
        with Image.open(out / 'MNIST_GAN_generated.png') as picture:
            picture.load()
        assert first.poll() is None  # still training, unharmed
    finally:
        first.kill()
        first.communicate()
    # The OS released the killed run's lock: the same command takes the folder again.
    saved = torch.load(out / 'checkpoint.pt', weights_only=True)['epoch']
    again = run_script('mnist_gan.py', *tiny(mnist_dir, out, saved), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f'already trained {saved} epochs' in again.stdout


def test_where_the_file_system_cannot_lock_a_run_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')  # an NFS mount without a lock service
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    results_folder.RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    assert capsys.readouterr().err == (f'warning: cannot lock {tmp_path}/run.lock (No locks available); nothing '
                                       f'stops a second run from writing to {tmp_path}/ at the same time, so start '
                                       f'only one there\n')


@pytest.mark.parametrize('results_dir, cause', [('taken', 'File exists'), ('taken/below', 'Not a directory')])
def test_a_results_folder_where_a_file_is_stops_with_one_line(script_server, mnist_dir, tmp_path, results_dir, cause):
    (tmp_path / 'taken').write_text('a file')
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, results_dir, 1), tmp_path), 1,
                   f'cannot make the folder {results_dir} ({cause}); a file stands where a folder should be; '
                   f'move it away or choose another folder')
    assert [p.name for p in tmp_path.iterdir()] == ['taken'] and (tmp_path / 'taken').read_text() == 'a file'


def test_a_folder_where_the_checkpoint_goes_is_one_line_before_any_training(script_server, mnist_dir, tmp_path):
    (tmp_path / 'out' / 'checkpoint.pt').mkdir(parents=True)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1, '--resume=false'), tmp_path)
    one_line(result, 1, 'out/checkpoint.pt is a folder, where this run writes a file; move it away or pass '
                        'another --results_dir')
    assert sorted(os.listdir(tmp_path / 'out')) == ['checkpoint.pt', 'run.lock']


def test_an_unwritable_results_folder_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(path, mode):  # as open() fails for a user without write permission on the folder
        raise PermissionError(errno.EACCES, 'Permission denied', path)
    monkeypatch.setattr(folder_lock, 'open', refuse, raising=False)
    with pytest.raises(SystemExit) as stop:
        results_folder.RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: cannot write {tmp_path}/run.lock (Permission denied); make its '
                                       f'folder writable or choose another, then run the same command again\n')


# ---------------------------------------------------------------- damaged and missing files, found before loading

def replace_file(path, data):
    path.unlink()  # not written in place: the copy shares its files with the trained folder
    path.write_bytes(data)


def damage(path, offset, data):
    content = bytearray(path.read_bytes())
    content[offset:offset + len(data)] = data
    path.unlink()  # replaced, not written in place: the copy shares its files with the trained folder
    path.write_bytes(bytes(content))


def test_a_damaged_checkpoint_is_called_damaged(work, script_server, mnist_dir):
    checkpoint = work / 'out' / 'checkpoint.pt'
    replace_file(checkpoint, checkpoint.read_bytes()[:5000])
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work), 1,
                   'out/checkpoint.pt is damaged: it cannot be read as a file of weights; delete it or pass '
                   '--resume=false to start afresh, or pass another --results_dir')
    assert folder_state(work) == before


def test_an_overwritten_stretch_of_the_checkpoint_is_found_before_resuming(work, script_server, mnist_dir):
    checkpoint = work / 'out' / 'checkpoint.pt'
    damage(checkpoint, checkpoint.stat().st_size // 3, os.urandom(4096))
    before = folder_state(work)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 1 and 'Traceback' not in result['stderr']
    assert result['stderr'].startswith('error: out/checkpoint.pt is damaged:') and result['stderr'].count('\n') == 1
    assert folder_state(work) == before


class RunsCode:
    """Unpickled by a trusting loader, this runs a shell command."""
    def __reduce__(self):
        return os.system, ('touch code_ran',)


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'code'])
def test_a_damaged_generator_is_called_damaged_and_never_loaded_unsafely(work, script_server, damage):
    generator = work / 'out' / 'MNIST_GAN_generator_best.pt'
    replace_file(generator, {'truncated': generator.read_bytes()[:3000], 'garbage': b'not weights\n' * 100,
                             'code': pickle.dumps(RunsCode())}[damage])
    before = folder_state(work)
    result = script_server('mnist_gan.py', ['--results_dir=out', '--generate=4', '--device=cpu'], work)
    assert_refused(result, 1, 'out/MNIST_GAN_generator_best.pt is damaged: it cannot be read as a file of weights; '
                              'delete it and train again (run the script without --generate)')
    assert folder_state(work) == before  # and so no code_ran, and no grid


def test_flipped_bytes_in_the_weights_are_found_before_sampling(work, script_server, mnist_dir):
    best = work / 'out' / 'MNIST_GAN_generator_best.pt'
    damage(best, best.stat().st_size // 2, bytes(64))
    result = script_server('mnist_gan.py', [*tiny(mnist_dir, 'out', 1), '--generate=4'], work)
    assert result['status'] == 1
    assert result['stderr'].startswith('error: out/MNIST_GAN_generator_best.pt is damaged: its checksums do not match')
    assert result['stderr'].count('\n') == 1 and not (work / 'out' / 'MNIST_GAN_generated.png').exists()


def test_generate_without_a_trained_generator_gets_one_line(tmp_path):
    result = run_script('mnist_cdcgan.py', '--generate=4', cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count('\n') == 1
    assert 'no trained generator at MNIST_cDCGAN_results/MNIST_cDCGAN_generator.pt' in result.stderr


def test_generating_from_the_last_generator_when_only_the_best_is_there_says_so(work, script_server, mnist_dir):
    (work / 'out' / 'MNIST_GAN_generator.pt').unlink()
    assert_refused(script_server('mnist_gan.py', [*tiny(mnist_dir, 'out', 1), '--generate=4', '--generate_from=last'],
                                 work), 1,
                   'no out/MNIST_GAN_generator.pt, the last epoch\'s generator; out/MNIST_GAN_generator_best.pt is '
                   'there: pass --generate_from=best to sample from it')


# ---------------------------------------------------------------- files carrying code: read as tensors only
# Files a user may have downloaded (generator weights, checkpoints, the classifier's weights): a pickle carrying
# code is refused with one line, and its code never runs.

SCRIPTS = {'mnist_gan.py': 'MNIST_GAN', 'mnist_cgan.py': 'MNIST_cGAN', 'mnist_dcgan.py': 'MNIST_DCGAN',
           'mnist_cdcgan.py': 'MNIST_cDCGAN', 'celeba_dcgan.py': 'CelebA_DCGAN', 'celeba_cdcgan.py': 'CelebA_cDCGAN'}


class Payload:
    """Unpickling this makes a folder: the visible trace of code run by loading a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_booby_trap(path, marker):
    """A file torch.save wrote, shaped like the state_dict (or checkpoint) expected, that runs code when unpickled."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'weight': Payload(marker), 'models': Payload(marker)}, path)


def assert_refused_in_one_line(stop, capsys, path, marker):
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and error.startswith('error: ') and str(path) in error
    assert not os.path.exists(marker), 'loading the file ran the code it carried'


def test_every_torch_load_in_the_code_reads_weights_only():
    """No other loader than torch.load(..., weights_only=True) in the scripts: no pickle, no numpy pickles."""
    for source in sorted(REPO.glob('*.py')):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f'{source.name}:{node.lineno}: {ast.unparse(node)}'
            assert name not in ('pickle.load', 'pickle.loads', 'pickle.Unpickler'), where
            keywords = {k.arg: k.value for k in node.keywords}
            if name == 'torch.load':
                assert isinstance(keywords.get('weights_only'), ast.Constant), where
                assert keywords['weights_only'].value is True, where
            if name.endswith('.load') and 'allow_pickle' in keywords:
                assert ast.literal_eval(keywords['allow_pickle']) is False, where


def data_args(script, mnist_dir, tmp_path):
    if script.startswith('mnist'):
        return [f'--data_dir={mnist_dir}', '--quality_samples=0']
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    return [f'--data_dir={tmp_path / "faces"}', '--quality_samples=0']


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_generate_refuses_a_generator_file_carrying_code(script, tmp_path, capsys):
    marker = tmp_path / 'code_ran'
    for kind in ('generator', 'generator_best'):  # whichever --generate picks
        write_booby_trap(tmp_path / 'out' / f'{SCRIPTS[script]}_{kind}.pt', marker)
    with pytest.raises(SystemExit) as stop:
        run_in_process(script, f'--results_dir={tmp_path / "out"}', '--generate=4', '--device=cpu')
    assert_refused_in_one_line(stop, capsys, tmp_path / 'out', marker)


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_resume_refuses_a_checkpoint_carrying_code(script, mnist_dir, tmp_path, capsys):
    marker = tmp_path / 'code_ran'
    write_booby_trap(tmp_path / 'out' / 'checkpoint.pt', marker)
    width = ['--d=8'] if 'dcgan' in script else []
    with pytest.raises(SystemExit) as stop:
        run_in_process(script, *data_args(script, mnist_dir, tmp_path), f'--results_dir={tmp_path / "out"}',
                       '--batch_size=2', '--device=cpu', *width)
    assert_refused_in_one_line(stop, capsys, tmp_path / 'out' / 'checkpoint.pt', marker)


def test_the_quality_classifier_refuses_weights_carrying_code(mnist_dir, tmp_path, capsys):
    from plumbing.mnist_quality import MnistQuality
    marker = tmp_path / 'code_ran'
    write_booby_trap(tmp_path / 'classifier.pt', marker)
    with pytest.raises(SystemExit) as stop:
        MnistQuality(str(mnist_dir), 28, 'cpu', weights=str(tmp_path / 'classifier.pt'))
    assert_refused_in_one_line(stop, capsys, tmp_path / 'classifier.pt', marker)


# ---------------------------------------------------------------- failed writes and memory running out

def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_no_temporary_file(work, mnist_dir):
    kept = ['checkpoint.pt', 'MNIST_GAN_generator.pt', 'MNIST_GAN_generator_best.pt', 'MNIST_GAN_train_hist.json']
    before = folder_state(work / 'out')

    def full_at_one_megabyte():  # the generator's 5.8 MB do not fit, the grids do: it fails mid-epoch
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    result = run_script('mnist_gan.py', *tiny(mnist_dir, 'out', 2), cwd=work, preexec_fn=full_at_one_megabyte)
    assert result.returncode == 1
    assert result.stderr == ('error: cannot write out/MNIST_GAN_generator.pt (File too large); free some space '
                             '(or lift the limit on file sizes), then run the same command again\n')
    assert '[2/2]' not in result.stdout  # epoch 2 was not saved, so it is not announced
    after = folder_state(work / 'out')
    assert [after[name] for name in kept] == [before[name] for name in kept]
    assert torch.load(work / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] == 1
    assert not [path for path in after if '.tmp' in path]


def test_a_write_the_system_refuses_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / 'history.json'
    safe_files.save_json({'epochs': 1}, str(target))

    def refuse(source, destination):  # as for a user without write permission on the folder
        raise PermissionError(errno.EACCES, 'Permission denied', destination)
    monkeypatch.setattr(os, 'replace', refuse)
    with pytest.raises(SystemExit) as stop:
        safe_files.save_json({'epochs': 2}, str(target))
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: cannot write {target} (Permission denied); make its folder writable '
                                       f'or choose another, then run the same command again\n')
    assert json.loads(target.read_text()) == {'epochs': 1} and os.listdir(tmp_path) == ['history.json']


class FakeRun(Run):
    def __init__(self, config, folder=None):
        self.config, self.folder, self.device = config, folder, torch.device('cpu')


@pytest.mark.parametrize('error, cause', [
    (RuntimeError('[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can\'t allocate memory: you '
                  'tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)'),
     'it tried to allocate 536870912 bytes more'),
    (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total)'),
     'it tried to allocate 20.00 MiB more'),
    (MemoryError(), 'MemoryError')])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, capsys, error, cause):
    with pytest.raises(SystemExit) as stop:
        FakeRun({'batch_size': 512, 'd': 64})._stop_with_one_line(error)
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: out of memory on cpu ({cause}); lower --batch_size (now 512) or --d '
                                       f'(now 64), or free some memory, and run again\n')
    folder = RunFolder('M', {'results_dir': str(tmp_path), 'resume': True}, models={}, optimizers={}, exports={})
    folder.saved_epoch = 2
    with pytest.raises(SystemExit):
        FakeRun({'batch_size': 512}, folder)._stop_with_one_line(error)
    assert capsys.readouterr().err == (f'error: out of memory on cpu ({cause}); {tmp_path}/checkpoint.pt holds epoch '
                                       f'2: free some memory and run the same command again to resume, or lower '
                                       f'--batch_size (now 512) with --resume=false to start afresh\n')


def test_a_bug_is_no_memory_trouble_and_keeps_its_traceback(capsys):
    FakeRun({'batch_size': 512})._stop_with_one_line(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    assert capsys.readouterr().err == ''  # nothing said: the caller re-raises it whole


def test_a_run_out_of_memory_stops_with_one_line(mnist_dir, tmp_path):
    limit = 4 * 2 ** 30  # address space: torch and torchvision load within it; at d = 1024 a layer's weights are 2 GiB

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    probe = subprocess.run([sys.executable, '-c', 'import torch, torchvision.transforms.functional'],
                           preexec_fn=limited, env=ENV, capture_output=True)
    if probe.returncode:
        pytest.skip('torch does not load within the limit here')
    done = subprocess.run([sys.executable, str(REPO / 'mnist_dcgan.py'), f'--data_dir={mnist_dir}', '--results_dir=out',
                           '--train_epoch=1', '--batch_size=32', '--d=1024', '--quality_samples=0',
                           '--precision=fp32'],
                          cwd=tmp_path, preexec_fn=limited, env=ENV, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (1, 'error: out of memory on cpu (it tried to allocate 2147483648 bytes '
                                                 'more); lower --batch_size (now 32) or --d (now 1024), or free some '
                                                 'memory, and run again\n')
