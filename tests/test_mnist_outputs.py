"""The four MNIST scripts' outputs (README, Outputs and generating), end to end at tiny scale on IDX files the
fixtures write: what a run prints, the files it writes and the grids' layouts, the best generator, --generate; a
resumed run's outputs equal to an uninterrupted run's; nothing written on import, no stop when stdout closes."""
import contextlib
import importlib
import io
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, ModelWatch, assert_same_picture, assert_same_run, history, png_pixels, render, \
    run_in_process, start, tiny, tiny_args

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
