"""The CelebA runs' Inception FID (issue 25), offline: torch-fidelity's real network and code, with stand-in
weights of the real architecture and random values (seeded), on small fake CelebA folders."""
import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from conftest import ENV, REPO, copy_results, folder_state, run_in_process, run_script, write_faces
from plumbing import celeba, celeba_fid
from plumbing.celeba_fid import CelebaFid
from plumbing.frechet import frechet_distance
from plumbing.mnist_quality import gaussian

FACES = {'female': 7, 'male': 5}  # the shared folder: its statistics are computed once for the whole file
SAMPLES = 6                        # faces a tiny run scores after an epoch
TINY = ['--d=8', '--batch_size=8', '--device=cpu']
# script, model, what else its run tries: the collapse rule at a factor every rise of fid passes; quality_every
SCRIPTS = [('celeba_dcgan.py', 'CelebA_DCGAN', ['--collapse_factor=1.0001']),
           ('celeba_cdcgan.py', 'CelebA_cDCGAN', ['--quality_every=2'])]


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Inception at 299x299 is the cost of this file: one thread a test process, as pytest-xdist runs two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('inception') / 'stand_in.pth'
    celeba_fid.write_stand_in_weights(str(path), seed=0)
    return path


@pytest.fixture(scope='module')
def other_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('inception') / 'other_stand_in.pth'
    celeba_fid.write_stand_in_weights(str(path), seed=1)
    return path


def decoded(folder):
    """The faces of folder as load_celeba decodes them (into the cache the statistics are made of)."""
    return celeba.load_celeba(str(folder), False, 64, 0, 2, torch.device('cpu'))


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp('celeba') / 'faces'
    write_faces(folder, FACES)
    decoded(folder)
    return folder


@pytest.fixture(scope='module')
def quality(faces, weights):
    """The faces' FID, by gender too, shared: their statistics and square roots are made once."""
    return CelebaFid(str(faces), str(weights), 'cpu', by_gender=True)


class Replay(torch.nn.Module):
    """A 'generator' whose face for noise z is images[z[:, 0]] in [-1, 1]: given faces, scored as a run scores G's."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def forward(self, z, labels=None):
        return self.images[z[:, 0].long()].float() / 127.5 - 1


def replayed(images):
    """(the Replay of images, the noise that makes it draw each image once, in order)."""
    return Replay(images), torch.arange(len(images), dtype=torch.float32)[:, None]


# ---------------------------------------------------------------- the number

def test_our_fid_is_torch_fidelity_s_own_on_the_same_faces(quality, faces, weights, tmp_path):
    other = tmp_path / 'other'
    write_faces(other, {'female': 5, 'male': 3}, seed=1)
    images, labels = decoded(other)
    assert quality.genders(8).tolist() == labels.tolist()  # 8 * 7 / 12 = 5 female, as the folder is sorted
    ours = quality.score(*replayed(images))
    from torch_fidelity import calculate_metrics
    theirs = calculate_metrics(input1=str(other), input2=str(faces), fid=True, samples_find_deep=True,  # the JPEGs
                               feature_extractor_weights_path=str(weights), cuda=False, cache=False, save_cpu_ram=True,
                               verbose=False)['frechet_inception_distance']
    assert ours['fid'] == pytest.approx(theirs, rel=1e-3)
    # Each gender: its samples' Gaussian against its faces', those of the features of that gender's images alone.
    real_images, real_labels = decoded(faces)
    for label, name in enumerate(('female', 'male')):
        real = gaussian(quality.features(real_images[real_labels == label]))
        assert torch.allclose(quality.reference[name]['mu'], real[0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(quality.reference[name]['sigma'], real[1], rtol=1e-3, atol=1e-7)
        fake = gaussian(quality.features(images[labels == label]))
        assert ours[f'fid_{name}'] == pytest.approx(frechet_distance(*real, *fake), rel=1e-4)


def test_the_faces_score_near_zero_against_themselves_and_far_from_a_blurred_or_shifted_copy(quality, faces):
    images, _ = decoded(faces)
    same, blurred, shifted = (quality.score(*replayed(x))['fid'] for x in
                              (images, gaussian_blur(images, [9, 9], [3.0, 3.0]), images.roll(16, dims=3)))
    assert abs(same) < 1e-3 * min(blurred, shifted), (same, blurred, shifted)


class Diverged(torch.nn.Module):
    def forward(self, z, labels):
        return torch.full((len(z), 3, 64, 64), float('nan'))


def test_a_generator_gone_to_nan_scores_nan(quality):
    scores = quality.score(Diverged(), torch.zeros(4, 1))
    assert sorted(scores) == ['fid', 'fid_female', 'fid_male'] and all(v != v for v in scores.values())


# ---------------------------------------------------------------- the statistics kept beside the folder

def made(capsys):
    return 'computing the Inception statistics of the' in capsys.readouterr().out


def test_the_statistics_are_made_once_beside_the_folder_and_again_when_a_face_or_the_weights_change(
        weights, other_weights, tmp_path, capsys):
    folder = tmp_path / 'faces'
    write_faces(folder, {'female': 2, 'male': 2})
    decoded(folder)
    capsys.readouterr()
    first = CelebaFid(str(folder), str(weights), 'cpu').reference
    assert made(capsys)
    path = tmp_path / 'faces.fid.pt'
    state = torch.load(path, weights_only=True)
    assert state['fingerprint'] == celeba.stored_index(str(tmp_path / 'faces.u8'))['fingerprint']
    assert state['inception_sha256'] == celeba_fid.weights_sha256(str(weights))
    assert [first[name]['count'] for name in ('all', 'female', 'male')] == [4, 2, 2]
    kept = path.stat().st_ino
    again = CelebaFid(str(folder), str(weights), 'cpu').reference
    assert not made(capsys) and path.stat().st_ino == kept  # read, not written
    assert torch.equal(again['all']['sigma'], first['all']['sigma'])

    face = folder / 'female' / '000000.jpg'
    with Image.open(face) as im:
        flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # the same face mirrored: same size, other pixels
    flipped.save(face, quality=95)
    decoded(folder)
    changed = CelebaFid(str(folder), str(weights), 'cpu').reference
    assert made(capsys) and not torch.equal(changed['all']['mu'], first['all']['mu'])

    CelebaFid(str(folder), str(other_weights), 'cpu').reference
    assert made(capsys)
    assert torch.load(path, weights_only=True)['inception_sha256'] == celeba_fid.weights_sha256(str(other_weights))


def test_the_statistics_are_made_again_under_another_torch_fidelity(weights, tmp_path, capsys, monkeypatch):
    """Its resizing and network code are part of the features, so its version is part of the key."""
    folder = tmp_path / 'faces'
    write_faces(folder, {'female': 2, 'male': 2})
    decoded(folder)
    CelebaFid(str(folder), str(weights), 'cpu').reference
    installed = importlib.metadata.version('torch-fidelity')
    assert torch.load(tmp_path / 'faces.fid.pt', weights_only=True)['torch_fidelity'] == installed
    capsys.readouterr()
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, 'version',
                        lambda name: '0.0.1' if name == 'torch-fidelity' else real_version(name))
    CelebaFid(str(folder), str(weights), 'cpu').reference
    assert made(capsys)
    assert torch.load(tmp_path / 'faces.fid.pt', weights_only=True)['torch_fidelity'] == '0.0.1'


def test_damaged_statistics_are_never_used_but_made_again(weights, tmp_path, capsys):
    folder = tmp_path / 'faces'
    write_faces(folder, {'female': 2, 'male': 2})
    decoded(folder)
    original = CelebaFid(str(folder), str(weights), 'cpu').reference
    path = tmp_path / 'faces.fid.pt'
    content = bytearray(path.read_bytes())
    content[len(content) // 2:len(content) // 2 + 64] = bytes(64)  # a zeroed stretch inside sigma's bytes
    path.write_bytes(bytes(content))
    capsys.readouterr()
    again = CelebaFid(str(folder), str(weights), 'cpu').reference
    out = capsys.readouterr().out
    assert f'{path} does not match its checksums (damaged): computing the statistics again' in out
    assert all(torch.equal(again[name][key], original[name][key]) for name in original for key in ('mu', 'sigma'))


# ---------------------------------------------------------------- the weights

def test_without_weights_and_network_a_run_stops_at_once_with_one_line_saying_how_to_get_them(
        faces, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    start = time.monotonic()
    result = run_script('celeba_dcgan.py', f'--data_dir={faces}', f'--results_dir={tmp_path / "out"}',
                        '--train_epoch=1', *TINY, cwd=tmp_path, timeout=120)
    assert time.monotonic() - start < 60
    expected = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'weights-inception-2015-12-05-6726825d.pth'
    assert result.returncode == 1 and result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith(f'error: no Inception weights to score the faces with: {expected} is missing and '
                                    f'downloading it from https://github.com/toshas/torch-fidelity/releases/')
    assert result.stderr.endswith('then put it there or pass --inception_weights=FILE, or pass --quality_samples=0 '
                                  'to train without scores\n')
    assert not expected.exists() and not (tmp_path / 'out').exists()


def test_a_file_in_torch_s_folder_that_is_not_the_published_weights_is_refused(weights, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    found = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'weights-inception-2015-12-05-6726825d.pth'
    found.parent.mkdir(parents=True)
    os.link(weights, found)
    with pytest.raises(SystemExit) as stop:
        celeba_fid.inception_weights('')
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count('\n') == 1
    assert error.startswith(f"error: {found} is not torch-fidelity's Inception weights of 2015-12-05 (sha256 ")
    assert 'delete it and it is downloaded again' in error


class Payload:
    """Unpickled, it makes a folder: proof that code in a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_weights_carrying_code_are_refused_before_torch_fidelity_loads_them(tmp_path, capsys):
    marker = tmp_path / 'code_ran'
    torch.save({'Conv2d_1a_3x3.conv.weight': Payload(marker)}, tmp_path / 'inception.pth')
    with pytest.raises(SystemExit) as stop:
        celeba_fid.load_inception(str(tmp_path / 'inception.pth'), 'cpu')
    assert stop.value.code == 1 and capsys.readouterr().err.startswith(f"error: {tmp_path / 'inception.pth'} ")
    assert not marker.exists()


# ---------------------------------------------------------------- the runs

@pytest.fixture(scope='module', params=SCRIPTS, ids=[s[0] for s in SCRIPTS])
def trained(request, faces, weights, tmp_path_factory):
    """Each script trained 3 tiny epochs, scored with the stand-in weights."""
    script, model, extra = request.param
    out = tmp_path_factory.mktemp('runs') / 'out'
    args = [f'--data_dir={faces}', f'--results_dir={out}', f'--inception_weights={weights}',
            f'--quality_samples={SAMPLES}', '--train_epoch=3', *TINY, *extra]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_in_process(script, *args)
    history = json.loads((out / f'{model}_train_hist.json').read_text())
    return dict(script=script, model=model, out=out, args=args, stdout=printed.getvalue(), history=history,
                conditional='cdcgan' in script)


def test_each_scored_epoch_has_its_fid_in_the_history_and_its_line_and_the_quality_plot(trained, weights):
    epochs, lines = trained['history']['epochs'], trained['stdout'].splitlines()
    scored = [2, 3] if trained['conditional'] else [1, 2, 3]  # the cDCGAN's run scores every 2 epochs, and the last
    names = ['fid', 'fid_female', 'fid_male'] if trained['conditional'] else ['fid']
    assert [e['epoch'] for e in epochs if 'fid' in e] == scored
    assert all(sorted(k for k in e if k.startswith('fid')) == names for e in epochs if e['epoch'] in scored)
    epoch_lines = [line for line in lines if ' - ptime: ' in line]
    assert [', fid: ' in line for line in epoch_lines] == [e['epoch'] in scored for e in epochs]
    assert trained['history']['scored_with'] == {'inception_weights': str(weights),
                                                 'sha256': celeba_fid.weights_sha256(str(weights))}
    assert (trained['out'] / f"{trained['model']}_quality.png").stat().st_size > 0


class Unconditional(torch.nn.Module):
    """An unconditional G, called as a conditional one: the faces and so the fid of all of them are G's."""

    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, z, labels):
        return self.G(z)


def test_the_best_generator_is_the_lowest_fid_epoch_s_and_scores_it_again(trained, quality):
    module = importlib.import_module(trained['script'][:-3])
    best = min((e for e in trained['history']['epochs'] if 'fid' in e), key=lambda e: e['fid'])
    assert f"best generator: epoch {best['epoch']}, fid {best['fid']:.2f}" in trained['stdout']
    G = module.Generator(module.z_dim, 8)
    G.load_state_dict(torch.load(trained['out'] / f"{trained['model']}_generator_best.pt", weights_only=True))
    fixed = torch.load(trained['out'] / 'checkpoint.pt', weights_only=True)['fixed']
    again = quality.score(G if trained['conditional'] else Unconditional(G), fixed['quality_z'])
    assert again['fid'] == pytest.approx(best['fid'], rel=1e-5)


def test_a_collapse_is_said_by_the_fid_rule_as_for_mnist(trained):
    if trained['conditional']:
        pytest.skip("one script is enough: the rule is the MNIST scripts' CollapseCheck")
    fids = [e['fid'] for e in trained['history']['epochs']]
    said = [f"COLLAPSE at epoch {epoch}: fid" in trained['stdout'] for epoch in (2, 3)]
    assert said == [fids[i] > 1.0001 * min(fids[:i + 1]) for i in (1, 2)]


def test_score_prints_the_fid_of_n_samples_of_the_best_generator(trained, faces, weights, capsys):
    capsys.readouterr()
    run_in_process(trained['script'], *trained['args'], '--score=6')
    out = capsys.readouterr().out
    names = r'fid [0-9.]+, fid_female [0-9.]+, fid_male [0-9.]+' if trained['conditional'] else r'fid [0-9.]+'
    measured = re.escape(f'6 samples against the 12 faces of {faces}/, with the Inception weights {weights} (sha256 ')
    assert re.search(rf"^{names}: {measured}[0-9a-f]{{12}}\.\.\.\)$", out, re.MULTILINE), out
    assert 'sampling from the last generator' not in out


def test_a_resume_under_other_weights_is_refused_before_anything_is_written(trained, other_weights, tmp_path,
                                                                           capsys):
    if trained['conditional']:
        pytest.skip('one script is enough: the refusal is RunFolder\'s, as for the MNIST classifier')
    out = tmp_path / 'out'
    copy_results(trained['out'], out)
    before = folder_state(out)
    args = [a for a in trained['args'] if not a.startswith(('--results_dir', '--inception_weights', '--train_epoch'))]
    with pytest.raises(SystemExit) as stop:
        run_in_process(trained['script'], *args, f'--results_dir={out}', f'--inception_weights={other_weights}',
                       '--train_epoch=4')
    error = capsys.readouterr().err
    assert stop.value.code == 1
    assert error.startswith(f"error: {out / 'checkpoint.pt'} was scored with other Inception weights than "
                            f"{other_weights} holds now (sha256 ")
    assert error.endswith("its fid would not compare with this run's; put those weights back, or pass "
                          "--resume=false or another --results_dir\n")
    assert folder_state(out) == before


# ---------------------------------------------------------------- torchrun

RECORDER = '''
import runpy, sys
sys.path.insert(0, {repo!r})
import common
from plumbing import celeba_fid, distributed
scan = celeba_fid.scan_image_folder
def recording_scan(folder):  # called by the process that computes the statistics, alone
    with open({log!r}, 'a') as f:
        f.write(f"rank {{distributed.rank()}}\\n")
    return scan(folder)
celeba_fid.scan_image_folder = recording_scan
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_under_torchrun_rank_0_computes_the_statistics_while_the_other_waits_and_both_score(weights, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 4, 'male': 4})
    log = tmp_path / 'computed_by'
    (tmp_path / 'recorder.py').write_text(RECORDER.format(repo=str(REPO), log=str(log)))
    args = [f'--data_dir={tmp_path / "faces"}', f'--results_dir={tmp_path / "out"}', f'--inception_weights={weights}',
            f'--quality_samples={SAMPLES}', '--train_epoch=1', '--d=8', '--batch_size=4']
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(tmp_path / 'recorder.py'), '--', str(REPO / 'celeba_dcgan.py'), *args],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert log.read_text() == 'rank 0\n'
    assert (tmp_path / 'faces.fid.pt').exists()
    epoch, = json.loads((tmp_path / 'out' / 'CelebA_DCGAN_train_hist.json').read_text())['epochs']
    assert epoch['fid'] > 0
