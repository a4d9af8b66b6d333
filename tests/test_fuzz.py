"""Random overrides for every training script: each draw either runs or stops with one line and status 1
or 2, never a traceback, and a draw that stops leaves the results folder as it was.

Each draw overrides one to three constants with values of every kind (the wrong type, edges, out of
range, empty, huge) on top of a tiny run that resumes a folder trained one epoch: so a draw meets the
range checks, the checks of a checkpoint against its constants, and the tiny run itself.
"""
import importlib
import json
import os
import random
import shutil

import pytest

from plumbing import config
from plumbing.results_folder import RunFolder
from conftest import copy_results, folder_state, write_faces

DRAWS = 20  # per script: with a fixed seed, the same draws every time

INTS = ['-1', '0', '1', '2', '3', '', ' ', 'abc', '1.5', '1e3', '0x10', '99999999999999999999', '-99999999999999999999']
FLOATS = ['-1', '0', '0.5', '1', '2', '1e-3', '1e30', '1e400', 'nan', 'inf', '-inf', '', 'abc']
BOOLS = ['true', 'false', '0', '1', 'yes', 'off', '', 'maybe', '2']
BY_NAME = {
    # compile=true would be a minute of compiling per draw: only false, or values it refuses, are drawn
    'compile': ['false', '0', 'maybe', '', '2'],
    'results_dir': ['out', 'fresh', '', ' ', 'a_file', 'a_file/below', 'out/nested'],
    'data_dir': ['{data}', '', 'nowhere', 'a_file'],
    'device': ['cpu', 'auto', 'cuda', 'cuda:1', 'mps', 'meta', 'gpu', '', 'cpu:0'],
    'precision': ['auto', 'fp32', 'bf16', 'fp16', 'FP32', 'fp8', ''],
    'generate_from': ['best', 'last', 'worst', ''],
    'inception_weights': ['', 'nowhere.pth', 'a_file', ' '],
}

# script, its tiny run: every draw resumes a folder these arguments trained for one epoch
SCRIPTS = {
    'mnist_gan.py': ['--quality_samples=50'],
    'mnist_cgan.py': ['--quality_samples=50'],
    'mnist_dcgan.py': ['--quality_samples=50', '--d=4'],
    'mnist_cdcgan.py': ['--quality_samples=50', '--d=4'],
    'celeba_dcgan.py': ['--quality_samples=0', '--d=4'],
    'celeba_cdcgan.py': ['--quality_samples=0', '--d=4'],
}


def constants_of(script):
    return config.constants(vars(importlib.import_module(script.removesuffix('.py'))))


def values_for(name, default):
    return BY_NAME[name] if name in BY_NAME else {bool: BOOLS, int: INTS, float: FLOATS}[type(default)]


def draw(rng, constants):
    names = rng.sample(sorted(constants), rng.choice([1, 1, 2, 3]))
    return {name: rng.choice(values_for(name, constants[name])) for name in names}


def inside(path, folder):
    return path == folder or path.startswith(folder + os.sep)


@pytest.mark.parametrize('script', SCRIPTS)
def test_random_overrides_run_or_stop_with_one_line(script, script_server, mnist_dir, tmp_path):
    if script.startswith('celeba'):
        data = tmp_path / 'faces'
        write_faces(data, {'female': 10, 'male': 6})
    else:
        data = mnist_dir
    base = [f'--data_dir={data}', '--results_dir=out', '--train_epoch=1', '--train_limit=16', '--batch_size=8',
            '--device=cpu', *SCRIPTS[script]]
    trained = tmp_path / 'trained'
    trained.mkdir()
    first = script_server(script, base, trained)
    assert first['status'] == 0, first['stderr']

    rng = random.Random(script)
    constants = constants_of(script)
    for number in range(DRAWS):
        overrides = draw(rng, constants)
        args = [f'--{name}={value.format(data=data)}' for name, value in overrides.items()]
        cwd = tmp_path / f'draw{number}'
        copy_results(trained, cwd)
        (cwd / 'a_file').write_text('a file where a folder may be asked for')
        before = folder_state(cwd)
        result = script_server(script, base + args, cwd)
        where = f"{script} {' '.join(args)}: status {result['status']}, stderr:\n{result['stderr']}"
        assert result['status'] in (0, 1, 2), where
        assert 'Traceback' not in result['stderr'], where
        if result['status'] != 0:
            assert result['stderr'].startswith('error: ') and result['stderr'].count('\n') == 1, where
            after = folder_state(cwd)
            if 'data_dir' in overrides:  # a missing MNIST is downloaded: a failed try leaves <data_dir>/MNIST/raw/
                download = os.path.normpath(os.path.join(overrides['data_dir'], 'MNIST'))
                after = {path: state for path, state in after.items()
                         if path in before or not (inside(path, download) or inside(download, path))}
            assert after == before, where
        elif 'resuming after epoch 1' in result['stdout']:  # a resume keeps the experiment, records the rest
            assert_resume_kept_the_experiment(cwd / 'out', trained / 'out', constants, overrides)
        shutil.rmtree(cwd)


def assert_resume_kept_the_experiment(out, first, constants, overrides):
    (history,) = out.glob('*_train_hist.json')
    resumed, trained = (json.loads(path.read_text()) for path in (history, first / history.name))
    kept = {name for name in constants if name not in RunFolder.MAY_CHANGE_ON_RESUME}
    assert {n: resumed['config'][n] for n in kept} == {n: trained['config'][n] for n in kept}, overrides
    changed = {n for n in constants if resumed['config'][n] != trained['config'][n]}
    recorded = {n for change in resumed['config_changes'] for n in change if n != 'epoch'}
    assert recorded == changed and all(c['epoch'] == 2 for c in resumed['config_changes']), overrides


# ---------------------------------------------------------------- the tools: mnist_classifier.py, benchmarks/speed.py

TOOL_DRAWS = 16
TRUE = ('1', 'true', 'yes', 'on')  # how plumbing.config reads a bool as True
CLASSIFIER_VALUES = {
    **BY_NAME,
    # never the shipped mnist_classifier.pt: a draw of --overwrite=True would replace it (its own test refuses it)
    'weights': ['w.pt', 'old.pt', '', ' ', 'nowhere/x.pt', 'a_file/x.pt', 'a_file', '.', 'out/x.pt'],
}


def test_random_overrides_of_the_classifier_run_or_stop_with_one_line(script_server, tmp_path):
    from conftest import fake_digits, write_mnist
    from plumbing.mnist_quality import DEFAULT_WEIGHTS, weights_digest
    shipped = weights_digest(DEFAULT_WEIGHTS)
    data = write_mnist(tmp_path / 'data', fake_digits, 64, 32)
    base = [f'--data_dir={data}', '--weights=w.pt', '--train_epoch=1', '--batch_size=16', '--device=cpu']
    rng = random.Random('mnist_classifier.py')
    constants = constants_of('mnist_classifier.py')
    for number in range(TOOL_DRAWS):
        names = rng.sample(sorted(constants), rng.choice([1, 1, 2, 3]))
        overrides = {name: rng.choice(CLASSIFIER_VALUES.get(name) or values_for(name, constants[name]))
                     for name in names}
        args = [f'--{name}={value.format(data=data)}' for name, value in overrides.items()]
        cwd = tmp_path / f'draw{number}'
        (cwd / 'out').mkdir(parents=True)
        (cwd / 'a_file').write_text('a file where a folder may be asked for')
        (cwd / 'old.pt').write_bytes(b'weights of an earlier run')
        before = folder_state(cwd)
        result = script_server('mnist_classifier.py', base + args, cwd)
        where = f"mnist_classifier.py {' '.join(args)}: status {result['status']}, stderr:\n{result['stderr']}"
        assert result['status'] in (0, 1, 2), where
        assert 'Traceback' not in result['stderr'], where
        after = folder_state(cwd)
        if result['status'] != 0:
            assert result['stderr'].startswith('error: ') and result['stderr'].count('\n') == 1, where
            if 'data_dir' in overrides:  # a missing MNIST is downloaded: a failed try leaves <data_dir>/MNIST/raw/
                download = os.path.normpath(os.path.join(overrides['data_dir'], 'MNIST'))
                after = {path: state for path, state in after.items()
                         if path in before or not (inside(path, download) or inside(download, path))}
            assert after == before, where
        else:  # only the weights are written, and a file that was there is replaced only when asked
            written = os.path.normpath(overrides.get('weights', 'w.pt'))
            assert set(after) - set(before) <= {written}, where
            replaced = {path for path in before if after.get(path) != before[path]}
            assert replaced <= ({written} if overrides.get('overwrite', '').lower() in TRUE else set()), where
        shutil.rmtree(cwd)
    assert weights_digest(DEFAULT_WEIGHTS) == shipped


SPEED_VALUES = {
    'scripts': ['mnist_gan.py', 'mnist_gan.py,celeba_dcgan.py', ' mnist_cgan.py , ', 'foo.py', ',', '',
                'mnist_gan.py,mnist_gan.py', 'mnist_classifier.py', 'mnist_gan'],
    'precisions': ['', 'fp32', 'fp32,bf16', 'fp16', 'fp8', ',', 'FP32', 'fp16,fp16', 'auto'],
    'layouts': ['1x1', '1x1,2x1', '2x2', '1x', '0x1', 'x', '', ',', '1x1x1', '1x1,1x1', '-1x1', '1.5x1', '1 x 1',
                '99999999999999999999x1'],
    'memory_formats': ['channels_last', 'contiguous,channels_last', 'contiguous,contiguous', 'nhwc', '', ','],
    'output': ['{tmp}/speed.json', '{tmp}/nowhere/x.json', '{tmp}/a_file/x.json', '{tmp}', '', 'nowhere/x.json'],
    # only devices this test's processes cannot use (CUDA_VISIBLE_DEVICES=''): a draw whose values all pass
    # stops there, before measuring, which is the smoke test's (test_tools) to run
    'device': ['cuda', 'cuda:1', 'mps', 'meta', 'gpu', ''],
}


def test_random_overrides_of_the_benchmark_stop_with_one_line_before_measuring(script_server, tmp_path):
    import runpy
    from conftest import REPO
    script = 'benchmarks/speed.py'
    constants = config.constants(runpy.run_path(str(REPO / script)))
    base = ['--device=cuda', f'--output={tmp_path}/speed.json']
    (tmp_path / 'a_file').write_text('a file where a folder may be asked for')
    before, repository = folder_state(tmp_path), folder_state(REPO / 'benchmarks', ignore=('__pycache__',))
    rng = random.Random(script)
    for _ in range(2 * TOOL_DRAWS):
        names = rng.sample(sorted(constants), rng.choice([1, 1, 2, 3]))
        overrides = {name: rng.choice(SPEED_VALUES.get(name) or values_for(name, constants[name])) for name in names}
        args = [f'--{name}={value.format(tmp=tmp_path)}' for name, value in overrides.items()]
        result = script_server(script, base + args, tmp_path, timeout=30)
        where = f"{script} {' '.join(args)}: status {result['status']}, stderr:\n{result['stderr']}"
        assert result['status'] in (1, 2), where
        assert result['stderr'].startswith('error: ') and result['stderr'].count('\n') == 1, where
        assert 'Traceback' not in result['stderr'] and result['stdout'] == '', where
    assert folder_state(tmp_path) == before
    assert folder_state(REPO / 'benchmarks', ignore=('__pycache__',)) == repository
