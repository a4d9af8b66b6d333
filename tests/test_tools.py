"""The tools beside the experiments: mnist_classifier.py, which trains the classifier that scores the MNIST runs
and keeps the shipped one unless asked (README, Measuring the MNIST generators), benchmarks/speed.py, which
times the scripts (docs/speed.md, The benchmark), and benchmarks/celeba_fid.py, which times the CelebA FID.
Each refuses bad values and unwritable outputs with one line, before any work.

Every run here stops at once or trains a few steps on a tiny fake MNIST, through the script server; the
benchmark's own runs are processes of their own. The shipped classifier and its scores: test_mnist_quality.py.
"""
import inspect
import re
import subprocess
import sys

import pytest
import torch

import mnist_classifier
from conftest import REPO, fake_digits, folder_state, run_script, write_mnist
from mnist_classifier import RETRAINED_WEIGHTS
from plumbing.mnist_quality import DEFAULT_WEIGHTS, Classifier, MnistQuality, weights_digest

SPEED = 'benchmarks/speed.py'


def assert_refused(result, status, line):
    """The run stopped with this status and exactly this one line on stderr, having printed nothing else."""
    assert (result['status'], result['stderr'], result['stdout']) == (status, f'error: {line}\n', '')


@pytest.fixture(scope='module')
def tiny_mnist(tmp_path_factory):
    """64 training and 32 test images: a batch of 16 trains 4 steps an epoch."""
    return write_mnist(tmp_path_factory.mktemp('tiny') / 'data', fake_digits, 64, 32)


def train_args(data, weights, *extra):
    return [f'--data_dir={data}', f'--weights={weights}', '--train_epoch=1', '--batch_size=16', '--device=cpu',
            *extra]


# ---------------------------------------------------------------- mnist_classifier.py: the shipped classifier stays

def test_training_script_saves_weights(mnist_dir, tmp_path):
    """One short epoch on conftest's tiny fake MNIST: the script runs, reports, and saves loadable weights."""
    weights = tmp_path / 'classifier.pt'
    proc = run_script('mnist_classifier.py', f'--data_dir={mnist_dir}', f'--weights={weights}', '--train_epoch=1',
                      '--batch_size=64', cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '[1/1] train loss:' in proc.stdout and 'test accuracy:' in proc.stdout
    Classifier().load_state_dict(torch.load(weights, weights_only=True))
    assert [p.name for p in tmp_path.iterdir()] == ['classifier.pt']  # no temp file left behind


def test_retraining_writes_beside_the_shipped_weights_and_scoring_reads_the_shipped_ones():
    assert mnist_classifier.weights == RETRAINED_WEIGHTS != DEFAULT_WEIGHTS
    assert RETRAINED_WEIGHTS == str(REPO / 'mnist_classifier_retrained.pt')
    assert inspect.signature(MnistQuality).parameters['weights'].default == DEFAULT_WEIGHTS
    assert DEFAULT_WEIGHTS == str(REPO / 'mnist_classifier.pt')


def test_training_onto_the_shipped_weights_is_refused_before_training(script_server, tiny_mnist, tmp_path):
    before = weights_digest(DEFAULT_WEIGHTS)
    result = script_server('mnist_classifier.py', train_args(tiny_mnist, DEFAULT_WEIGHTS), tmp_path)
    assert_refused(result, 2, f"--weights={DEFAULT_WEIGHTS} is the shipped classifier that scores every MNIST run; "
                              f"pass another --weights (without one it writes {RETRAINED_WEIGHTS}), "
                              f"or add --overwrite=True to replace it")
    assert weights_digest(DEFAULT_WEIGHTS) == before
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_with_overwrite(script_server, tiny_mnist, tmp_path):
    old = tmp_path / 'old.pt'
    old.write_bytes(b'weights of an earlier run')
    refused = script_server('mnist_classifier.py', train_args(tiny_mnist, 'old.pt'), tmp_path)
    assert_refused(refused, 2, "--weights=old.pt exists; add --overwrite=True to replace it, or pass another --weights")
    assert old.read_bytes() == b'weights of an earlier run'

    replaced = script_server('mnist_classifier.py', train_args(tiny_mnist, 'old.pt', '--overwrite=True'), tmp_path)
    assert replaced['status'] == 0, replaced['stderr']
    assert '[1/1] train loss:' in replaced['stdout']
    Classifier().load_state_dict(torch.load(old, weights_only=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['old.pt']


def test_a_batch_larger_than_the_classifiers_data_names_its_own_constant(script_server, tiny_mnist, tmp_path):
    result = script_server('mnist_classifier.py', train_args(tiny_mnist, 'w.pt', '--batch_size=1001'), tmp_path)
    assert_refused(result, 2, f"--batch_size=1001 is more than the 64 training images in {tiny_mnist}/MNIST/raw; "
                              f"pass --batch_size=64 or lower")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_of_all_the_classifiers_data_trains(script_server, tiny_mnist, tmp_path):
    result = script_server('mnist_classifier.py', train_args(tiny_mnist, 'w.pt', '--batch_size=64'), tmp_path)
    assert result['status'] == 0, result['stderr']
    assert (tmp_path / 'w.pt').exists()


def test_a_single_training_image_is_one_line_that_asks_for_no_impossible_batch(script_server, tmp_path):
    data = write_mnist(tmp_path / 'data', fake_digits, 1, 32)
    result = script_server('mnist_classifier.py', train_args(data, 'w.pt'), tmp_path)
    assert_refused(result, 1, f"{data}/MNIST/raw/train-images-idx3-ubyte.gz holds 1 image(s), too few to train or "
                              f"measure with; replace it with a good copy, or delete it to download MNIST again")
    assert not (tmp_path / 'w.pt').exists()


# ---------------------------------------------------------------- an output that cannot be written, before the work

def unwritable_outputs(tmp_path, constant):
    (tmp_path / 'a_file').write_text('a file where a folder is asked for')
    (tmp_path / 'a_folder').mkdir()
    return [(f'{tmp_path}/nowhere/x.pt', f"--{constant}={tmp_path}/nowhere/x.pt: {tmp_path}/nowhere does not exist; "
                                         f"make that folder or pass another --{constant}"),
            (f'{tmp_path}/a_file/x.pt', f"--{constant}={tmp_path}/a_file/x.pt: {tmp_path}/a_file is a file, "
                                        f"not a folder; move it away or pass another --{constant}")]


def test_the_classifier_checks_its_weights_path_before_training(script_server, tiny_mnist, tmp_path):
    cases = unwritable_outputs(tmp_path, 'weights') + [
        (f'{tmp_path}/a_folder', f"--weights={tmp_path}/a_folder is a folder; pass the path of a file, like "
                                 f"--weights={tmp_path}/a_folder/mnist_classifier_retrained.pt")]
    before = folder_state(tmp_path)
    for weights, line in cases:
        # a data_dir of nothing: a check that came after loading the data would download MNIST, offline: another line
        assert_refused(script_server('mnist_classifier.py', train_args(tmp_path / 'no_data', weights), tmp_path),
                       2, line)
    assert folder_state(tmp_path) == before


def test_the_benchmark_checks_its_output_before_measuring(script_server, tmp_path):
    cases = [(output.replace('.pt', '.json'), line.replace('.pt', '.json').replace('weights', 'output'))
             for output, line in unwritable_outputs(tmp_path, 'weights')] + [
        (f'{tmp_path}/a_folder', f"--output={tmp_path}/a_folder is a folder; pass the path of a file, like "
                                 f"--output={tmp_path}/a_folder/speed.json")]
    before = folder_state(tmp_path)
    for output, line in cases:
        assert_refused(script_server(SPEED, [f'--output={output}'], tmp_path), 2, line)
    assert folder_state(tmp_path) == before


def test_a_relative_benchmark_output_is_beneath_the_repository(script_server, tmp_path):
    result = script_server(SPEED, ['--output=nowhere/x.json'], tmp_path)
    assert_refused(result, 2, f"--output=nowhere/x.json: {REPO}/nowhere does not exist; make that folder "
                              f"or pass another --output")


def test_an_output_folder_without_write_permission_is_one_line_before_the_work(tmp_path, monkeypatch, capsys):
    from plumbing import safe_files
    monkeypatch.setattr(safe_files.os, 'access', lambda path, mode: False)  # as for a user without the permission
    with pytest.raises(SystemExit) as stop:
        safe_files.check_output_path('weights', f'{tmp_path}/w.pt', f'{tmp_path}/w.pt', 'w.pt')
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f"error: --weights={tmp_path}/w.pt: cannot write in {tmp_path}; make it "
                                       f"writable or pass another --weights\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- benchmarks/speed.py

def test_the_benchmark_runs_in_smoke_mode_and_prints_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'speed.py'), '--smoke=True',
                             '--layouts=1x1,2x1', '--scripts=celeba_cdcgan.py', '--precisions=fp32,bf16',
                             '--memory_formats=channels_last'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith('| celeba_')]
    assert [row.split(' | ')[1:4] for row in rows] == [
        [layout, 'channels_last', precision] for layout in ('1x1', '2x1')  # one process; torchrun, 2 processes
        for precision in ('fp32', 'bf16')]
    for row in rows:
        cells = row.strip('|').split('|')
        assert float(cells[4].split()[0]) > 0 and float(cells[7]) > 0  # img/s and GFLOP per image
    assert all(row.split(' | ')[5].endswith('x') for row in rows[1::2])  # bf16 against fp32


SCRIPT_NAMES = 'mnist_gan.py, mnist_cgan.py, mnist_dcgan.py, mnist_cdcgan.py, celeba_dcgan.py, celeba_cdcgan.py'
LAYOUT_FORM = 'write processes x threads as positive whole numbers, like 1x1,1x2,2x1'
PRECISION_FORM = ('choose one or more of fp32, bf16, fp16, comma-separated, or --precisions= alone for those the '
                  'device runs natively')
BAD_BENCHMARK_VALUES = [
    ('--layouts=1x', f"--layouts=1x: '1x' is not a layout; {LAYOUT_FORM}"),
    ('--layouts=0x1', f"--layouts=0x1: '0x1' is not a layout; {LAYOUT_FORM}"),
    ('--layouts=1x1,2x0', f"--layouts=1x1,2x0: '2x0' is not a layout; {LAYOUT_FORM}"),
    ('--layouts=1x²', f"--layouts=1x²: '1x²' is not a layout; {LAYOUT_FORM}"),
    ('--layouts=,', f"--layouts=, names none; {LAYOUT_FORM}"),
    ('--layouts=1x1,1x1', "--layouts=1x1,1x1 names 1x1 twice; name each once"),
    ('--precisions=fp8', f"--precisions=fp8: 'fp8' is not known; {PRECISION_FORM}"),
    ('--precisions=,', f"--precisions=, names none; {PRECISION_FORM}"),
    ('--precisions=fp32,fp32', "--precisions=fp32,fp32 names fp32 twice; name each once"),
    ('--scripts=foo.py', f"--scripts=foo.py: 'foo.py' is not known; choose one or more of {SCRIPT_NAMES}, "
                         f"comma-separated"),
    ('--scripts=mnist_classifier.py', f"--scripts=mnist_classifier.py: 'mnist_classifier.py' is not known; "
                                      f"choose one or more of {SCRIPT_NAMES}, comma-separated"),
    ('--scripts=,', f"--scripts=, names none; choose one or more of {SCRIPT_NAMES}, comma-separated"),
    ('--memory_formats=,', "--memory_formats=,: use channels_last, contiguous or both, comma-separated"),
    ('--steps=1001', "--steps=1001: choose a value in [1, 1000]"),
    ('--output=', "--output=: choose a non-empty value"),
]


@pytest.mark.parametrize('override, line', BAD_BENCHMARK_VALUES, ids=[o for o, _ in BAD_BENCHMARK_VALUES])
def test_the_benchmark_names_a_bad_value_in_one_line_before_measuring(script_server, tmp_path, override, line):
    # --device=gpu would stop the run at the device: a value checked only after it would get that line instead
    assert_refused(script_server(SPEED, [override, '--device=gpu'], tmp_path), 2, line)


def test_the_benchmark_names_an_unknown_memory_format_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'speed.py'), '--memory_formats=nhwc'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PATH': '/usr/bin:/bin'})
    assert (result.returncode, result.stderr) == (
        2, 'error: --memory_formats=nhwc: use channels_last, contiguous or both, comma-separated\n')
    assert result.stdout == ''


def test_the_benchmark_checks_values_before_choosing_the_device(script_server, tmp_path):
    result = script_server(SPEED, ['--device=gpu'], tmp_path)
    assert_refused(result, 2, "--device=gpu: choose auto, cpu, cuda, mps or one of them numbered, like cuda:1")


def test_the_benchmark_refuses_bf16_on_a_gpu_without_it_before_measuring(monkeypatch, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('speed', REPO / SPEED)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    monkeypatch.setattr(speed.hardware, 'pick_device', lambda choice: torch.device('cuda'))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: 'Tesla T4')
    monkeypatch.setattr(speed, 'precisions', 'fp32,bf16')
    monkeypatch.setattr(speed, 'smoke', True)
    with pytest.raises(SystemExit) as stop:
        speed.main()
    assert stop.value.code == 2
    assert capsys.readouterr() == ('', "error: --precisions=fp32,bf16: this GPU (Tesla T4) has no bf16; "
                                       "choose among fp32, fp16\n")


# ---------------------------------------------------------------- benchmarks/celeba_fid.py

def test_the_fid_benchmark_runs_at_a_tiny_size_and_its_share_follows_from_its_rates(tmp_path):
    """docs/speed.md's cost of the CelebA FID: the rates it prints, Inception's FLOPs per image (5.7 G multiply-adds
    at 299x299, Szegedy et al. 2016), and the share of an epoch that scoring quality_samples faces takes."""
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'celeba_fid.py'), '--samples=4', '--faces=4',
                             '--d=8', '--steps=1', '--repeats=1', '--device=cpu', '--quality_samples=5000'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rates = re.search(r'scoring \(G at d = 8, then Inception\): ([\d.]+) img/s; training \(celeba_dcgan.py, '
                      r'd = 8, precision auto\): ([\d.]+) img/s', out)
    score_rate, train_rate = float(rates[1]), float(rates[2])
    assert score_rate > 0 and train_rate > 0
    assert 11 < float(re.search(r'FLOPs per image: Inception ([\d.]+) G', out)[1]) < 12
    scored, epoch, share = re.search(r'quality_samples = 5000: (\d+) s against an epoch of (\d+) s: ([\d.]+)% of it',
                                     out).groups()
    # The rates are printed to 0.1 img/s: each time follows from its rate within that rounding.
    assert 5000 / (score_rate + 0.05) - 1 <= int(scored) <= 5000 / max(score_rate - 0.05, 1e-9) + 1
    assert 202_599 / (train_rate + 0.05) - 1 <= int(epoch) <= 202_599 / max(train_rate - 0.05, 1e-9) + 1
    assert float(share) == pytest.approx(100 * int(scored) / int(epoch), rel=0.01)
