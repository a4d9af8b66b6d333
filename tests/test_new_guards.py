"""New guards, to be placed by what they test: another model's checkpoint, the files a kill leaves, the CelebA
cache under torchrun, a dead preprocessing worker, animations that play, advice that leads somewhere."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageSequence

from conftest import OFFLINE, REPO, copy_results, folder_state, run_script, write_faces
from plumbing import images as plumbing_images

TINY = ['--train_limit=64', '--batch_size=32', '--device=cpu', '--quality_samples=50']
ENV = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def tiny(mnist_dir, results_dir, epochs, *extra):
    return [f'--data_dir={mnist_dir}', f'--results_dir={results_dir}', f'--train_epoch={epochs}', *TINY, *extra]


def one_line(result, status, start):
    assert result['status'] == status, result['stderr']
    assert result['stderr'].startswith(f'error: {start}') and result['stderr'].count('\n') == 1, result['stderr']


@pytest.fixture(scope='module')
def two_epochs(script_server, mnist_dir, tmp_path_factory):
    """A working folder whose out/ holds mnist_gan.py trained two tiny epochs (fid measured: a best G kept)."""
    work = tmp_path_factory.mktemp('two_epochs')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 0, result['stderr']
    return work


@pytest.fixture
def work(two_epochs, tmp_path):
    copy_results(two_epochs, tmp_path / 'work')
    return tmp_path / 'work'


def load(path):
    return torch.load(path, weights_only=True)


def equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_files_agree_with_the_checkpoint(out, model='MNIST_GAN'):
    """The history, the last and the best generator on disk are those the checkpoint holds (its best epoch is
    its last one in these tests, whose fid falls every epoch, so the best is its moving average of G)."""
    checkpoint = load(out / 'checkpoint.pt')
    with open(out / f'{model}_train_hist.json') as f:
        assert json.load(f)['epochs'] == checkpoint['history']
    average = {k.removeprefix('module.'): v for k, v in checkpoint['models']['generator_average'].items()
               if k.startswith('module.')}
    assert equal_states(load(out / f'{model}_generator.pt'), average)
    assert equal_states(load(out / f'{model}_discriminator.pt'), checkpoint['models']['discriminator'])
    assert min(checkpoint['history'], key=lambda h: h['fid'])['epoch'] == checkpoint['epoch']
    assert equal_states(load(out / f'{model}_generator_best.pt'), average)


# ---------------------------------------------------------------- another model's checkpoint

def test_a_fresh_start_refuses_a_folder_holding_another_models_checkpoint(work, script_server, mnist_dir):
    before = folder_state(work)
    result = script_server('mnist_cgan.py', tiny(mnist_dir, 'out', 1, '--resume=false'), work)
    one_line(result, 1, 'out/checkpoint.pt is the checkpoint of another model, MNIST_GAN; a fresh start of '
                        'MNIST_cGAN would remove it: pass another --results_dir')
    assert folder_state(work) == before  # the checkpoint, and raw_MNIST.png, as they were


def test_a_fresh_start_of_the_same_model_still_removes_its_own_outputs(work, script_server, mnist_dir):
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1, '--resume=false'), work)
    assert result['status'] == 0 and 'starting afresh; removed the' in result['stdout']
    assert load(work / 'out' / 'checkpoint.pt')['epoch'] == 1


# ---------------------------------------------------------------- what a kill leaves

KILLER = '''
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from plumbing import safe_files
from plumbing.results_folder import RunFolder
write, end_epoch, after = safe_files.atomic_write, RunFolder.end_epoch, int(os.environ['KILL_AFTER_WRITE'])
writes = None  # counted while an epoch's record is written
def atomic_write_then_die(path, *args, **kwargs):
    global writes
    write(path, *args, **kwargs)
    if writes is not None:
        writes += 1
        if writes == after:
            os.kill(os.getpid(), signal.SIGKILL)  # as a power cut right after this file was replaced
def counting_end_epoch(*args, **kwargs):
    global writes
    writes = 0
    end_epoch(*args, **kwargs)
safe_files.atomic_write, RunFolder.end_epoch = atomic_write_then_die, counting_end_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.mark.parametrize('kill_after', [1, 2, 3, 4, 5])
def test_a_kill_after_any_write_of_an_epoch_leaves_files_that_agree_once_rerun(work, mnist_dir, kill_after):
    """Epoch 3 writes five files (the checkpoint, the last G and D, the best G, the history): a kill after any of
    them, then the command that trained two epochs again, leaves history, weights and best generator as the
    checkpoint says, whichever epoch it holds."""
    (work / 'killer.py').write_text(KILLER.format(repo=str(REPO)))
    args = [sys.executable, str(work / 'killer.py'), str(REPO / 'mnist_gan.py'), *tiny(mnist_dir, 'out', 3)]
    killed = subprocess.run(args, cwd=work, env={**ENV, 'KILL_AFTER_WRITE': str(kill_after)}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_script('mnist_gan.py', *tiny(mnist_dir, 'out', 2), cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert_files_agree_with_the_checkpoint(work / 'out')
    best = min(load(work / 'out' / 'checkpoint.pt')['history'], key=lambda h: h['fid'])
    assert f"best generator: epoch {best['epoch']}," in resumed.stdout


def test_a_finished_run_rebuilds_every_output_its_checkpoint_can_make(work, script_server, mnist_dir):
    for name in ('MNIST_GAN_train_hist.json', 'MNIST_GAN_generator.pt', 'MNIST_GAN_generator_best.pt'):
        (work / 'out' / name).unlink()
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 0 and 'rebuilding the final outputs' in result['stdout']
    assert_files_agree_with_the_checkpoint(work / 'out')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2, '--generate=4', '--generate_from=last'), work)
    assert result['status'] == 0 and (work / 'out' / 'MNIST_GAN_generated.png').exists()


def test_without_the_best_generator_generate_says_why_and_a_resume_writes_it_again(work, script_server, mnist_dir):
    (work / 'out' / 'MNIST_GAN_generator_best.pt').unlink()
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2, '--generate=4'), work)
    assert result['status'] == 0
    assert result['stdout'].startswith('no out/MNIST_GAN_generator_best.pt: a run keeps one where it measures '
                                       'quality (quality_samples > 0), and a resume writes it again')
    assert 'quality was not measured' not in result['stdout']
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 3), work)
    assert result['status'] == 0 and (work / 'out' / 'MNIST_GAN_generator_best.pt').exists()
    assert_files_agree_with_the_checkpoint(work / 'out')


def test_a_folder_where_the_checkpoint_goes_is_one_line_before_any_training(script_server, mnist_dir, tmp_path):
    (tmp_path / 'out' / 'checkpoint.pt').mkdir(parents=True)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1, '--resume=false'), tmp_path)
    one_line(result, 1, 'out/checkpoint.pt is a folder, where this run writes a file; move it away or pass '
                        'another --results_dir')
    assert sorted(os.listdir(tmp_path / 'out')) == ['checkpoint.pt', 'run.lock']


# ---------------------------------------------------------------- the CelebA cache under torchrun

def torchrun(args, cwd):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'celeba_dcgan.py'), '--', *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_under_torchrun_a_damaged_cache_is_decoded_again_before_any_process_maps_it(tmp_path):
    write_faces(tmp_path / 'faces', {'female': 40, 'male': 40})
    args = ['--data_dir=faces', '--train_epoch=1', '--batch_size=16', '--d=8', '--device=cpu']
    clean = torchrun([*args, '--results_dir=clean'], tmp_path)
    assert clean.returncode == 0, clean.stderr
    cache = tmp_path / 'faces.u8'
    cache.write_bytes(bytes(cache.stat().st_size))  # zeroed after it was built: black faces
    damaged = torchrun([*args, '--results_dir=again'], tmp_path)
    assert damaged.returncode == 0, damaged.stderr
    assert 'does not match its checksum' in damaged.stdout
    losses = [[{k: h[k] for k in ('loss_d', 'loss_g', 'd_real', 'd_fake')}
               for h in json.loads((tmp_path / run / 'CelebA_DCGAN_train_hist.json').read_text())['epochs']]
              for run in ('clean', 'again')]
    assert losses[0] == losses[1]  # every process trained on the same, sound faces as the clean run


# ---------------------------------------------------------------- the preprocessing's workers

def test_a_dead_preprocessing_worker_ends_the_run_with_one_line_and_a_rerun_finishes(tmp_path):
    from test_celeba_preprocess import fake_face, name_of, write_txt
    count = 3000
    faces = [fake_face(i) for i in range(1, 31)]
    (tmp_path / 'many' / 'img_align_celeba').mkdir(parents=True)
    for i in range(1, count + 1):
        (tmp_path / 'many' / 'img_align_celeba' / name_of(i)).write_bytes(faces[i % 30])
    write_txt(tmp_path / 'many' / 'list_attr_celeba.txt', count)
    args = [sys.executable, str(REPO / 'celeba_preprocess.py'), '--celeba_dir=many', '--output_dir=out', '--workers=2']
    proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        written = sum(len(os.listdir(tmp_path / 'out' / c)) for c in ('female', 'male')
                      if (tmp_path / 'out' / c).is_dir())
        workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        if written >= 20 and workers:
            os.kill(int(workers[0]), signal.SIGKILL)  # as the out-of-memory killer would
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr.startswith('error: a worker process died (killed, or out of memory) after ') and \
        stderr.endswith('run the same command again: it converts those not written yet\n') and stderr.count('\n') == 1
    again = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sum(len([n for n in os.listdir(tmp_path / 'out' / c) if n.endswith('.jpg')]) for c in ('female', 'male')) \
        == count


def test_a_sigterm_ends_the_preprocessing_with_one_line(tmp_path):
    from test_celeba_preprocess import fake_face, name_of, write_txt
    (tmp_path / 'many' / 'img_align_celeba').mkdir(parents=True)
    face = fake_face(1)
    for i in range(1, 3001):
        (tmp_path / 'many' / 'img_align_celeba' / name_of(i)).write_bytes(face)
    write_txt(tmp_path / 'many' / 'list_attr_celeba.txt', 3000)
    args = [sys.executable, str(REPO / 'celeba_preprocess.py'), '--celeba_dir=many', '--output_dir=out', '--workers=2']
    proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((tmp_path / 'out' / 'male').is_dir() and
                                          len(os.listdir(tmp_path / 'out' / 'male')) >= 20):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.startswith('error: stopped by SIGTERM') and stderr.count('\n') == 1


@pytest.mark.parametrize('make, line', [
    (lambda root: (root / 'list_attr_celeba.txt').mkdir(),
     "cannot read {root}/list_attr_celeba.txt (Is a directory); it should be CelebA's attribute file, readable"),
    (lambda root: (root / 'img_align_celeba').write_text('a file'),
     "cannot read {root}/img_align_celeba (Not a directory); it should be CelebA's folder of faces, readable"),
    (lambda root: (root / 'img_align_celeba.zip').mkdir(),
     "cannot read {root}/img_align_celeba.zip (Is a directory); it should be the zip of CelebA's faces, readable"),
], ids=['attributes_a_folder', 'images_a_file', 'zip_a_folder'])
def test_celeba_as_downloaded_but_of_the_wrong_kind_is_one_line(tmp_path, make, line):
    from test_celeba_preprocess import write_txt
    root = tmp_path / 'celeba'
    root.mkdir()
    make(root)
    if not (root / 'list_attr_celeba.txt').exists():
        write_txt(root / 'list_attr_celeba.txt', 3)
    if not any((root / name).exists() for name in ('img_align_celeba', 'img_align_celeba.zip')):
        (root / 'img_align_celeba').mkdir()
    result = run_script('celeba_preprocess.py', '--celeba_dir=celeba', '--output_dir=out', cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, f"error: {line.format(root='celeba')}\n")


# ---------------------------------------------------------------- pictures that show what they say

def test_the_animation_shows_each_epoch_for_half_a_second(work):
    for gif in [work / 'out' / 'MNIST_GAN_generation_animation.gif', *sorted((REPO / 'assets').glob('*.gif'))]:
        with Image.open(gif) as im:
            durations = [frame.info.get('duration') for frame in ImageSequence.Iterator(im)]
            assert im.info.get('loop') == 0
        assert len(durations) > 1 and set(durations) == {500}, gif


def test_the_plots_tick_whole_epochs_only(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, 'close', figures.append)
    history = [{'epoch': e, 'loss_d': 1.0 / e, 'loss_g': float(e)} for e in (1, 2, 3)]
    plumbing_images.plot_curves(history, [('loss', ['loss_d', 'loss_g'], 'linear')], str(tmp_path / 'p.png'))
    ticks = figures[0].axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
    assert (tmp_path / 'p.png').exists()


# ---------------------------------------------------------------- advice that leads somewhere

def test_the_advice_for_a_missing_classifier_writes_one_where_it_is_looked_for(tmp_path, mnist_dir, capsys):
    from plumbing.mnist_quality import load_classifier
    path = tmp_path / 'mnist_classifier.pt'
    with pytest.raises(SystemExit):
        load_classifier(str(path), 'cpu')
    line = capsys.readouterr().err
    assert line == (f"error: no trained MNIST classifier at {path}; train one there: python mnist_classifier.py "
                    f"--weights={path} --overwrite=True\n")
    advised = line.split('train one there: python ')[1].split()
    result = run_script(*advised, f'--data_dir={mnist_dir}', '--train_epoch=1', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_classifier(str(path), 'cpu') is not None


def test_the_shipped_classifiers_advice_restores_it(monkeypatch, tmp_path, capsys):
    from plumbing import mnist_quality
    monkeypatch.setattr(mnist_quality, 'DEFAULT_WEIGHTS', str(tmp_path / 'mnist_classifier.pt'))
    with pytest.raises(SystemExit):
        mnist_quality.load_classifier(mnist_quality.DEFAULT_WEIGHTS, 'cpu')
    advice = capsys.readouterr().err
    assert 'restore the shipped file (in a clone: git checkout -- mnist_classifier.pt), or train one there: ' \
           f'python mnist_classifier.py --weights={tmp_path}/mnist_classifier.pt --overwrite=True' in advice


def test_a_batch_larger_than_the_data_says_how_many_images_there_are(script_server, mnist_dir, tmp_path):
    result = script_server('mnist_gan.py', [f'--data_dir={mnist_dir}', '--results_dir=out', '--batch_size=70000'],
                           tmp_path)
    one_line(result, 1, f'{mnist_dir}/MNIST/raw/ holds 512 training image(s), less than one batch of 70000; '
                        f'pass --batch_size=512 or lower')
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=out', '--train_limit=1000',
                                               '--batch_size=512', '--d=8'], tmp_path)
    one_line(result, 1, 'faces/ holds 40 training image(s), less than one batch of 512; pass --batch_size=40 or lower')


def test_a_stray_face_of_another_size_is_named(script_server, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    Image.new('RGB', (65, 64)).save(tmp_path / 'faces' / 'male' / 'stray.png')
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=out', '--batch_size=8', '--d=8'],
                           tmp_path)
    one_line(result, 1, '1 of the 41 images in faces/ are not 64x64: faces/male/stray.png (65x64); '
                        'move them out of faces/')


def test_a_results_folder_inside_the_faces_folder_is_refused(script_server, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=faces/male/out', '--d=8'], tmp_path)
    one_line(result, 2, '--results_dir=faces/male/out is inside the faces\' folder faces/; pass a --results_dir '
                        'outside it')


@pytest.mark.parametrize('value', ['nan', 'inf', '1e309', '-inf'])
def test_a_learning_rate_that_is_no_finite_number_says_so(script_server, mnist_dir, tmp_path, value):
    result = script_server('mnist_gan.py', [f'--data_dir={mnist_dir}', f'--lr={value}'], tmp_path)
    one_line(result, 2, f'--lr={value}: expected a finite number (default 0.0002)')


@pytest.mark.parametrize('redirect', ['closed', 'full'])
def test_a_lost_or_full_stdout_stops_neither_training_nor_help_nor_generate(mnist_dir, tmp_path, redirect):
    def run(*args):
        stdout = subprocess.DEVNULL if redirect == 'closed' else open('/dev/full', 'w')
        command = [sys.executable, str(REPO / 'mnist_gan.py'), *args]
        if redirect == 'closed':
            command = ['bash', '-c', '"$@" >&-', 'run', *command]
        return subprocess.run(command, cwd=tmp_path, env=ENV, stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    trained = run(*tiny(mnist_dir, 'out', 1))
    assert (trained.returncode, trained.stderr) == (0, '')
    assert (tmp_path / 'out' / 'checkpoint.pt').exists()
    for args in (['--help'], [*tiny(mnist_dir, 'out', 1), '--generate=4']):
        result = run(*args)
        assert (result.returncode, result.stderr) == (0, '')
    assert (tmp_path / 'out' / 'MNIST_GAN_generated.png').exists()


def test_a_script_started_through_a_link_finds_the_mnist_shipped_beside_it(tmp_path):
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'gan.py').symlink_to(REPO / 'mnist_gan.py')
    result = subprocess.run([sys.executable, 'gan.py', '--train_epoch=1', *TINY, '--results_dir=out'],
                            cwd=tmp_path / 'other', env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'download' not in result.stdout and not (tmp_path / 'other' / 'data').exists()


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


def test_a_damaged_face_advises_the_celeba_dir_its_rerun_needs(script_server, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    (tmp_path / 'faces' / 'celeba_preprocess.json').write_text(json.dumps({'isCrop': False, 'img_size': 64}))
    (tmp_path / 'faces' / 'male' / '000005.jpg').write_bytes(b'')
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=out', '--batch_size=8', '--d=8'],
                           tmp_path)
    one_line(result, 1, 'cannot decode faces/male/000005.jpg: it is damaged; delete it and make it again with: '
                        'python celeba_preprocess.py --output_dir=faces (with --celeba_dir=FOLDER where CelebA as '
                        'downloaded is not in data/celebA/)')
