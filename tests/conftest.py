"""Shared fixtures: the repository on sys.path, tiny MNIST files in the real IDX format, script runners, tiny
MNIST runs and a folder trained by one, a fake CelebA as downloaded."""
import gzip
import json
import os
import random
import runpy
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_idx(path, array):
    """Write a uint8 tensor as a gzipped IDX file, header and all, as MNIST ships it."""
    header = struct.pack('>HBB', 0, 0x08, array.dim()) + struct.pack(f'>{array.dim()}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.contiguous().numpy().tobytes())


def fake_digits(n, seed):
    """n 28x28 images whose label sets where a bright bar sits, so classes differ visibly."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
    images = (torch.rand(n, 28, 28, generator=generator) * 60).to(torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 4:24, 2 + 2 * label:5 + 2 * label] = 255
    return images, labels


COLOUR = {'female': 0, 'male': 2}  # female faces are mostly red, male ones mostly blue


def write_faces(folder, counts, size=64, seed=0):
    """counts[class] JPEGs in folder/class/, named as celeba_preprocess.py names them: smooth random
    colour blotches over a strong red (female) or blue (male) channel, so a grid shows the gender."""
    generator = torch.Generator().manual_seed(seed)
    for cls, count in counts.items():
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        for i in range(count):
            small = torch.rand(3, 8, 8, generator=generator) * 100
            small[COLOUR[cls]] += 150
            face = torch.nn.functional.interpolate(small[None], size=size, mode='bilinear')[0]
            pixels = face.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(os.path.join(folder, cls, f'{seed * 1000 + i:06d}.jpg'), quality=95)


def write_mnist(data_dir, digits, n_train, n_test):
    """data_dir/MNIST/raw/ with the four IDX files, of digits(n, seed): seed 0 for training, 1 for test."""
    raw = data_dir / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for prefix, n, seed in (('train', n_train, 0), ('t10k', n_test, 1)):
        images, labels = digits(n, seed)
        write_idx(raw / f'{prefix}-images-idx3-ubyte.gz', images)
        write_idx(raw / f'{prefix}-labels-idx1-ubyte.gz', labels)
    return data_dir


@pytest.fixture(scope='session')
def mnist_dir(tmp_path_factory):
    """A data_dir holding MNIST/raw/ with 512 training and 128 test images."""
    return write_mnist(tmp_path_factory.mktemp('data'), fake_digits, 512, 128)


# Downloads must fail fast and for sure, whatever network the machine has.
OFFLINE = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': ''}
ENV = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}  # a script's, on one CPU thread


def run_script(script, *args, cwd, timeout=300, **popen):
    """Run a top-level script as a user would, on one CPU thread; return the CompletedProcess."""
    env = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def run_in_process(script, *args):
    """Run a script's command line in this process, as `python script args` runs it, on one torch thread.

    No interpreter start, so it is quick; and a test can watch the models through global hooks (ModelWatch),
    whatever helpers and `with` blocks the training loop has.
    """
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(REPO / script), *args]
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(REPO / script), run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


@dataclass
class ModelCall:
    """One forward call of a script's Generator or Discriminator: detached copies of what went in and out."""
    role: str               # 'Generator' or 'Discriminator'
    model: torch.nn.Module
    training: bool          # in train mode with gradients on: a training step, not sampling
    inputs: tuple
    output: torch.Tensor
    input_requires_grad: bool


class ModelWatch:
    """Records every call of the scripts' models (by class name: Generator, Discriminator) while active.

    roles: the classes to record; keep_generator_states: also G's state_dict after each of its optimizer's
    steps, for checking the EMA.
    """

    def __init__(self, roles=('Generator', 'Discriminator'), keep_generator_states=False):
        self.roles = roles
        self.calls = []
        self.generator_states = []
        self.keep_generator_states = keep_generator_states
        self.trained_generator = None

    def _after(self, module, inputs, output):
        role = type(module).__name__
        if role in self.roles:
            training = self._training(module)
            self.calls.append(ModelCall(role, module, training, tuple(t.detach().clone() for t in inputs),
                                        output.detach().float().clone(), inputs[0].requires_grad))
            if role == 'Generator' and training:
                self.trained_generator = module

    def _after_step(self, optimizer, args, kwargs):
        G = self.trained_generator
        if self.keep_generator_states and G is not None:
            first = next(G.parameters())
            if any(p is first for group in optimizer.param_groups for p in group['params']):
                self.generator_states.append({k: v.detach().clone() for k, v in G.state_dict().items()})

    @staticmethod
    def _training(module):
        return module.training and torch.is_grad_enabled()

    def __enter__(self):
        self._hooks = [register_module_forward_hook(self._after), register_optimizer_step_post_hook(self._after_step)]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()

    def of(self, role, training=True):
        return [call for call in self.calls if call.role == role and call.training == training]


# ---------------------------------------------------------------- comparing outputs

def png_pixels(path, height=None):
    """A written PNG as a uint8 (3, H, W) tensor; height keeps only the top rows (the grid above a caption)."""
    with Image.open(path) as picture:
        pixels = torch.from_numpy(np.array(picture.convert('RGB'))).permute(2, 0, 1)
    return pixels[:, :height] if height else pixels


def render(G, inputs, nrow):
    """G's images for the inputs laid out as the README says a grid is: nrow per row, [-1, 1] as black to white."""
    from torchvision.utils import make_grid
    with torch.no_grad():
        grid = make_grid(G(*inputs), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return grid.mul(255).round().to(torch.uint8)


def assert_same_picture(written, expected):
    # Within 2 of 255 levels: the rounding of the PNG writer; any other image differs by far more.
    assert written.shape == expected.shape
    assert (written.int() - expected.int()).abs().max() <= 2


def assert_same_run(out, straight, model):
    """The history (less the timings), the saved weights and the checkpoint's models and optimizers are equal."""
    timing = ('seconds', 'images_per_second')
    resumed, uninterrupted = (json.loads((d / f'{model}_train_hist.json').read_text())['epochs']
                              for d in (out, straight))
    assert [{k: v for k, v in e.items() if k not in timing} for e in resumed] == \
           [{k: v for k, v in e.items() if k not in timing} for e in uninterrupted]
    for path in sorted(p.name for p in straight.glob('*.pt') if p.name != 'checkpoint.pt'):
        a, b = (torch.load(d / path, weights_only=True) for d in (out, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    a, b = (torch.load(d / 'checkpoint.pt', weights_only=True) for d in (out, straight))
    assert a['epoch'] == b['epoch'] == 2
    for part in ('models', 'optimizers', 'fixed'):
        assert_equal_trees(a[part], b[part], part)


def assert_equal_trees(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_trees(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f'{where}[{i}]')
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def folder_state(root, ignore=('run.lock',)):
    """{relative path: (size, mtime, inode)} of everything under root: equal states mean nothing was
    written, replaced or removed there (the scripts replace files, so a rewrite changes the inode).
    run.lock is ignored: a run that takes the folder writes its own name there before it may refuse."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if name not in ignore:
                info = os.lstat(path)
                state[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return state


@pytest.fixture(scope='session')
def script_server():
    """run(script, args, cwd, timeout=60) -> {'status', 'stdout', 'stderr'}: each run in a fresh process
    forked from tests/script_server.py, which loaded torch once, so a run that stops at once takes
    milliseconds, not the seconds of a new Python loading torch."""
    env = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    server = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'script_server.py')], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)

    def run(script, args, cwd, timeout=60):
        server.stdin.write(json.dumps({'script': script, 'args': list(map(str, args)), 'cwd': str(cwd),
                                       'timeout': timeout}) + '\n')
        server.stdin.flush()
        return json.loads(server.stdout.readline())
    yield run
    server.stdin.close()
    server.wait(timeout=60)


def copy_results(source, target):
    """A copy of a folder of results in hard links, made in no time: the scripts only ever replace their
    files, never change one in place, so a run on the copy leaves the source as it was. run.lock, which
    is written in place, is copied. A test that damages a file of the copy must replace it too."""
    def link(source_file, target_file):
        (shutil.copy2 if os.path.basename(source_file) == 'run.lock' else os.link)(source_file, target_file)
    shutil.copytree(source, target, copy_function=link)


# ---------------------------------------------------------------- tiny MNIST runs

TINY = ['--train_limit=64', '--batch_size=32', '--device=cpu', '--quality_samples=50']


def tiny(mnist_dir, results_dir, epochs, *extra):
    """An MNIST script's arguments for a run of 64 images (2 batches) an epoch, scored on 50 images."""
    return [f'--data_dir={mnist_dir}', f'--results_dir={results_dir}', f'--train_epoch={epochs}', *TINY, *extra]


TINY_ARGS = ['--train_limit=256', '--batch_size=32', '--device=cpu', '--quality_samples=200']


def tiny_args(script, mnist_dir, results_dir, epochs=2):
    """An MNIST script's arguments for a run of 256 images (8 batches) an epoch, scored on 200 images; the
    DCGANs at d = 8."""
    width = ['--d=8'] if 'dcgan' in script else []
    return [f'--data_dir={mnist_dir}', f'--results_dir={results_dir}', f'--train_epoch={epochs}', *TINY_ARGS, *width]


def history(folder, model='MNIST_GAN'):
    """The run's <model>_train_hist.json."""
    return json.loads((folder / f'{model}_train_hist.json').read_text())


def as_if_made_with(checkpoint, **constants):
    """Rewrite a checkpoint as if its run had been started with these constants: a resume refuses to change
    the experiment's, so a test that wrecks a run midway (an absurd lr) makes the run's own say so."""
    state = torch.load(checkpoint, weights_only=True)
    state['config'].update(constants)
    checkpoint.unlink()
    torch.save(state, checkpoint)


def assert_refused(result, status, line):
    """The run stopped with this status and exactly this one line on stderr."""
    assert (result['status'], result['stderr']) == (status, f'error: {line}\n')


def one_line(result, status, start):
    """The run stopped with this status and one line on stderr, which starts so."""
    assert result['status'] == status, result['stderr']
    assert result['stderr'].startswith(f'error: {start}') and result['stderr'].count('\n') == 1, result['stderr']


@pytest.fixture(scope='module')
def trained_gan(script_server, mnist_dir, tmp_path_factory):
    """A working folder whose out/ holds mnist_gan.py trained one tiny epoch: once per test file that asks."""
    work = tmp_path_factory.mktemp('trained')
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1), work)
    assert result['status'] == 0, result['stderr']
    return work


@pytest.fixture
def work(trained_gan, tmp_path):
    """A copy of the trained working folder for one test; damage a file in it only by replacing it."""
    copy_results(trained_gan, tmp_path / 'work')
    return tmp_path / 'work'


# ---------------------------------------------------------------- processes

def start(script, args, cwd):
    """A script started in a process of its own, on one CPU thread, its stdout and stderr piped."""
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''})


def dead_pid():
    """The pid of a process that has ended, as a killed run's is."""
    child = subprocess.Popen([sys.executable, '-c', ''])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- a fake CelebA, as downloaded

HEADER = ('5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair '
          'Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair '
          'Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face '
          'Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair '
          'Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Young').split()


def name_of(i):
    return f'{i:06d}.jpg'


def is_male(i):
    return i % 3 == 0


def fake_face(i):
    """A 178x218 JPEG unlike the others: gradients, a 'face' near the centre and a block near an edge."""
    rng = random.Random(i)
    ramp = Image.linear_gradient('L').resize((178, 218))
    im = Image.merge('RGB', (ramp, ramp.transpose(Image.Transpose.ROTATE_180), Image.new('L', (178, 218), i * 7)))
    draw = ImageDraw.Draw(im)
    x, y = rng.randrange(40, 80), rng.randrange(50, 100)
    draw.ellipse((x, y, x + 60, y + 80), fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.rectangle((rng.randrange(0, 20), rng.randrange(0, 30), rng.randrange(30, 60), rng.randrange(40, 70)),
                   fill=tuple(rng.randrange(256) for _ in range(3)))
    data = BytesIO()
    im.save(data, 'JPEG', quality=90)
    return data.getvalue()


def attribute_rows(count, male=is_male):
    """CelebA's rows: the name, then each value right-aligned in 3 columns ('  1' or ' -1'), some trailing spaces."""
    rng = random.Random(count)
    for i in range(1, count + 1):
        values = [rng.choice((-1, 1)) for _ in HEADER]
        values[HEADER.index('Male')] = 1 if male(i) else -1
        yield name_of(i), values, ''.join(f'{v:3d}' for v in values) + ' ' * (i % 3)


def write_txt(path, count, header=HEADER, with_count=True, newline='\n'):
    lines = ([str(count)] if with_count else []) + [' '.join(header) + ' ']
    lines += [name + text for name, _, text in attribute_rows(count)]
    with open(path, 'w', newline='') as f:
        f.write(newline.join(lines) + newline)


def write_csv(path, count):
    lines = [','.join(['image_id'] + HEADER)] + [','.join([name] + [str(v) for v in values])
                                                 for name, values, _ in attribute_rows(count)]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
