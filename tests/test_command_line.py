"""The command line (README, Constants and overrides): overrides read as their constant's type, every
constant's range and its notation, --help, and bad input stopped with one line and status 2 before anything
is written. Random overrides of every script and tool: test_fuzz.py.

Runs that stop at once go through the script server (a fresh process each, without loading torch each time).
"""
import importlib
import os
import subprocess
import sys

import pytest

from plumbing import config
from plumbing.config import configure
from conftest import OFFLINE, REPO, assert_refused, folder_state, one_line, run_script, tiny


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize('args, message', [
    (['--lrr=0.1'], "unknown constant 'lrr'; valid: data_dir, results_dir"),
    (['--train_epoch=1.5'], '--train_epoch=1.5: expected int'),
    (['--lr=fast'], '--lr=fast: expected float'),
    (['--lr=nan'], '--lr=nan: expected a finite number (default 0.0002)'),
    (['--resume=maybe'], '--resume=maybe: expected bool'),
    (['lr=0.1'], "cannot read argument 'lr=0.1'"),
])
def test_bad_overrides_get_one_line_and_status_2(args, message, capsys):
    namespace = {'__file__': str(REPO / 'mnist_cgan.py'), 'data_dir': 'data', 'results_dir': 'out',
                 'train_epoch': 50, 'lr': 0.0002, 'resume': True}
    with pytest.raises(SystemExit) as stop:
        configure(namespace, args)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and message in error


def test_good_overrides_take_their_constants_types():
    namespace = {'__file__': str(REPO / 'mnist_cgan.py'), 'lr': 0.0002, 'train_epoch': 50, 'resume': True,
                 'device': 'auto', 'isCrop': False, 'MODEL': 'fixed'}
    config = configure(namespace, ['--lr=1e-3', '--train_epoch=3', '--resume=false', '--device=cpu',
                                          '--isCrop=True'])
    assert config == {'lr': 1e-3, 'train_epoch': 3, 'resume': False, 'device': 'cpu', 'isCrop': True}


def test_a_script_exits_2_on_a_bad_override_and_writes_nothing(tmp_path):
    result = run_script('mnist_dcgan.py', '--dd=3', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown constant 'dd'; valid: ")
    assert list(tmp_path.iterdir()) == []


def test_a_home_folder_in_a_path_is_the_user_s(mnist_dir, tmp_path):
    home = tmp_path / 'home'
    home.mkdir()
    env = {**os.environ, **OFFLINE, 'HOME': str(home), 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    done = subprocess.run([sys.executable, str(REPO / 'mnist_gan.py'), *tiny(mnist_dir, '~/runs', 1)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (home / 'runs' / 'checkpoint.pt').exists() and not (tmp_path / '~').exists()


# ---------------------------------------------------------------- every constant in its range

OUT_OF_RANGE = [
    ('--train_epoch=0', '--train_epoch=0: choose a value in [1, 10000]'),
    ('--train_epoch=-1', '--train_epoch=-1: choose a value in [1, 10000]'),
    ('--z_dim=0', '--z_dim=0: choose a value in [1, 10000]'),
    ('--lr=0', '--lr=0: choose a value > 0'),
    ('--lr=-0.1', '--lr=-0.1: choose a value > 0'),
    ('--batch_size=0', '--batch_size=0: choose a value >= 2'),
    ('--generate=-1', '--generate=-1: choose a value in [0, 1000]'),
    ('--img_size=0', '--img_size=0: choose a value in [8, 256]'),
    ('--quality_samples=1', '--quality_samples=1: choose 0 or a value in [2, 100000]'),
    ('--beta1=1', '--beta1=1: choose a value in [0, 1)'),
    ('--collapse_factor=0.5', '--collapse_factor=0.5: choose 0 or a value > 1'),
    ('--seed=-1', '--seed=-1: choose a value in [0, 4294967295]'),
    ('--results_dir=', '--results_dir=: choose a non-empty value'),
    ('--precision=fp64', '--precision=fp64: choose one of auto, bf16, fp16, fp32'),
    ('--generate_from=first', '--generate_from=first: choose best or last'),
    ('--device=meta', '--device=meta: choose auto, cpu, cuda, mps or one of them numbered, like cuda:1'),
    ('--train_limit=16', '--train_limit=16 is less than one batch of 32; raise it or lower --batch_size'),
]


@pytest.mark.parametrize('override, line', OUT_OF_RANGE, ids=[override for override, _ in OUT_OF_RANGE])
def test_a_constant_out_of_its_range_stops_before_anything_is_written(work, script_server, mnist_dir, override,
                                                                      line):
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', [*tiny(mnist_dir, 'out', 2), override], work), 2, line)
    assert folder_state(work) == before


NEW_CONSTANTS_OUT_OF_RANGE = [
    ('mnist_cdcgan.py', '--d=7', '--d=7: choose a value in [2, 1024], even'),
    ('celeba_cdcgan.py', '--d=0', '--d=0: choose a value in [2, 1024], even'),
    ('mnist_dcgan.py', '--img_size=28', '--img_size=28: choose 64'),
    ('celeba_dcgan.py', '--channels_last=sometimes', '--channels_last=sometimes: expected bool (default True)'),
    ('celeba_cdcgan.py', '--stop_on_collapse=often', '--stop_on_collapse=often: expected bool (default False)'),
    ('mnist_cgan.py', '--compile=2', '--compile=2: expected bool (default False)'),
    ('celeba_dcgan.py', '--generate_from=first', '--generate_from=first: choose best or last'),
    ('mnist_cdcgan.py', '--precision=', '--precision=: choose one of auto, bf16, fp16, fp32'),
]


@pytest.mark.parametrize('script, override, line', NEW_CONSTANTS_OUT_OF_RANGE,
                         ids=[f'{script} {override}' for script, override, _ in NEW_CONSTANTS_OUT_OF_RANGE])
def test_every_script_checks_every_constant(script_server, tmp_path, script, override, line):
    assert_refused(script_server(script, [override], tmp_path), 2, line)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('value', ['nan', 'inf', '1e309', '-inf'])
def test_a_learning_rate_that_is_no_finite_number_says_so(script_server, mnist_dir, tmp_path, value):
    result = script_server('mnist_gan.py', [f'--data_dir={mnist_dir}', f'--lr={value}'], tmp_path)
    one_line(result, 2, f'--lr={value}: expected a finite number (default 0.0002)')


# Constants without a range, and why: any folder; pick_device checks the name; '' means the default.
NO_RANGE = {'data_dir', 'device', 'celeba_dir', 'output_dir', 'inception_weights'}
CELEBA_RESULTS = {'celeba_dcgan.py', 'celeba_cdcgan.py'}  # their results_dir '' means the default folder
SCRIPTS = ['mnist_gan.py', 'mnist_cgan.py', 'mnist_dcgan.py', 'mnist_cdcgan.py', 'celeba_dcgan.py',
           'celeba_cdcgan.py', 'mnist_classifier.py', 'celeba_preprocess.py']


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_constant_but_bools_and_free_paths_has_a_range_that_holds_its_default(script):
    module = importlib.import_module(script.removesuffix('.py'))
    help_of = config.constant_help(module.__file__)
    for name, value in config.constants(vars(module)).items():
        allowed = config.constant_range(help_of[name])
        free = type(value) is bool or name in NO_RANGE or (name == 'results_dir' and script in CELEBA_RESULTS)
        assert (allowed is None) == free, name
        assert free or allowed.allows(value), name


@pytest.mark.parametrize('spec, allowed, refused', [
    ('> 0', [1e-9, 3], [0, -1]),
    ('>= 2', [2, 3], [1, 0]),
    ('< 1', [0.99, -5], [1, 2]),
    ('[0, 1)', [0, 0.5], [1, -0.1]),
    ('(0, 1]', [1, 0.5], [0, 1.1]),
    ('[2, 8], even', [2, 8], [3, 0, 10]),
    ('0 or [2, 10]', [0, 2, 10], [1, 11, -1]),
    ('0 or > 1', [0, 1.5], [0.5, 1]),
    ('{auto, fp32}', ['auto', 'fp32'], ['AUTO', '', 'fp16']),
    ('{64}', [64], [32, 65]),
    ('non-empty', ['x', ' '], ['']),
])
def test_the_range_notation(spec, allowed, refused):
    range_ = config.constant_range(f'{spec}: the meaning')
    assert [range_.allows(v) for v in allowed] == [True] * len(allowed)
    assert [range_.allows(v) for v in refused] == [False] * len(refused)


@pytest.mark.parametrize('comment', ['0: all 60,000 images; N: the first N', 'auto (cuda, else cpu), cuda:1',
                                     'the meaning, with no range', '> zero: a typo is no range'])
def test_a_comment_that_opens_with_no_range_has_none(comment):
    assert config.constant_range(comment) is None


def test_a_value_edited_in_the_script_is_checked_too(capsys):
    namespace = {'__file__': str(REPO / 'mnist_gan.py'), 'z_dim': 0, 'lr': 0.0002}
    with pytest.raises(SystemExit) as stop:
        config.configure(namespace, [])
    assert stop.value.code == 2
    assert capsys.readouterr().err == 'error: z_dim = 0 in mnist_gan.py: choose a value in [1, 10000]\n'


# ---------------------------------------------------------------- --help

MNIST_SCRIPTS = ['mnist_gan.py', 'mnist_cgan.py', 'mnist_dcgan.py', 'mnist_cdcgan.py']


@pytest.mark.parametrize('script', MNIST_SCRIPTS)
def test_help_lists_every_constant_with_its_meaning(script, tmp_path):
    result = run_script(script, '--help', cwd=tmp_path)
    assert result.returncode == 0
    module = importlib.import_module(script[:-3])
    for name in ('data_dir', 'results_dir', 'train_epoch', 'batch_size', 'lr', 'z_dim', 'img_size',
                 'train_limit', 'device', 'seed', 'resume', 'generate'):
        line = next(l for l in result.stdout.splitlines() if l.strip().startswith(f'--{name} '))
        assert repr(getattr(module, name)) in line and len(line.split(repr(getattr(module, name)), 1)[1].strip()) > 5
    assert list(tmp_path.iterdir()) == []


def test_help_shows_each_range_before_its_meaning(script_server, tmp_path):
    result = script_server('mnist_cdcgan.py', ['--help'], tmp_path)
    assert result['status'] == 0
    lines = {line.split()[0]: line for line in result['stdout'].splitlines() if line.startswith('  --')}
    assert lines['--d'].endswith("[2, 1024], even: width; G's layers have 4d, 2d, d channels, D's d/2, d, 2d, 4d")
    assert lines['--precision'].split(None, 3)[3].startswith('{auto, bf16, fp16, fp32}: auto = ')
