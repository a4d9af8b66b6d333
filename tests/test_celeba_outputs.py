"""celeba_dcgan.py's and celeba_cdcgan.py's outputs (README, Outputs and generating; CelebA), end to end at tiny
scale on folders of 64x64 JPEG faces written here: what a run prints, the files it writes, the gender layouts of
the grids and the morphing image, --generate, the crop variant's folders; a resumed run's outputs equal to an
uninterrupted run's; nothing written on import. Reading the faces: test_data.py."""
import contextlib
import importlib
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, ModelWatch, assert_same_picture, assert_same_run, history, png_pixels, render, \
    run_in_process, run_script, write_faces

# script, model name, fixed grid columns, conditional
SCRIPTS = [('celeba_dcgan.py', 'CelebA_DCGAN', 5, False), ('celeba_cdcgan.py', 'CelebA_cDCGAN', 4, True)]
TINY = ['--d=8', '--batch_size=8', '--device=cpu', '--quality_samples=0']
FACES = {'female': 24, 'male': 16}       # data/resized_celebA
CROP_FACES = {'female': 12, 'male': 12}  # data/resized_celebA_crop


def grid_side(columns, side=64):
    return columns * (side + 2) + 2  # make_grid's 2-pixel padding around every image


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A working folder with both preprocessed variants where the scripts look by default."""
    work = tmp_path_factory.mktemp('celeba')
    write_faces(work / 'data' / 'resized_celebA', FACES)
    write_faces(work / 'data' / 'resized_celebA_crop', CROP_FACES, seed=1)
    return work


@pytest.fixture(scope='module', params=SCRIPTS, ids=[s[0] for s in SCRIPTS])
def trained(request, work):
    """Each script trained 2 tiny epochs with the default folders, in this process with every call of G recorded;
    shared by the output checks below."""
    script, model, columns, conditional = request.param
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(work)  # the default folders are relative to it
    try:
        with ModelWatch(roles=('Generator',)) as watch, contextlib.redirect_stdout(printed):
            run_in_process(script, '--train_epoch=2', *TINY)
    finally:
        os.chdir(cwd)
    return dict(script=script, model=model, columns=columns, conditional=conditional, out=work / f'{model}_results',
                stdout=printed.getvalue(), work=work, sampled=watch.of('Generator', training=False))


# ---------------------------------------------------------------- what a run prints and writes; --generate

def test_prints_the_device_precision_and_why_then_the_seed_epoch_lines_and_total(trained):
    lines = [line for line in trained['stdout'].splitlines() if not line.startswith('decoding')]
    assert lines[0].startswith('cpu, ') and ': ' in lines[0]  # e.g. 'cpu, bf16 autocast: this CPU has AMX'
    assert lines[1].startswith('[1/2] - ptime: ') and 'loss_d: ' in lines[1] and 'img/s' in lines[1]
    assert lines[2].startswith('[2/2] - ptime: ')
    assert any(line.startswith('Avg one epoch ptime: ') and 'total 2 epochs ptime: ' in line for line in lines)


def test_every_output_is_written_and_readable(trained):
    out, model, columns = trained['out'], trained['model'], trained['columns']
    for epoch in (1, 2):
        with Image.open(out / 'Fixed_results' / f'{model}_{epoch}.png') as grid:
            # the caption strip "Epoch N" sits below the square grid
            assert grid.width == grid_side(columns) and grid.height > grid.width
    with Image.open(out / 'raw_CelebA.png') as raw:
        assert raw.size == (grid_side(columns), grid_side(columns))
    with Image.open(out / f'{model}_train_hist.png') as plot:
        assert plot.width > 100
    with Image.open(out / f'{model}_generation_animation.gif') as gif:
        assert gif.n_frames == 2
    hist = history(out, model)
    assert [e['epoch'] for e in hist['epochs']] == [1, 2]
    for entry in hist['epochs']:
        for key in ('loss_d', 'loss_g', 'd_real', 'd_fake', 'seconds', 'images_per_second'):
            assert math.isfinite(entry[key])
    # The '' defaults are recorded as the folders actually used.
    assert hist['config']['data_dir'] == 'data/resized_celebA'
    assert hist['config']['results_dir'] == f'{model}_results' and hist['config']['isCrop'] is False
    assert (out / f'{model}_morp.png').exists() == trained['conditional']


def checkpoint(trained):
    return torch.load(trained['out'] / 'checkpoint.pt', weights_only=True)


def sampled_on(trained, z):
    """The inputs of each sampling of G (the average) on exactly this noise, in order."""
    return [call.inputs for call in trained['sampled'] if torch.equal(call.inputs[0], z)]


def gender_pairs(z_rows):
    """The README's gender layout: each row of noise twice, as a female row (0) then a male row (1)."""
    rows, columns, _ = z_rows.shape
    labels = torch.tensor([0, 1]).repeat(rows).repeat_interleave(columns)
    return z_rows.repeat_interleave(2, dim=0).flatten(0, 1), labels


def test_cdcgan_fixed_inputs_follow_the_gender_layouts():
    import celeba_cdcgan
    fixed = celeba_cdcgan.fixed_inputs(torch.device('cpu'))
    z, labels = fixed['z'].view(4, 4, -1), fixed['labels'].view(4, 4)
    assert labels.tolist() == [[0] * 4, [1] * 4] * 2  # rows 1 and 3 female, 2 and 4 male
    assert torch.equal(z[0], z[1]) and torch.equal(z[2], z[3]) and not torch.equal(z[0], z[2])
    z, labels = fixed['morph_z'].view(10, 10, -1), fixed['morph_labels'].view(10, 10)
    assert labels.tolist() == [[0] * 10, [1] * 10] * 5
    for pair in range(5):
        row = z[2 * pair]
        assert torch.equal(row, z[2 * pair + 1])  # the male row has the female row's noise
        steps = row[1:] - row[:-1]  # a straight line in equal steps
        assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-5)


def test_the_fixed_grid_shows_the_fixed_inputs_in_the_documented_layout(trained):
    """The last epoch's grid, rendered here from the saved generator and the checkpoint's inputs. cDCGAN: 4x4,
    rows 1 and 3 female, 2 and 4 male, rows 1-2 sharing 4 noise vectors and rows 3-4 another 4."""
    _, G = load_trained(trained, 'generator')
    fixed = checkpoint(trained)['fixed']
    if trained['conditional']:
        inputs = gender_pairs(fixed['z'].view(4, 4, -1)[0::2])
        assert torch.equal(fixed['z'], inputs[0]) and torch.equal(fixed['labels'], inputs[1])
    else:
        inputs = (fixed['z'],)
        assert len(fixed['z']) == 25
    sampled = sampled_on(trained, inputs[0])
    assert len(sampled) == 2, 'one grid of the fixed noise per epoch'
    assert all(torch.equal(given[-1], inputs[-1]) for given in sampled), 'the grid was sampled with other genders'
    expected = render(G, inputs, trained['columns'])
    written = png_pixels(trained['out'] / 'Fixed_results' / f"{trained['model']}_2.png", expected.shape[1])
    assert_same_picture(written, expected)


def test_the_morphing_image_morphs_female_and_male_rows_with_the_same_noise(trained):
    """10x10: 5 pairs of rows, each a straight line of 10 noise vectors, drawn female, then male."""
    if not trained['conditional']:
        pytest.skip('only the cDCGAN morphs')
    _, G = load_trained(trained, 'generator')
    lines = checkpoint(trained)['fixed']['morph_z'].view(10, 10, -1)[0::2]
    steps = lines[:, 1:] - lines[:, :-1]
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-5)
    z, labels = gender_pairs(lines)
    sampled = sampled_on(trained, z)
    assert len(sampled) == 1 and torch.equal(sampled[0][1], labels), 'the rows alternate female and male'
    assert_same_picture(png_pixels(trained['out'] / f"{trained['model']}_morp.png"), render(G, (z, labels), 10))


def test_the_cdcgan_real_grid_alternates_female_and_male_rows(trained):
    if not trained['conditional']:
        pytest.skip('the DCGAN grid is not laid out by gender')
    with Image.open(trained['out'] / 'raw_CelebA.png') as raw:
        pixels = np.asarray(raw.convert('RGB')).astype(float)
    for row in range(4):
        red, _, blue = pixels[2 + 66 * row: 66 * (row + 1)].mean(axis=(0, 1))
        assert (red > blue) == (row % 2 == 0)  # rows 1 and 3 female (red), 2 and 4 male (blue)


def load_trained(trained, name):
    module = importlib.import_module(trained['script'][:-3])
    model = (module.Generator if name == 'generator' else module.Discriminator)(d=8)
    model.load_state_dict(torch.load(trained['out'] / f"{trained['model']}_{name}.pt", weights_only=True))
    return module, model.eval()


def test_weights_reload_with_the_documented_calling_convention(trained):
    module, G = load_trained(trained, 'generator')
    _, D = load_trained(trained, 'discriminator')
    z = module.noise(6, torch.device('cpu'))
    assert z.shape == (6, 100) and z.dtype == torch.float32
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    conditions = (labels,) if trained['conditional'] else ()
    with torch.no_grad():
        images = G(z, *conditions)
        logits = D(images, *conditions)
    assert images.shape == (6, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert logits.shape == (6,)


def test_generate_draws_the_documented_grid(trained):
    """--generate=3: a female row and a male row with the same 3 noise vectors (cDCGAN), or 3 samples in the
    squarest grid; rendered here from the saved generator and the noise G was given."""
    with ModelWatch() as watch:
        run_in_process(trained['script'], f"--results_dir={trained['out']}", '--generate=3', '--d=8', '--device=cpu')
    given = watch.of('Generator', training=False)
    z = torch.cat([call.inputs[0] for call in given])
    _, G = load_trained(trained, 'generator')  # no fid is measured on CelebA: the last generator
    if trained['conditional']:
        inputs = gender_pairs(z[None, :3])
        assert torch.equal(z, inputs[0]) and len(z[:3].unique(dim=0)) == 3
        assert torch.equal(torch.cat([call.inputs[1] for call in given]), inputs[1])
        expected = render(G, inputs, 3)
    else:
        assert len(z) == 3 and len(z.unique(dim=0)) == 3
        expected = render(G, (z,), 2)
    assert_same_picture(png_pixels(trained['out'] / f"{trained['model']}_generated.png"), expected)


@pytest.mark.parametrize('script, model', [s[:2] for s in SCRIPTS])
def test_the_crop_variant_has_its_own_folders(work, script, model):
    result = run_script(script, '--isCrop=True', '--train_epoch=1', *TINY, cwd=work)
    assert result.returncode == 0, result.stderr
    out = work / f'{model}_crop_results'
    assert (out / 'Fixed_results' / f'{model}_crop_1.png').exists()
    assert history(out, f'{model}_crop')['config']['data_dir'] == 'data/resized_celebA_crop'
    assert os.path.getsize(work / 'data' / 'resized_celebA_crop.u8') == sum(CROP_FACES.values()) * 3 * 64 * 64


# ---------------------------------------------------------------- a resumed run: the outputs of an uninterrupted one

def test_a_resumed_run_equals_an_uninterrupted_one(trained, tmp_path, capsys):
    """One epoch, then resumed for the second: the same history, weights and optimizer states as the fixture's
    uninterrupted 2-epoch run; a rerun of the finished run rebuilds its final outputs, the morphing image alike."""
    script, model, out = trained['script'], trained['model'], tmp_path / 'resumed'
    args = [f"--data_dir={trained['work'] / 'data' / 'resized_celebA'}", f'--results_dir={out}', *TINY]
    run_in_process(script, *args, '--train_epoch=1')
    capsys.readouterr()
    run_in_process(script, *args, '--train_epoch=2')
    printed = capsys.readouterr().out
    assert 'resuming after epoch 1' in printed and printed.count('] - ptime') == 1
    assert 'decoding' not in printed  # the cache of the first run was reused
    assert_same_run(out, trained['out'], model)
    with Image.open(out / f'{model}_generation_animation.gif') as gif:
        assert gif.n_frames == 2
    finals = [out / f'{model}_generation_animation.gif'] + [out / f'{model}_morp.png'] * trained['conditional']
    before = [path.read_bytes() for path in finals]
    for path in finals:
        path.unlink()
    run_in_process(script, *args, '--train_epoch=2')
    assert 'already trained 2 epochs' in capsys.readouterr().out
    assert [path.read_bytes() for path in finals] == before


# ---------------------------------------------------------------- no output on import

def test_importing_has_no_side_effects(tmp_path):
    code = "import sys; sys.argv = ['x', '--bogus=1']; import celeba_dcgan, celeba_cdcgan; print('imported')"
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                            env={'PYTHONPATH': str(REPO), 'PATH': '/usr/bin:/bin'}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'imported\n'
    assert list(tmp_path.iterdir()) == []
