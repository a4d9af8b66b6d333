"""benchmarks/gpu_check.py in its CPU mode, as the suite runs it while no GPU is at hand: every check, at tiny sizes."""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import OFFLINE, REPO

sys.path.insert(0, str(REPO / 'benchmarks'))
import gpu_check  # noqa: E402  (benchmarks/ is put on the path first)

SCRIPTS = ('mnist_gan.py', 'mnist_cgan.py', 'mnist_dcgan.py', 'mnist_cdcgan.py', 'celeba_dcgan.py', 'celeba_cdcgan.py')
CHECKS = ['data', *(f'train {s}' for s in SCRIPTS), 'variant celeba_dcgan.py --precision=fp32',
          'variant celeba_dcgan.py --channels_last=False', 'variant celeba_dcgan.py --compile=True',
          'torchrun mnist_cgan.py', 'backend gloo', 'resume mnist_dcgan.py', 'generate celeba_cdcgan.py']
GTX_1080_TI = {'mnist_gan.py': None, 'mnist_cgan.py': 9.13, 'mnist_dcgan.py': 197.86, 'mnist_cdcgan.py': 47.16,
               'celeba_dcgan.py': 732.54, 'celeba_cdcgan.py': 826.69}


def run_gpu_check(tmp_path, *args):
    """The command as a user runs it, on a machine that shows torch no GPU; its temporary files under tmp_path."""
    (tmp_path / 'tmp').mkdir()
    env = {**os.environ, **OFFLINE, 'CUDA_VISIBLE_DEVICES': '', 'TMPDIR': str(tmp_path / 'tmp')}
    return subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_check.py'), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def outputs(out):
    """(the JSON's checks by name, the markdown table's rows as lists of cells)."""
    report = json.loads((out / 'gpu_check.json').read_text())
    lines = (out / 'gpu_check.md').read_text().splitlines()
    rows = [[cell.strip() for cell in line.strip('|').split(' | ')] for line in lines if line.startswith('| ')][1:]
    return {row['check']: row for row in report['checks']}, rows


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('gpu_check')
    result = run_gpu_check(tmp_path, f'--out={tmp_path / "report"}')
    return result, tmp_path / 'report'


def test_every_check_runs_and_passes_on_the_cpu(report):
    result, out = report
    assert result.returncode == 0, result.stderr
    checks, rows = outputs(out)
    assert list(checks) == CHECKS
    assert [row[:2] for row in rows] == [[name, 'ok'] for name in CHECKS]
    assert json.loads((out / 'gpu_check.json').read_text())['device'] == 'cpu'
    assert (checks['data']['digits'], checks['data']['faces']) == (64, 64)  # 4 batches of 16


def test_each_training_reports_its_speed_projection_and_memory(report):
    checks, _ = outputs(report[1])
    for script in SCRIPTS:
        row = checks[f'train {script}']
        assert row['images_per_second'] > 0 and row['peak_memory_bytes'] > 0 and row['share_of_bf16_peak'] > 0
        images = 60_000 if script.startswith('mnist') else 202_599
        assert row['seconds_per_epoch'] == pytest.approx(images / row['images_per_second'])
        assert row['gtx_1080_ti_seconds_per_epoch'] == GTX_1080_TI[script]
        assert row['chose'].startswith('cpu, ')  # the script's line on its device and precision
    for name in CHECKS[7:10]:
        assert checks[name]['speed_vs_default'] > 0 and checks[name]['images_per_second'] > 0
    assert checks['variant celeba_dcgan.py --compile=True']['warm_up_vs_default_s'] > 0  # compiling
    torchrun = checks['torchrun mnist_cgan.py']
    assert torchrun['processes'] == 2 and torchrun['images_per_second'] > 0
    assert checks['backend gloo']['said'] == 'gloo: all_reduce over 2 process(es) gave 2'


def test_the_killed_run_continues_from_its_saved_epoch(report):
    checks, _ = outputs(report[1])
    resume = checks['resume mnist_dcgan.py']
    assert (resume['epochs_trained_again'], resume['epochs'], resume['continued']) == ([2], [1, 2], True)
    assert resume['fixed_inputs_equal'] and resume['fixed_inputs_equal_uninterrupted']
    assert resume['losses_match']  # on one CPU thread the runs are deterministic


def test_generate_writes_a_grid_of_both_genders(report):
    checks, _ = outputs(report[1])
    assert checks['generate celeba_cdcgan.py']['png'] == 'CelebA_cDCGAN_generated.png'
    with Image.open(report[1] / 'CelebA_cDCGAN_generated.png') as grid:
        assert (grid.format, grid.size) == ('PNG', (8 * 66 + 2, 2 * 66 + 2))  # 8 faces of each gender, 64 px + 2


def test_a_failing_check_is_one_failed_row_and_the_others_still_run(tmp_path):
    result = run_gpu_check(tmp_path, f'--out={tmp_path / "report"}', '--checks=variants',
                       '--variants=--precision=fp33,--channels_last=False')
    assert result.returncode == 1
    checks, rows = outputs(tmp_path / 'report')
    error = 'error: --precision=fp33: choose one of auto, bf16, fp16, fp32'  # the script's own last line
    assert [row[:2] + row[-1:] for row in rows] == [
        ['data', 'ok', '64 digits, 64 faces'],
        ['variant celeba_dcgan.py --precision=fp33', 'FAILED', error],
        ['variant celeba_dcgan.py --channels_last=False', 'ok', '']]  # no default run to compare with
    assert checks['variant celeba_dcgan.py --channels_last=False']['images_per_second'] > 0


def test_a_run_past_its_time_limit_is_stopped_and_failed(tmp_path):
    result = run_gpu_check(tmp_path, f'--out={tmp_path / "report"}', '--checks=torchrun', '--run_s=1')
    assert result.returncode == 1
    checks, _ = outputs(tmp_path / 'report')
    assert checks['torchrun mnist_cgan.py']['error'] == 'stopped at its time limit of 1 s'
    leftover = [pid for pid in os.listdir('/proc') if pid.isdigit() and str(tmp_path).encode() in read_cmdline(pid)]
    assert leftover == []


def read_cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read()
    except OSError:  # it ended meanwhile
        return b''


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_gpu_check(tmp_path, f'--out={tmp_path / "a_file"}')
    assert (result.returncode, result.stdout) == (2, '')
    assert result.stderr == (f'error: --out={tmp_path / "a_file"}: cannot write there (Not a directory); '
                             f'give a folder you can write\n')


def test_on_a_gpu_the_runs_are_the_real_size_one_at_a_time_and_compiling_last(tmp_path):
    # The GPU mode's own choices, which the CPU mode above does not take: its sizes and its order.
    setting = gpu_check.Setting('cuda', **gpu_check.REAL, steps=40, mlp_steps=400, processes=1, work=str(tmp_path),
                                out=str(tmp_path), deadline=0.0, env={})
    assert gpu_check.training_args(setting, 'celeba_dcgan.py', 'R') == [
        f'--data_dir={tmp_path}/celeba', '--results_dir=R', '--train_epoch=2', '--train_limit=5120',
        '--batch_size=128', '--device=cuda', '--quality_samples=0', '--d=128']
    assert gpu_check.training_args(setting, 'mnist_gan.py', 'R')[3:6] == [
        '--train_limit=51200', '--batch_size=128', '--device=cuda']
    started = []
    names = ['train mnist_dcgan.py', 'variant celeba_dcgan.py --compile=True',
             'variant celeba_dcgan.py --precision=fp32', 'resume mnist_dcgan.py']
    jobs = [(name, lambda trained, name=name: started.append(name) or {'check': name, 'ok': True, 'seconds': 0.0})
            for name in names]
    assert [row['check'] for row in gpu_check.run_checks(setting, jobs)] == names
    assert started == [names[0], names[2], names[3], names[1]]


SYS_TGKILL = 234  # Linux x86_64: a signal to one thread of a process


def test_ctrl_c_stops_every_check_s_run_and_starts_no_other(tmp_path):
    """A Ctrl-C while checks run (each in a session of its own, out of the terminal's reach), received by a
    worker thread: one line, status 130, no run of a check left behind, none started after it."""
    (tmp_path / 'tmp').mkdir()
    env = {**os.environ, **OFFLINE, 'CUDA_VISIBLE_DEVICES': '', 'TMPDIR': str(tmp_path / 'tmp')}
    logs = tmp_path / 'report' / 'logs'
    process = subprocess.Popen([sys.executable, str(REPO / 'benchmarks' / 'gpu_check.py'),
                                f'--out={tmp_path / "report"}', '--checks=train'], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (logs.exists() and any(logs.glob('train*.command'))):
        assert time.monotonic() < deadline and process.poll() is None, 'no training check started'
        time.sleep(0.1)
    # To a thread other than the main one, as the OS may hand a Ctrl-C to any thread that does not block it.
    others = [int(tid) for tid in os.listdir(f'/proc/{process.pid}/task') if int(tid) != process.pid]
    assert others, 'gpu_check.py runs its checks in no thread of its own'
    assert ctypes.CDLL(None, use_errno=True).syscall(SYS_TGKILL, process.pid, max(others), signal.SIGINT) == 0
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr == (f"error: interrupted: every check's run was stopped; the logs so far are in "
                      f"{tmp_path / 'report'}/logs\n")
    started = sorted(logs.glob('*.command'))
    time.sleep(2)
    assert sorted(logs.glob('*.command')) == started, 'a check started after the Ctrl-C'
    leftover = [pid for pid in os.listdir('/proc') if pid.isdigit() and str(tmp_path).encode() in read_cmdline(pid)]
    assert leftover == []
    trainings = [path.with_suffix('.stdout').read_text() for path in started if path.name.startswith('train')]
    assert trainings and not any('outputs in' in text for text in trainings), 'a run went on to its end'
    assert len(started) < 1 + len(SCRIPTS), 'every check had run: the Ctrl-C came too late to test anything'
