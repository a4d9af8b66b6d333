"""Every training script on a CUDA GPU at its real size, in under 8 minutes: one command for a borrowed GPU.

Run:   python benchmarks/gpu_check.py --out=FOLDER      (any constant below: --name=value; --help lists them)

Each check runs a script as a user would, on synthetic data this command makes first (nothing is
downloaded), in a subprocess with its own time limit; no check is given more than is left of `budget_s`.
On a CUDA machine the checks run one at a time at the real size (d = 128, batch 128, 64x64 images). On a
machine without CUDA the same checks run at tiny sizes on the CPU (TINY below), several at once: that
shows the command works (the test suite runs it so), not how fast anything is.

  data      random digits in MNIST's IDX files (`steps` or `mlp_steps` batches' worth); 128 x `steps` random
            faces as 178x218 JPEGs in CelebA's raw layout (img_align_celeba/, list_attr_celeba.txt),
            made 64x64 by celeba_preprocess.py
  train     each of the six scripts for 2 epochs of `steps` batches (`mlp_steps` for the GAN and cGAN), the
            first a warm-up: the script's own img/s of the second; the seconds a whole epoch (60,000 digits,
            202,599 faces) would take, beside the GTX 1080 Ti's of the original collections; the share of
            the measured bf16 peak reached (FLOPs per image and the peak as benchmarks/speed.py counts
            them); the peak memory (on CUDA torch.cuda.max_memory_allocated at the script's exit, on the CPU
            the process's peak resident memory); the warm-up, the first epoch's seconds beyond the second's
  variants  `variant_script` again with each of `variants` (fp32 with TF32, contiguous memory, torch.compile),
            against its default run (bf16 where the device has it, channels_last)
  torchrun  `torchrun_script` under torchrun, one process per GPU (NCCL), or 2 on the CPU (gloo)
  backend   NCCL (gloo on the CPU) started under torchrun and one all_reduce: on one GPU the scripts run in
            a world of one process, which starts no process group
  resume    `resume_script` killed with SIGKILL after its first saved epoch, then the same command again: it
            must train epoch 2 alone, with the checkpoint's fixed inputs; whether its losses equal the
            uninterrupted (train) run's is reported, not required (CUDA kernels need not be deterministic)
  generate  --generate=`generate` from the generator `generate_script`'s train run saved: a PNG grid

Writes into --out: gpu_check.md (a table, one row per check), gpu_check.json, the generated grid, and
logs/ (each run's command, stdout and stderr). A failed check (a non-zero exit, or past its time limit) is
one FAILED row with the last line of its stderr, and the next check runs. Exit status: 0 when every check
passed, 1 when one failed or more, 2 for bad input.
"""
import concurrent.futures
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from speed import IMAGES_PER_EPOCH, flops_per_image, measure_peaks, write_mnist  # also puts the repository on sys.path

from plumbing import config, console  # noqa: E402  (the repository is on the path from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- what runs
out = ''                              # the folder for the table, the JSON, the grid and logs/ (required)
device = 'auto'                       # {auto, cuda, cpu}: auto = cuda (real size) if torch sees a GPU, else cpu (tiny)
checks = ''                           # comma-separated: train, variants, torchrun, backend, resume, generate; '' = all
variant_script = 'celeba_dcgan.py'    # the conv model run again with each of the variants
variants = '--precision=fp32,--channels_last=False,--compile=True'  # comma-separated; each: overrides of one more run
torchrun_script = 'mnist_cgan.py'     # run under torchrun
resume_script = 'mnist_dcgan.py'      # killed after its first saved epoch and run again
generate_script = 'celeba_cdcgan.py'  # --generate samples from the generator of its train run
generate = 8                          # [1, 1000]: --generate=N (for the CelebA cDCGAN, N faces of each gender)

# ---------------------------------------------------------------- size and time on a GPU (the CPU runs TINY)
steps = 40                            # [2, 1000]: batches of 128 in each of the 2 epochs of a conv model's run
mlp_steps = 400                       # [2, 1000]: the same for the fully connected GAN and cGAN, far quicker a step
budget_s = 450                        # [60, 3600]: seconds for all the checks; no run is given more than is left
run_s = 90                            # [1, 600]: time limit of one run of a script (and of celeba_preprocess.py)
compile_s = 240                       # [1, 600]: time limit of a run with --compile=True, which compiles first

SCRIPTS = {  # script: (its data, whether it is a conv model, the GTX 1080 Ti's seconds an epoch; the GAN has none)
    'mnist_gan.py': ('mnist', False, None),
    'mnist_cgan.py': ('mnist', False, 9.13),
    'mnist_dcgan.py': ('mnist', True, 197.86),
    'mnist_cdcgan.py': ('mnist', True, 47.16),
    'celeba_dcgan.py': ('celeba', True, 732.54),
    'celeba_cdcgan.py': ('celeba', True, 826.69),
}
CHECKS = ('train', 'variants', 'torchrun', 'backend', 'resume', 'generate')
REAL = {'d': 128, 'batch_size': 128}  # with steps and mlp_steps above
TINY = {'d': 8, 'batch_size': 16, 'steps': 4, 'mlp_steps': 4}  # seconds a run, most of them torch's start
# A Ctrl-C stops every check: no run starts after it, and the running ones are ended with their process groups
# (each runs in a session of its own, so the terminal's SIGINT does not reach them).
interrupted = threading.Event()
running = set()                 # the Popen of each run now going on
running_lock = threading.Lock()
GRACE_S = 10  # a run past its limit gets SIGTERM (torchrun then stops its workers), and SIGKILL this much later
CELEBA_ATTRIBUTES = (  # the 40 columns of CelebA's list_attr_celeba.txt
    '5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair '
    'Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones '
    'Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline '
    'Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick '
    'Wearing_Necklace Young').split()

# Runs a script as `python script args` does, then writes its peak memory to a file: argv is the device type,
# that file, the script and its arguments. (Guarded: a process that spawns children has them import it.)
PEAK_MEMORY_WRAPPER = '''
import atexit, os, resource, runpy, sys


def save_peak(kind, record):
    import torch  # the script loaded it
    peak = (torch.cuda.max_memory_allocated() if kind == 'cuda' else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux counts it in KiB
    with open(record, 'w') as f:
        f.write(str(peak))


if __name__ == '__main__':
    kind, record, script = sys.argv[1:4]
    atexit.register(save_peak, kind, record)
    sys.argv, sys.path[0] = sys.argv[3:], os.path.dirname(script)
    runpy.run_path(script, run_name='__main__')
'''

# Under torchrun: start the process group on the backend named in argv and sum one 1 from each process.
BACKEND_PROBE = '''
import os, sys, torch
import torch.distributed as dist
backend = sys.argv[1]
device = torch.device('cuda', int(os.environ['LOCAL_RANK'])) if backend == 'nccl' else torch.device('cpu')
if device.type == 'cuda':
    torch.cuda.set_device(device)
dist.init_process_group(backend)
total = torch.ones(1, device=device)
dist.all_reduce(total)
if total.item() != dist.get_world_size():
    sys.exit(f"all_reduce of one 1 from each of {dist.get_world_size()} processes gave {total.item()}")
if dist.get_rank() == 0:
    print(f"{backend}: all_reduce over {dist.get_world_size()} process(es) gave {total.item():.0f}")
dist.destroy_process_group()
'''


# ---------------------------------------------------------------- the constants, checked before any work

def chosen_checks():
    names = [c.strip() for c in checks.split(',') if c.strip()]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        console.fail(f"--checks={checks}: {unknown[0]!r} is not a check; choose among {', '.join(CHECKS)}, "
                     f"comma-separated", 2)
    return names or list(CHECKS)


def chosen_variants():
    """Each variant as its list of --name=value overrides; or stop with one line naming a malformed one."""
    chosen = []
    for item in (v.strip() for v in variants.split(',') if v.strip()):
        overrides = item.split()
        if not all(re.fullmatch(r'--\w+=\S*', o) for o in overrides):
            console.fail(f"--variants={variants}: {item!r} is not a list of --name=value overrides", 2)
        chosen.append(overrides)
    return chosen


def check_script_choices():
    for name in ('variant_script', 'torchrun_script', 'resume_script', 'generate_script'):
        if globals()[name] not in SCRIPTS:
            console.fail(f"--{name}={globals()[name]}: choose one of {', '.join(SCRIPTS)}", 2)
    if not SCRIPTS[variant_script][1]:
        console.fail(f"--variant_script={variant_script}: choose a conv model (the variants change its "
                     f"convolutions)", 2)


def output_folder():
    """The absolute --out with its logs/ made, or stop with one line where it cannot be written."""
    if not out:
        console.fail("name the folder for the table, the JSON and the logs: --out=FOLDER", 2)
    folder = os.path.abspath(out)
    try:
        os.makedirs(os.path.join(folder, 'logs'), exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        console.fail(f"--out={out}: cannot write there ({e.strerror or e}); give a folder you can write", 2)
    return folder


# ---------------------------------------------------------------- running one script

@dataclass
class Setting:
    """Where and at what size the checks run, and the folders they use."""
    device: str        # 'cuda' (real size) or 'cpu' (tiny)
    d: int
    batch_size: int
    steps: int         # batches an epoch of a conv model
    mlp_steps: int     # batches an epoch of the GAN and cGAN
    processes: int     # under torchrun
    work: str          # the data and every run's results (temporary)
    out: str
    deadline: float    # time.monotonic() by which every run must have ended
    env: dict

    def batches(self, script):
        return self.steps if SCRIPTS[script][1] else self.mlp_steps


@dataclass
class Ran:
    status: Optional[int]  # the exit status; None: stopped at its time limit
    stdout: str
    error: str          # the last line of its stderr, or why it was stopped
    seconds: float


def run(setting, name, command, limit, kill_after=None):
    """Run command (a script as `python script args`, or torchrun), its output in logs/; end it at its time
    limit, or with SIGKILL once its stdout has a line that matches kill_after (then its status is -9)."""
    limit = min(limit, setting.deadline - time.monotonic())
    if limit <= 0:
        return Ran(None, '', f"not started: the budget of {budget_s} s was spent", 0.0)
    if interrupted.is_set():
        return Ran(None, '', "not started: interrupted", 0.0)
    log = os.path.join(setting.out, 'logs', re.sub(r'[^\w.=-]+', '_', name))
    with open(log + '.command', 'w') as f:
        f.write(shlex.join(command) + '\n')
    start = time.monotonic()
    with open(log + '.stdout', 'w') as stdout, open(log + '.stderr', 'w') as stderr:
        with running_lock:
            if interrupted.is_set():
                return Ran(None, '', "not started: interrupted", 0.0)
            # A session of its own: at the time limit one signal reaches every process of its group (torchrun's
            # workers, each in a session of its own, are stopped by torchrun when it gets SIGTERM).
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=setting.work, env=setting.env,
                                       start_new_session=True)
            running.add(process)
        try:
            ended = (wait_for_line(process, log + '.stdout', kill_after, limit) if kill_after else
                     wait(process, limit))
        except KeyboardInterrupt:  # in the main thread: the data check
            stop_every_run()
            raise
        finally:
            running.discard(process)
    seconds = time.monotonic() - start
    with open(log + '.stdout') as f:
        text = f.read()
    with open(log + '.stderr') as f:
        lines = f.read().strip().splitlines()
    if not ended:
        return Ran(None, text, f"stopped at its time limit of {limit:.0f} s", seconds)
    return Ran(process.returncode, text, lines[-1] if lines else '', seconds)


def wait(process, limit):
    """Whether process ended within limit seconds; if not, it and its group are stopped."""
    try:
        process.wait(timeout=limit)
        return True
    except subprocess.TimeoutExpired:
        end_group(process)
        return False


def stop_every_run():
    """After a Ctrl-C: no run starts from now on, and each running one is ended with its group."""
    with running_lock:
        interrupted.set()
        for process in list(running):
            end_group(process)


def end_group(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # it and its group ended meanwhile
        return
    try:
        process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_line(process, path, pattern, limit):
    """SIGKILL process as soon as its stdout (written to path) has a line matching pattern; whether it ended
    within limit seconds, by the kill or by itself."""
    end = time.monotonic() + limit
    while process.poll() is None:
        with open(path) as f:
            if re.search(pattern, f.read(), re.M):
                process.kill()
                process.wait()
                return True
        if time.monotonic() > end:
            end_group(process)
            return False
        time.sleep(0.02)
    return True


def script_command(setting, script, args, peak_file=None):
    """python script args; with peak_file, through the wrapper that writes the run's peak memory there."""
    path = os.path.join(REPO, script)
    if peak_file is None:
        return [sys.executable, path, *args]
    return [sys.executable, os.path.join(setting.work, 'peak_memory.py'), setting.device, peak_file, path, *args]


def training_args(setting, script, results_dir):
    """The overrides of a script's timed run: 2 epochs of its steps, at the setting's size."""
    data, conv, _ = SCRIPTS[script]
    args = [f'--data_dir={os.path.join(setting.work, data)}', f'--results_dir={results_dir}', '--train_epoch=2',
            f'--train_limit={setting.batch_size * setting.batches(script)}', f'--batch_size={setting.batch_size}',
            f'--device={setting.device}']
    args += ['--quality_samples=0']  # the scoring is no part of the speed
    return args + ([f'--d={setting.d}'] if conv else [])


def history(results_dir):
    """The epochs of the run's <Model>_train_hist.json."""
    path, = glob.glob(os.path.join(results_dir, '*_train_hist.json'))
    with open(path) as f:
        return json.load(f)['epochs']


def load_checkpoint(results_dir):
    return torch.load(os.path.join(results_dir, 'checkpoint.pt'), map_location='cpu', weights_only=True)


# ---------------------------------------------------------------- the checks: each returns its row

def passed(name, kind, seconds, **facts):
    return {'check': name, 'kind': kind, 'ok': True, 'seconds': round(seconds, 1), **facts}


def failed(name, kind, seconds, error):
    return {'check': name, 'kind': kind, 'ok': False, 'seconds': round(seconds, 1), 'error': error}


def check_data(setting):
    """Digits for the longest MNIST run; faces in CelebA's raw layout, through celeba_preprocess.py."""
    start = time.monotonic()
    digits = setting.batch_size * max(setting.batches(s) for s in SCRIPTS if SCRIPTS[s][0] == 'mnist')
    faces = setting.batch_size * setting.steps
    write_mnist(os.path.join(setting.work, 'mnist'), digits)
    raw = os.path.join(setting.work, 'celebA')
    write_raw_celeba(raw, faces)
    command = [sys.executable, os.path.join(REPO, 'celeba_preprocess.py'), f'--celeba_dir={raw}',
               f"--output_dir={os.path.join(setting.work, 'celeba')}"]
    ran = run(setting, 'data', command, run_s)
    seconds = time.monotonic() - start
    if ran.status != 0:
        return failed('data', 'data', seconds, ran.error)
    return passed('data', 'data', seconds, digits=digits, faces=faces)


def write_raw_celeba(root, n):
    """n random 178x218 faces as CelebA's aligned JPEGs, and list_attr_celeba.txt: alternately female and male."""
    folder = os.path.join(root, 'img_align_celeba')
    os.makedirs(folder)
    generator = np.random.default_rng(0)
    rows = []
    for i in range(1, n + 1):
        # 5x4 random colours stretched smoothly over the image: as quick to code as a photo, not as noise
        colours = generator.integers(0, 256, (5, 4, 3), dtype=np.uint8)
        Image.fromarray(colours).resize((178, 218), Image.BILINEAR).save(os.path.join(folder, f'{i:06d}.jpg'),
                                                                         quality=90)
        values = generator.choice((-1, 1), len(CELEBA_ATTRIBUTES))
        values[CELEBA_ATTRIBUTES.index('Male')] = 1 if i % 2 else -1
        rows.append(f'{i:06d}.jpg ' + ' '.join(f'{v:2d}' for v in values))
    with open(os.path.join(root, 'list_attr_celeba.txt'), 'w') as f:
        f.write('\n'.join([str(n), ' '.join(CELEBA_ATTRIBUTES), *rows]) + '\n')


def check_training(setting, name, kind, script, overrides=()):
    """A timed run of script: img/s of its second epoch, the first epoch's extra seconds, peak memory."""
    results = os.path.join(setting.work, name.replace(' ', '_'))
    peak_file = results + '.peak'
    limit = compile_s if wants_compile(overrides) else run_s
    ran = run(setting, name, script_command(setting, script, [*training_args(setting, script, results), *overrides],
                                            peak_file), limit)
    if ran.status != 0:
        return failed(name, kind, ran.seconds, ran.error)
    first, last = history(results)
    with open(peak_file) as f:
        peak = int(f.read())
    chose = re.search(r'^(cpu|cuda)\S*, .*', ran.stdout, re.M)  # the script's first line: device and precision
    return passed(name, kind, ran.seconds, script=script, overrides=list(overrides), chose=chose and chose[0],
                  images_per_second=last['images_per_second'], warm_up_s=first['seconds'] - last['seconds'],
                  peak_memory_bytes=peak, results_dir=results)


def wants_compile(overrides):
    return any(re.fullmatch(r'--compile=(true|1|yes|on)', o, re.I) for o in overrides)


def check_torchrun(setting, script):
    name = f'torchrun {script}'
    results = os.path.join(setting.work, 'torchrun')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={setting.processes}']
    # '--' ends torchrun's options: it would take --d=8 for an abbreviation of one of its own.
    ran = run(setting, name, [*launcher, os.path.join(REPO, script), '--',
                              *training_args(setting, script, results)], run_s)
    if ran.status != 0:
        return failed(name, 'torchrun', ran.seconds, ran.error)
    return passed(name, 'torchrun', ran.seconds, script=script, processes=setting.processes,
                  images_per_second=history(results)[-1]['images_per_second'])


def check_backend(setting):
    backend = 'nccl' if setting.device == 'cuda' else 'gloo'
    name = f'backend {backend}'
    probe = os.path.join(setting.work, 'backend_probe.py')
    ran = run(setting, name, [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                              f'--nproc_per_node={setting.processes}', probe, backend], run_s)
    if ran.status != 0:
        return failed(name, 'backend', ran.seconds, ran.error)
    return passed(name, 'backend', ran.seconds, backend=backend, processes=setting.processes,
                  said=ran.stdout.strip().splitlines()[-1])


def check_resume(setting, script, uninterrupted):
    """Kill a run after its first saved epoch and run the same command again; compare with the
    uninterrupted run (a future of its train row, or None where the train check does not run)."""
    name = f'resume {script}'
    results = os.path.join(setting.work, 'resume')
    command = script_command(setting, script, training_args(setting, script, results))
    killed = run(setting, name + ' (killed)', command, run_s, kill_after=r'^\[1/2\]')
    if killed.status == 0:
        return failed(name, 'resume', killed.seconds, "it ran to its end with no line [1/2] to kill it after")
    if killed.status != -signal.SIGKILL:
        return failed(name, 'resume', killed.seconds, killed.error)
    saved = load_checkpoint(results)
    if saved['epoch'] != 1:
        return failed(name, 'resume', killed.seconds, f"the checkpoint held epoch {saved['epoch']} when the run was "
                                                      f"killed, not 1: raise steps, so that epoch 2 takes longer")
    again = run(setting, name, command, run_s)
    seconds = killed.seconds + again.seconds
    if again.status != 0:
        return failed(name, 'resume', seconds, again.error)
    trained = [int(n) for n in re.findall(r'^\[(\d+)/2\]', again.stdout, re.M)]
    epochs = [h['epoch'] for h in history(results)]
    fixed_kept = same_tensors(saved['fixed'], load_checkpoint(results)['fixed'])
    facts = {'killed_after_epoch': 1, 'epochs_trained_again': trained, 'epochs': epochs,
             'continued': trained == [2] and epochs == [1, 2], 'fixed_inputs_equal': fixed_kept,
             **loss_comparison(results, uninterrupted)}
    if not (facts['continued'] and fixed_kept and facts.get('fixed_inputs_equal_uninterrupted', True)):
        return failed(name, 'resume', seconds, f"the run again trained epochs {trained} (history: {epochs}); "
                                               f"fixed inputs kept: {fixed_kept}, equal to the uninterrupted "
                                               f"run's: {facts.get('fixed_inputs_equal_uninterrupted')}")
    return passed(name, 'resume', seconds, script=script, **facts)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loss_comparison(results, uninterrupted):
    """Whether the resumed run's history (less its timings) and fixed inputs equal the uninterrupted run's."""
    row = uninterrupted.result() if uninterrupted else None
    if not row or not row['ok']:
        return {'losses_match': None, 'uninterrupted': "none to compare: its train check did not run or failed"}
    timing = ('seconds', 'images_per_second')
    resumed, straight = ([{k: v for k, v in h.items() if k not in timing} for h in history(d)]
                         for d in (results, row['results_dir']))
    differences = [abs(a[k] - b[k]) for a, b in zip(resumed, straight) for k in a if k != 'epoch']
    return {'losses_match': resumed == straight, 'largest_loss_difference': max(differences),
            'fixed_inputs_equal_uninterrupted': same_tensors(load_checkpoint(results)['fixed'],
                                                             load_checkpoint(row['results_dir'])['fixed'])}


def check_generate(setting, script, trained):
    """--generate from the generator of script's train run (a future of its row, or None)."""
    name = f'generate {script}'
    row = trained.result() if trained else None
    # Where no train run saved a generator, the script's own error says so: the row's FAILED line.
    results = row['results_dir'] if row and row['ok'] else os.path.join(setting.work, 'untrained')
    args = [f'--results_dir={results}', f'--generate={generate}', f'--device={setting.device}',
            *([f'--d={setting.d}'] if SCRIPTS[script][1] else [])]
    ran = run(setting, name, script_command(setting, script, args), run_s)
    if ran.status != 0:
        return failed(name, 'generate', ran.seconds, ran.error)
    grid, = glob.glob(os.path.join(results, '*_generated.png'))
    shutil.copy(grid, setting.out)
    with Image.open(grid) as picture:
        size = list(picture.size)
    return passed(name, 'generate', ran.seconds, script=script, png=os.path.basename(grid), png_size=size)


# ---------------------------------------------------------------- the whole run

def plan(setting, names, variant_overrides):
    """The checks to run, in order, as functions of the futures of the train rows (by script)."""
    jobs = []
    if 'train' in names:
        jobs += [(f'train {s}', lambda trained, s=s: check_training(setting, f'train {s}', 'train', s))
                 for s in SCRIPTS]
    if 'variants' in names:
        for o in variant_overrides:
            name = f"variant {variant_script} {' '.join(o)}"
            jobs.append((name, lambda trained, n=name, o=o: check_training(setting, n, 'variant', variant_script, o)))
    if 'torchrun' in names:
        jobs.append(('torchrun', lambda trained: check_torchrun(setting, torchrun_script)))
    if 'backend' in names:
        jobs.append(('backend', lambda trained: check_backend(setting)))
    if 'resume' in names:
        jobs.append(('resume', lambda trained: check_resume(setting, resume_script, trained.get(resume_script))))
    if 'generate' in names:
        jobs.append(('generate', lambda trained: check_generate(setting, generate_script,
                                                                trained.get(generate_script))))
    return jobs


def run_checks(setting, jobs):
    """The rows of the jobs, in their order. On a GPU one run at a time (each is timed), compiling last, so
    that the others have their time whatever it takes; on the CPU as many at once as it has cores, compiling
    first, so that the others run meanwhile. The train jobs, which others wait for, go before those: a
    worker waits only for a job taken before its own, never a deadlock."""
    parallel = setting.device == 'cpu'
    compiling = [i for i, (name, _) in enumerate(jobs) if wants_compile(name.split())]
    rest = [i for i in range(len(jobs)) if i not in compiling]
    futures, trained = {}, {}
    with concurrent.futures.ThreadPoolExecutor((os.cpu_count() or 1) if parallel else 1) as pool:
        try:
            for i in compiling + rest if parallel else rest + compiling:
                name, job = jobs[i]
                futures[i] = pool.submit(with_progress_line, job, trained)
                if name.startswith('train '):
                    trained[name.removeprefix('train ')] = futures[i]
            # Waits of 0.2 s: the OS may hand a Ctrl-C to a worker thread, and Python raises it in this one
            # only when this one runs; a wait for a whole result would hold it until that job ended.
            while not all(future.done() for future in futures.values()):
                concurrent.futures.wait(futures.values(), timeout=0.2)
        except KeyboardInterrupt:  # before the pool waits for its workers, which end as their runs do
            stop_every_run()
            raise
        return [futures[i].result() for i in range(len(jobs))]


def with_progress_line(job, trained):
    """The job's row, after one line on how it went: the table comes at the end, minutes later on a GPU."""
    row = job(trained)
    print(f"{row['check']}: {'ok' if row['ok'] else 'FAILED'} ({row['seconds']:.0f} s)", flush=True)
    return row


def describe_machine(setting):
    if setting.device == 'cuda':
        return {'gpu': torch.cuda.get_device_name(0), 'gpus': torch.cuda.device_count(), 'torch': torch.__version__,
                'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version()}
    model = 'unknown CPU'
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    return {'cpu': model, 'cores': os.cpu_count(), 'torch': torch.__version__}


def add_projections(rows, flops, peaks):
    """Seconds a whole epoch, the GTX 1080 Ti's, the share of the bf16 peak, and the variants against their default."""
    default = {r['script']: r for r in rows if r['kind'] == 'train' and r['ok']}
    for r in rows:
        if r['ok'] and 'images_per_second' in r:
            data, conv, gtx = SCRIPTS[r['script']]
            r['seconds_per_epoch'] = IMAGES_PER_EPOCH[data] / r['images_per_second']
            r['gtx_1080_ti_seconds_per_epoch'] = gtx
            r['share_of_bf16_peak'] = flops[r['script']] * r['images_per_second'] / 1e9 / peaks['conv' if conv else
                                                                                                'matmul']
        if r['ok'] and r['kind'] == 'variant' and r['script'] in default:
            r['speed_vs_default'] = r['images_per_second'] / default[r['script']]['images_per_second']
            r['warm_up_vs_default_s'] = r['warm_up_s'] - default[r['script']]['warm_up_s']


def notes(r):
    kind = r['kind']
    if not r['ok']:
        return r['error']
    if kind == 'data':
        return f"{r['digits']:,} digits, {r['faces']:,} faces"
    if kind == 'train':
        return r['chose'] or ''
    if kind == 'variant' and 'speed_vs_default' in r:
        return (f"{r['speed_vs_default']:.2f}x the default run's img/s; warm-up "
                f"{r['warm_up_vs_default_s']:+.1f} s against it")
    if kind == 'torchrun' and r['processes'] == 1:
        return "1 process: a world of one starts no process group (the backend row starts one)"
    if kind in ('torchrun', 'backend'):
        return f"{r['processes']} process(es)" + (f"; {r['said']}" if kind == 'backend' else '')
    if kind == 'resume':
        losses = ('none to compare' if r['losses_match'] is None else 'equal' if r['losses_match'] else
                  f"differ, by {r['largest_loss_difference']:.2g} at most")
        return (f"killed after epoch 1; the same command again trained epoch 2 alone, with the saved fixed "
                f"inputs; losses against the uninterrupted run: {losses}")
    if kind == 'generate':
        return f"{r['png']}, {r['png_size'][0]}x{r['png_size'][1]}"
    return ''


def table(rows):
    lines = ["| check | result | img/s | s/epoch (whole data set) | GTX 1080 Ti s/epoch | share of bf16 peak "
             "| warm-up s | peak memory | wall s | notes |", "|" + "---|" * 10]
    for r in rows:
        timed = r['ok'] and 'images_per_second' in r
        gtx = r.get('gtx_1080_ti_seconds_per_epoch')
        cells = [r['check'], 'ok' if r['ok'] else 'FAILED',
                 f"{r['images_per_second']:,.0f}" if timed else '',
                 f"{r['seconds_per_epoch']:,.1f}" if timed else '',
                 f"{gtx}" if timed and gtx else '',
                 f"{r['share_of_bf16_peak']:.1%}" if timed else '',
                 f"{r['warm_up_s']:.1f}" if 'warm_up_s' in r else '',
                 f"{r['peak_memory_bytes'] / 2 ** 20:,.0f} MiB" if 'peak_memory_bytes' in r else '',
                 f"{r['seconds']:.1f}", notes(r)]
        lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
    return '\n'.join(lines)


def heading(setting, facts):
    machine, peaks = facts['machine'], facts['peaks_gflops']
    if setting.device == 'cuda':
        where = (f"{machine['gpu']} ({machine['gpus']} GPU(s)), torch {machine['torch']}, CUDA {machine['cuda']}, "
                 f"cuDNN {machine['cudnn']}; real size: d = {setting.d}, batch {setting.batch_size}")
        memory = "peak memory: torch.cuda.max_memory_allocated at the script's exit"
    else:
        where = (f"{machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}; no CUDA, so tiny sizes "
                 f"(d = {setting.d}, batch {setting.batch_size}), several runs at once: the timings measure nothing")
        memory = "peak memory: the process's peak resident memory"
    return (f"# GPU check\n\n`python benchmarks/gpu_check.py {shlex.join(sys.argv[1:])}`: "
            f"{facts['seconds']:.0f} s in all.\n"
            f"{where}; 2 epochs of {setting.steps} batches ({setting.mlp_steps} for the GAN and cGAN), the first a "
            f"warm-up. FLOPs per image and the bf16 peak as benchmarks/speed.py counts and measures them: matmul "
            f"{peaks['matmul']:,.0f} GFLOP/s, conv {peaks['conv']:,.0f} GFLOP/s (the share is of the conv peak for "
            f"the conv models, of the matmul peak for the GAN and cGAN); {memory}.\n")


def main():
    config.configure(globals())
    names, variant_overrides = chosen_checks(), chosen_variants()
    check_script_choices()
    if device == 'cuda' and not torch.cuda.is_available():
        console.fail("--device=cuda: torch sees no CUDA GPU here; use --device=auto or cpu", 2)
    folder = output_folder()
    started = time.monotonic()
    cuda = device == 'cuda' or device == 'auto' and torch.cuda.is_available()
    size = {**REAL, 'steps': steps, 'mlp_steps': mlp_steps} if cuda else TINY
    env = dict(os.environ) if cuda else {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    try:  # each check's run is in a session of its own: the terminal's Ctrl-C reaches this process alone
        with tempfile.TemporaryDirectory() as work:
            setting = Setting('cuda' if cuda else 'cpu', **size, processes=torch.cuda.device_count() if cuda else 2,
                              work=work, out=folder, deadline=started + budget_s, env=env)
            for name, text in (('peak_memory.py', PEAK_MEMORY_WRAPPER), ('backend_probe.py', BACKEND_PROBE)):
                with open(os.path.join(work, name), 'w') as f:
                    f.write(text)
            machine = describe_machine(setting)
            # Before any check, while nothing else runs: on the CPU, one thread, as each run there has.
            matmul, conv = measure_peaks(torch.bfloat16, torch.device(setting.device),
                                         torch.get_num_threads() if cuda else 1)
            peaks = {'matmul': matmul, 'conv': conv}
            flops = {s: flops_per_image(s, setting.d, 2) for s in SCRIPTS}  # per image: the batch does not change it
            print(f"{setting.device}: {machine}; bf16 peak {matmul:,.0f} GFLOP/s matmul, {conv:,.0f} conv", flush=True)
            rows = [with_progress_line(lambda trained: check_data(setting), {})]
            rows += run_checks(setting, plan(setting, names, variant_overrides))
    except KeyboardInterrupt:
        console.fail(f"interrupted: every check's run was stopped; the logs so far are in {folder}/logs", 130)
    add_projections(rows, flops, peaks)
    seconds = time.monotonic() - started
    write_report(setting, rows, {'device': setting.device, 'machine': machine, 'sizes': size,
                                 'processes': setting.processes, 'budget_s': budget_s, 'seconds': seconds,
                                 'peaks_gflops': peaks, 'flops_per_image': flops})
    raise SystemExit(0 if all(r['ok'] for r in rows) else 1)


def write_report(setting, rows, facts):
    """gpu_check.md (also printed) and gpu_check.json in the output folder."""
    report = heading(setting, facts) + '\n' + table(rows) + '\n'
    with open(os.path.join(setting.out, 'gpu_check.md'), 'w') as f:
        f.write(report)
    with open(os.path.join(setting.out, 'gpu_check.json'), 'w') as f:
        json.dump({**facts, 'checks': [{k: v for k, v in r.items() if k != 'results_dir'} for r in rows]}, f,
                  indent=1)
    print(report)


if __name__ == '__main__':
    main()
