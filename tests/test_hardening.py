"""Nothing silently wrong, nothing lost (issue #11): ranges of the constants, one run per results folder,
an epoch line only after its checkpoint, honest messages, failed writes and damaged data as one line.

Runs that stop at once go through the script server (a fresh process each, without loading torch each
time); what needs a process of its own (two at once, a kill, a Ctrl-C, a file size limit) starts one.
"""
import errno
import gzip
import json
import multiprocessing
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

from plumbing import celeba, data, folder_lock, results_folder, safe_files
from conftest import REPO, assert_refused, folder_state, run_script, start, tiny, write_faces


def replace_file(path, data):
    path.unlink()  # not written in place: the copy shares its files with the trained folder
    path.write_bytes(data)


# ---------------------------------------------------------------- 1. every constant in its range

# ---------------------------------------------------------------- 2. one run per results folder

def wait_for_line(process, prefix, timeout=180):
    """The first line of process's stdout that starts with prefix, read as soon as it is printed."""
    deadline = time.time() + timeout
    for line in process.stdout:
        if line.startswith(prefix):
            return line
        assert time.time() < deadline, f'no line starting {prefix!r} in {timeout} s'
    raise AssertionError(f'the process ended without a line starting {prefix!r}: {process.stderr.read()}')


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


# ---------------------------------------------------------------- 3. honest order and messages

def test_an_epoch_line_is_printed_only_once_its_checkpoint_is_on_disk(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1000), tmp_path)
    wait_for_line(process, '[1/1000]')
    process.send_signal(signal.SIGKILL)  # the moment the line appears
    process.communicate()
    assert torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] >= 1


def test_ctrl_c_says_which_epoch_the_checkpoint_really_holds(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 1000), tmp_path)
    wait_for_line(process, '[1/1000]')
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    saved = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch']
    assert process.returncode == 130
    assert stderr == (f'error: interrupted; out/checkpoint.pt holds epoch {saved}. '
                      f'Run the same command again to resume\n')


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path, capsys):
    run = results_folder.RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    run.history = [{'epoch': 1}]  # recorded, but interrupted before its checkpoint was written
    with pytest.raises(SystemExit) as stop:
        run.interrupted(KeyboardInterrupt())
    assert stop.value.code == 130
    assert capsys.readouterr().err == ('error: interrupted before the first epoch was saved; '
                                       'run the same command again to start\n')


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


def test_a_checkpoint_of_another_model_is_named_as_such(work, script_server, mnist_dir):
    before = folder_state(work)
    assert_refused(script_server('mnist_cgan.py', tiny(mnist_dir, 'out', 2), work), 1,
                   'out/checkpoint.pt is a checkpoint of MNIST_GAN (made by mnist_gan.py), not of MNIST_cGAN; '
                   'pass another --results_dir')
    assert folder_state(work) == before


def test_resuming_with_other_quality_samples_names_them(work, script_server, mnist_dir):
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2, '--quality_samples=0'), work), 1,
                   'out/checkpoint.pt was made with other constants: quality_samples=50 (now 0); pass those, '
                   'use another --results_dir, or --resume=false to start afresh')
    assert folder_state(work) == before


def test_a_damaged_checkpoint_is_called_damaged(work, script_server, mnist_dir):
    checkpoint = work / 'out' / 'checkpoint.pt'
    replace_file(checkpoint, checkpoint.read_bytes()[:5000])
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work), 1,
                   'out/checkpoint.pt is damaged: it cannot be read as a file of weights; delete it or pass '
                   '--resume=false to start afresh, or pass another --results_dir')
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


# ---------------------------------------------------------------- 4. failed writes

@pytest.mark.parametrize('results_dir, cause', [('taken', 'File exists'), ('taken/below', 'Not a directory')])
def test_a_results_folder_where_a_file_is_stops_with_one_line(script_server, mnist_dir, tmp_path, results_dir, cause):
    (tmp_path / 'taken').write_text('a file')
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, results_dir, 1), tmp_path), 1,
                   f'cannot make the folder {results_dir} ({cause}); a file stands where a folder should be; '
                   f'move it away or choose another folder')
    assert [p.name for p in tmp_path.iterdir()] == ['taken'] and (tmp_path / 'taken').read_text() == 'a file'


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


def test_celeba_preprocess_on_a_full_disk_stops_with_one_line_and_no_partial_face(tmp_path):
    from test_celeba_preprocess import LISTED, write_images, write_txt
    write_images(str(tmp_path / 'celeba' / 'img_align_celeba'))
    write_txt(str(tmp_path / 'celeba' / 'list_attr_celeba.txt'), LISTED)

    def full_at_a_kilobyte():  # no 64x64 face fits: PIL's JPEG encoder would write the first 1000 bytes, silently
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    result = run_script('celeba_preprocess.py', '--celeba_dir=celeba', '--output_dir=out', '--workers=1',
                        cwd=tmp_path, preexec_fn=full_at_a_kilobyte)
    assert result.returncode == 1
    assert result.stderr == ('error: cannot write out/female/000001.jpg (File too large); free some space '
                             '(or lift the limit on file sizes), then run the same command again\n')
    written = [path for path in (tmp_path / 'out').rglob('*') if path.is_file()]
    assert written == [tmp_path / 'out' / 'celeba_preprocess.json']  # its settings, and no cut face, no temp file


def test_after_a_failed_write_the_preprocessing_workers_skip_the_rest_and_end_without_terminate(tmp_path):
    import celeba_preprocess
    from test_celeba_preprocess import fake_face
    source = tmp_path / 'face.jpg'
    source.write_bytes(fake_face(1))
    jobs = [(f'{i:06d}.jpg', str(source), str(tmp_path / 'no_such_folder' / f'{i:06d}.jpg')) for i in range(800)]
    results = celeba_preprocess.convert_all(jobs, None, 64, False, processes=1)
    problems = [problem for _, problem, _ in results]
    assert len(results) == len(jobs) and set(problems) == {'unwritable', 'skipped'}
    assert problems.count('skipped') >= 400  # the flag stopped the worker within its next 64-image chunk or two
    error = results[0][2]
    assert (error.errno, error.filename) == (errno.ENOENT, jobs[0][2])
    assert multiprocessing.active_children() == []  # closed and joined


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


def test_an_unwritable_results_folder_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(path, mode):  # as open() fails for a user without write permission on the folder
        raise PermissionError(errno.EACCES, 'Permission denied', path)
    monkeypatch.setattr(folder_lock, 'open', refuse, raising=False)
    with pytest.raises(SystemExit) as stop:
        results_folder.RunFolder('M', {'results_dir': str(tmp_path)}, models={}, optimizers={}, exports={})
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: cannot write {tmp_path}/run.lock (Permission denied); make its '
                                       f'folder writable or choose another, then run the same command again\n')


# ---------------------------------------------------------------- 5. damaged data

IMAGES = 'train-images-idx3-ubyte'
LABELS = 'train-labels-idx1-ubyte'


DAMAGED_MNIST = [
    (IMAGES + '.gz', lambda gz, raw: gz[:-100],
     'its gzip data is damaged: Compressed file ended before the end-of-stream marker was reached'),
    (IMAGES + '.gz', lambda gz, raw: b'no gzip here' * 10, "its gzip data is damaged: Not a gzipped file (b'no')"),
    (IMAGES + '.gz', lambda gz, raw: gzip.compress(b''), 'it is empty'),
    (IMAGES + '.gz', lambda gz, raw: b'', 'it is empty'),
    (IMAGES, lambda gz, raw: b'', 'it is empty'),
    (IMAGES, lambda gz, raw: raw[:5000], 'its header announces 401,408 bytes of data but it holds 4,984: it is '
                                         'truncated or damaged'),
    (IMAGES, lambda gz, raw: b'\x00\x00\x0d\x03' + raw[4:], 'it is not an IDX file of unsigned bytes'),
    (IMAGES, lambda gz, raw: raw[:10], 'its header is cut short'),
]


@pytest.mark.parametrize('name, damage, problem', DAMAGED_MNIST, ids=[problem[:30] for _, _, problem in DAMAGED_MNIST])
def test_a_damaged_mnist_file_is_one_line_naming_it(mnist_dir, tmp_path, capsys, name, damage, problem):
    raw_dir = tmp_path / 'MNIST' / 'raw'
    shutil.copytree(mnist_dir / 'MNIST' / 'raw', raw_dir)
    gz = (raw_dir / (IMAGES + '.gz')).read_bytes()
    (raw_dir / name).write_bytes(damage(gz, gzip.decompress(gz)))  # the unzipped name is read first
    with pytest.raises(SystemExit) as stop:
        data.load_mnist(str(tmp_path))
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: {raw_dir / name} is damaged: {problem}; replace it with a good '
                                       f'copy, or delete it to download MNIST again\n')


def test_mnist_labels_that_are_no_digits_are_one_line(mnist_dir, tmp_path, capsys):
    raw_dir = tmp_path / 'MNIST' / 'raw'
    shutil.copytree(mnist_dir / 'MNIST' / 'raw', raw_dir)
    raw = bytearray(gzip.decompress((raw_dir / (LABELS + '.gz')).read_bytes()))
    raw[-1] = 10
    (raw_dir / LABELS).write_bytes(bytes(raw))
    with pytest.raises(SystemExit):
        data.load_mnist(str(tmp_path))
    assert capsys.readouterr().err == (f'error: {raw_dir / LABELS} does not hold digit labels 0-9; replace it with '
                                       f'a good copy, or delete it to download MNIST again\n')


def test_a_script_on_a_damaged_mnist_file_stops_before_writing(work, script_server, mnist_dir):
    data = work / 'data'
    shutil.copytree(mnist_dir, data)
    (data / 'MNIST' / 'raw' / (IMAGES + '.gz')).write_bytes(b'')
    before = folder_state(work / 'out')
    assert_refused(script_server('mnist_gan.py', tiny(data, 'out', 2), work), 1,
                   f'{data}/MNIST/raw/{IMAGES}.gz is damaged: it is empty; replace it with a good copy, '
                   f'or delete it to download MNIST again')
    assert folder_state(work / 'out') == before


def test_a_damaged_face_is_one_line_and_leaves_no_cache(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    damaged = sorted((tmp_path / 'faces' / 'male').iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.raises(SystemExit) as stop:
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'python celeba_preprocess.py')
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: cannot decode {damaged}: it is damaged; replace it with a good copy, '
                                       f'or move it out of {tmp_path}/faces/\n')  # no settings file: not ours
    assert os.listdir(tmp_path) == ['faces']  # no cache, no temporary file


@pytest.mark.parametrize('damage', ['index', 'cut short'])
def test_a_damaged_cache_is_decoded_again(tmp_path, capsys, damage):
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    images, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    images = images.clone()  # not the mapped file, which is cut short below
    if damage == 'index':
        (tmp_path / 'faces.u8.json').write_text('{"fingerprint": ')
    else:
        os.truncate(tmp_path / 'faces.u8', 1000)
    capsys.readouterr()
    again, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert 'decoding the 5 images' in capsys.readouterr().out
    assert torch.equal(again, images)


def test_a_folder_where_the_cache_belongs_is_one_line(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    (tmp_path / 'faces.u8').mkdir()
    with pytest.raises(SystemExit):
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert capsys.readouterr().err == (f'error: cannot write {tmp_path}/faces.u8 (Is a directory); a folder stands '
                                       f'where the file should be; move it away or choose another folder\n')
    assert sorted(os.listdir(tmp_path)) == ['faces', 'faces.u8']
