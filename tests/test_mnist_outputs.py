"""The four MNIST scripts' outputs (README, Outputs and generating), end to end at tiny scale on IDX files the
fixtures write: what a run prints, the files it writes, the grids' layouts, the animation and the plots, the best
generator, --generate; a resumed run's outputs equal to an uninterrupted run's; the files made from the
checkpoint, which agree with it after a kill at any write, a rebuild or a fresh start (README, Resume: never
losing a run); nothing written on import, no stop when stdout closes or fills."""
import contextlib
import importlib
import io
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageSequence

from conftest import ENV, REPO, ModelWatch, assert_same_picture, assert_same_run, copy_results, folder_state, history, \
    one_line, png_pixels, render, run_in_process, run_script, start, tiny, tiny_args
from plumbing import images as plumbing_images

# script, model name, image side, grid columns, conditional, has a Random_results grid
SCRIPTS = [
    ('mnist_gan.py', 'MNIST_GAN', 28, 5, False, True),
    ('mnist_cgan.py', 'MNIST_cGAN', 28, 10, True, False),
    ('mnist_dcgan.py', 'MNIST_DCGAN', 64, 5, False, True),
    ('mnist_cdcgan.py', 'MNIST_cDCGAN', 32, 10, True, False),
]


def grid_side(columns, side):
    return columns * (side + 2) + 2  # make_grid's 2-pixel padding around every image


@pytest.fixture(scope='module', params=SCRIPTS, ids=[s[0] for s in SCRIPTS])
def trained(request, mnist_dir, tmp_path_factory):
    """Each script trained 2 tiny epochs, in this process with every call of G recorded; shared by the output
    checks below."""
    script, model, side, columns, conditional, has_random = request.param
    work = tmp_path_factory.mktemp(model)
    printed = io.StringIO()
    with ModelWatch(roles=('Generator',)) as watch, contextlib.redirect_stdout(printed):
        run_in_process(script, *tiny_args(script, mnist_dir, work / 'out'))
    return dict(script=script, model=model, side=side, columns=columns, conditional=conditional,
                has_random=has_random, out=work / 'out', stdout=printed.getvalue(),
                sampled=watch.of('Generator', training=False))


@pytest.fixture(scope='module')
def two_epochs(script_server, mnist_dir, tmp_path_factory):
    """A working folder whose out/ holds mnist_gan.py trained two tiny epochs (fid measured: a best G kept)."""
    work = tmp_path_factory.mktemp('two_epochs')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 0, result['stderr']
    return work


@pytest.fixture
def work(two_epochs, tmp_path):
    """A copy of the folder trained two epochs, for one test (conftest.py's work holds one epoch)."""
    copy_results(two_epochs, tmp_path / 'work')
    return tmp_path / 'work'


# ---------------------------------------------------------------- what a run prints and writes; --generate

def test_prints_the_device_precision_and_why_then_the_seed_epoch_lines_and_total(trained):
    lines = trained['stdout'].splitlines()
    assert lines[0].startswith('cpu, ') and ': ' in lines[0]  # e.g. 'cpu, bf16 autocast: this CPU has AMX'
    assert lines[1].startswith('[1/2] - ptime: ') and 'loss_d: ' in lines[1] and 'img/s' in lines[1]
    assert lines[2].startswith('[2/2] - ptime: ')
    assert any(line.startswith('Avg one epoch ptime: ') and 'total 2 epochs ptime: ' in line for line in lines)


def test_every_output_is_written_and_readable(trained):
    out, model, side, columns = trained['out'], trained['model'], trained['side'], trained['columns']
    folders = ['Fixed_results'] + (['Random_results'] if trained['has_random'] else [])
    for folder in folders:
        for epoch in (1, 2):
            with Image.open(out / folder / f'{model}_{epoch}.png') as grid:
                # the caption strip "Epoch N" sits below the square grid
                assert grid.width == grid_side(columns, side) and grid.height > grid.width
    with Image.open(out / 'raw_MNIST.png') as raw:
        assert raw.width == grid_side(columns, side)
    with Image.open(out / f'{model}_train_hist.png') as plot:
        assert plot.width > 100
    with Image.open(out / f'{model}_generation_animation.gif') as gif:
        assert gif.n_frames == 2
    with Image.open(out / f'{model}_quality.png') as plot:
        assert plot.width > 100
    hist = history(out, model)
    assert [e['epoch'] for e in hist['epochs']] == [1, 2]
    measured = ['fid', 'class_entropy'] + (['class_acc'] if trained['conditional'] else [])
    for entry in hist['epochs']:
        for key in ('loss_d', 'loss_g', 'd_real', 'd_fake', 'seconds', 'images_per_second', *measured):
            assert math.isfinite(entry[key])
        assert 0 <= entry['class_entropy'] <= math.log(10) + 1e-6
    assert ('class_acc' in hist['epochs'][0]) == trained['conditional']
    best = min(hist['epochs'], key=lambda e: e['fid'])
    assert f"best generator: epoch {best['epoch']}, fid {best['fid']:.2f}" in trained['stdout']
    assert hist['config']['train_epoch'] == 2 and hist['config']['d' if 'DC' in model else 'z_dim'] in (8, 100)
    assert hist['total_seconds'] == pytest.approx(sum(e['seconds'] for e in hist['epochs']))


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


def widths(trained):
    return {'d': 8} if 'DC' in trained['model'] else {}


def load_generator(trained, which='generator'):
    module = importlib.import_module(trained['script'][:-3])
    G = module.Generator(**widths(trained))
    G.load_state_dict(torch.load(trained['out'] / f"{trained['model']}_{which}.pt", weights_only=True))
    torch.load(trained['out'] / f"{trained['model']}_discriminator.pt", weights_only=True)
    return module, G.eval()


def checkpoint(trained):
    return torch.load(trained['out'] / 'checkpoint.pt', weights_only=True)


def test_the_best_generator_is_the_epoch_of_the_lowest_fid(trained, mnist_dir):
    """Scored here on the run's fixed quality inputs, the kept generator gives the history's lowest fid."""
    from plumbing.mnist_quality import MnistQuality
    _, best = load_generator(trained, 'generator_best')
    fixed = checkpoint(trained)['fixed']
    conditions = (fixed['quality_labels'],) if trained['conditional'] else ()
    with torch.no_grad():
        images = best(fixed['quality_z'], *conditions)
    fid = MnistQuality(str(mnist_dir), trained['side'], 'cpu').score(images, *conditions)['fid']
    fids = [e['fid'] for e in history(trained['out'], trained['model'])['epochs']]
    assert fid == pytest.approx(min(fids), rel=1e-4) and fid != pytest.approx(max(fids), rel=1e-4)


def class_rows(columns_z, classes):
    """The README's conditional layout: row i is class i, column j the same noise vector in every row."""
    columns = len(columns_z)
    return columns_z.repeat(classes, 1), torch.arange(classes).repeat_interleave(columns)


def sampled_on(trained, z):
    """The inputs of each sampling of G (the average) on exactly this noise, in order."""
    return [call.inputs for call in trained['sampled'] if torch.equal(call.inputs[0], z)]


def test_the_fixed_grid_shows_the_fixed_inputs_in_the_documented_layout(trained):
    """The checkpoint's fixed inputs follow the README's layout; every epoch's grid was sampled on exactly them;
    the last one is the saved generator's images of them, rendered here."""
    _, G = load_generator(trained)
    fixed = checkpoint(trained)['fixed']
    columns = trained['columns']
    if trained['conditional']:
        inputs = class_rows(fixed['z'][:columns], 10)
        assert torch.equal(fixed['z'], inputs[0]) and torch.equal(fixed['labels'], inputs[1])
    else:
        inputs = (fixed['z'],)
        assert len(fixed['z']) == columns * columns
    sampled = sampled_on(trained, inputs[0])
    assert len(sampled) == 2, 'one grid of the fixed noise per epoch'
    assert all(torch.equal(given[-1], inputs[-1]) for given in sampled), 'the grid was sampled with other labels'
    expected = render(G, inputs, columns)
    written = png_pixels(trained['out'] / 'Fixed_results' / f"{trained['model']}_2.png", expected.shape[1])
    assert_same_picture(written, expected)


def test_the_random_grid_shows_fresh_noise_each_epoch(trained):
    """Random_results: a 5x5 grid of noise drawn anew each epoch; the last one is the saved generator's images
    of that noise, rendered here."""
    if not trained['has_random']:
        pytest.skip('no Random_results grid')
    fixed = checkpoint(trained)['fixed']
    grids = [call.inputs[0] for call in trained['sampled']
             if len(call.inputs[0]) == 25 and not torch.equal(call.inputs[0], fixed['z'])]
    assert len(grids) == 2 and not torch.equal(grids[0], grids[1]), 'one grid of fresh noise per epoch'
    _, G = load_generator(trained)
    expected = render(G, (grids[-1],), 5)
    written = png_pixels(trained['out'] / 'Random_results' / f"{trained['model']}_2.png", expected.shape[1])
    assert_same_picture(written, expected)


def test_generator_reloads_with_the_documented_calling_convention(trained):
    module, G = load_generator(trained)
    z = module.noise(6, torch.device('cpu'))
    assert z.shape == (6, G.z_dim) and z.dtype == torch.float32
    args = (z, torch.tensor([0, 1, 2, 3, 4, 9])) if trained['conditional'] else (z,)
    with torch.no_grad():
        images = G(*args)
    side = trained['side']
    assert images.shape == (6, 1, side, side)
    assert images.min() >= -1 and images.max() <= 1


def test_generate_draws_the_documented_grid_from_the_best_generator(trained):
    """--generate=3: three samples per digit, a row each with the same noise in every row (conditional), or
    three in the squarest grid; rendered here from the best generator and the noise G was given."""
    width = [f'--d={w}' for w in widths(trained).values()]
    with ModelWatch() as watch:
        run_in_process(trained['script'], f"--results_dir={trained['out']}", *width, '--generate=3', '--device=cpu')
    given = watch.of('Generator', training=False)
    z = torch.cat([call.inputs[0] for call in given])
    _, G = load_generator(trained, 'generator_best')  # --generate's default, generate_from='best'
    if trained['conditional']:
        inputs = class_rows(z[:3], 10)
        assert torch.equal(z, inputs[0]), 'each row has the same 3 noise vectors'
        assert torch.equal(torch.cat([call.inputs[1] for call in given]), inputs[1]), 'row i is digit i'
        assert len(z[:3].unique(dim=0)) == 3
        expected = render(G, inputs, 3)
    else:
        assert len(z) == 3 and len(z.unique(dim=0)) == 3
        expected = render(G, (z,), 2)
    assert_same_picture(png_pixels(trained['out'] / f"{trained['model']}_generated.png"), expected)


# ---------------------------------------------------------------- a resumed run: the outputs of an uninterrupted one

def test_a_resumed_run_equals_an_uninterrupted_one(trained, mnist_dir, tmp_path, capsys):
    """One epoch, then resumed for the second: the same history and the same weights and optimizer states,
    to the last bit (on the CPU), as the fixture's uninterrupted 2-epoch run."""
    script, model, out = trained['script'], trained['model'], tmp_path / 'resumed'
    run_in_process(script, *tiny_args(script, mnist_dir, out, 1))
    capsys.readouterr()
    run_in_process(script, *tiny_args(script, mnist_dir, out, 2))
    printed = capsys.readouterr().out
    assert 'resuming after epoch 1' in printed and printed.count('] - ptime') == 1
    assert_same_run(out, trained['out'], model)
    with Image.open(out / f'{model}_generation_animation.gif') as gif:
        assert gif.n_frames == 2
    run_in_process(script, *tiny_args(script, mnist_dir, out, 2))
    assert 'already trained 2 epochs' in capsys.readouterr().out


# ---------------------------------------------------------------- the files made from the checkpoint agree with it

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


# ---------------------------------------------------------------- no output on import; no stop when stdout closes

def test_importing_has_no_side_effects(tmp_path):
    code = "import sys; sys.argv = ['x', '--bogus=1']; " + '; '.join(
        f"import {s[:-3]}" for s, *_ in SCRIPTS) + "; print('imported')"
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                            env={'PYTHONPATH': str(REPO), 'PATH': '/usr/bin:/bin'}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'imported\n'
    assert list(tmp_path.iterdir()) == []


def test_losing_stdout_does_not_stop_the_training(mnist_dir, tmp_path):
    process = start('mnist_gan.py', tiny(mnist_dir, 'out', 3), tmp_path)
    assert process.stdout.readline().startswith('cpu, ')  # `| head -1`: one line read, then the pipe closes
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert 'Traceback' not in stderr and 'BrokenPipe' not in stderr
    assert torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['epoch'] == 3


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
