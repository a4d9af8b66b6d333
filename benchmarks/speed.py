"""Training speed of the six experiments at their real size, for each precision and thread count.

Run:    python benchmarks/speed.py                 (any constant below: --name=value)
Smoke:  python benchmarks/speed.py --smoke=True    (tiny models, one run each: checks that it works)

Each measurement runs a training script itself, as a user would, for two epochs of `steps` batches
on synthetic data in the real formats (random digits in IDX files, random faces as JPEGs): the
first epoch warms up, and the second epoch's images per second (the script's own timing of its
training loop) is the measurement. Measurements are interleaved (script by script, layout by layout,
precision by precision, then again `repeats` times), so a machine that speeds up or
slows down affects every column alike. FLOPs per image are counted with torch.utils.flop_counter
over one generator and discriminator step of the script's own models; the peaks are a large matrix
product and a DCGAN-sized convolution timed in each precision.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from plumbing import config, console, hardware, safe_files, torch_compat  # noqa: E402  (the repository root is put on the path first)

scripts = 'mnist_gan.py,mnist_cgan.py,mnist_dcgan.py,mnist_cdcgan.py,celeba_dcgan.py,celeba_cdcgan.py'  # comma-separated
precisions = ''           # comma-separated; '' = those the device runs natively: fp32 and bf16 (and fp16 on CUDA)
layouts = '1x1,1x2'       # processes x torch threads each, comma-separated: 2x1 is torchrun with 2 processes (CPU)
memory_formats = 'channels_last'  # comma-separated, for the conv models: channels_last, contiguous
repeats = 3               # [1, 1000]: interleaved rounds of every measurement
steps = 1                 # [1, 1000]: batches per epoch (written to disk): one warm-up epoch, then one timed epoch
device = 'auto'           # auto (cuda, else mps, else cpu), cpu, cuda
smoke = False             # tiny models (d = 8, batch 16) and one round: a check that the benchmark works
output = 'benchmarks/speed.json'  # non-empty: the measurements, for the README (beneath the repository; not in smoke)

IMAGES_PER_EPOCH = {'mnist': 60_000, 'celeba': 202_599}
SCRIPTS = ('mnist_gan.py', 'mnist_cgan.py', 'mnist_dcgan.py', 'mnist_cdcgan.py', 'celeba_dcgan.py', 'celeba_cdcgan.py')
PRECISIONS = ('fp32', 'bf16', 'fp16')
MEMORY_FORMATS = ('channels_last', 'contiguous')


# ---------------------------------------------------------------- the constants, checked before any measuring

def listed(value):
    """The comma-separated items of a list constant, stripped; empty items (a trailing comma) are dropped."""
    return [item.strip() for item in value.split(',') if item.strip()]


def chosen_among(name, value, valid, empty_means=None):
    """The items of --name=value, each one of valid and none twice (a repeated one would count twice in
    the table), or stop with one line naming the bad item and the valid form."""
    items = listed(value)
    form = f"one or more of {', '.join(valid)}, comma-separated"
    form += f", or --{name}= alone for {empty_means}" if empty_means else ''
    if not items and (empty_means is None or value.strip()):
        console.fail(f"--{name}={value} names none; choose {form}", 2)
    for item in items:
        if item not in valid:
            console.fail(f"--{name}={value}: {item!r} is not known; choose {form}", 2)
        if items.count(item) > 1:
            console.fail(f"--{name}={value} names {item} twice; name each once", 2)
    return items


def parse_layouts(value):
    """--layouts as [(processes, threads)], or stop with one line naming the bad layout."""
    form = "processes x threads as positive whole numbers, like 1x1,1x2,2x1"
    items = listed(value)
    if not items:
        console.fail(f"--layouts={value} names none; write {form}", 2)
    shapes = []
    for item in items:
        if not re.fullmatch(r'[1-9][0-9]*x[1-9][0-9]*', item):
            console.fail(f"--layouts={value}: {item!r} is not a layout; write {form}", 2)
        shape = tuple(int(n) for n in item.split('x'))
        if shape in shapes:
            console.fail(f"--layouts={value} names {item} twice; name each once", 2)
        shapes.append(shape)
    return shapes


def output_path():
    """Where the measurements go, checked before they are taken: a run of an hour must not end at the save."""
    path = os.path.join(REPO, output)
    safe_files.check_output_path('output', output, path, 'speed.json')
    return path


# ---------------------------------------------------------------- synthetic data in the real formats

def write_mnist(data_dir, n):
    """n random 28x28 digits and labels as MNIST's IDX files."""
    import gzip
    import struct
    raw = os.path.join(data_dir, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name, array in (('train-images-idx3-ubyte', torch.randint(0, 256, (n, 28, 28), generator=generator)),
                        ('train-labels-idx1-ubyte', torch.randint(0, 10, (n,), generator=generator))):
        array = array.to(torch.uint8)
        header = struct.pack('>HBB', 0, 0x08, array.dim()) + struct.pack(f'>{array.dim()}I', *array.shape)
        with gzip.open(os.path.join(raw, name + '.gz'), 'wb') as f:
            f.write(header + array.numpy().tobytes())


def write_faces(folder, n):
    """n random 64x64 JPEG faces, half in female/ and half in male/, as celeba_preprocess.py writes them."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        gender = ('female', 'male')[i % 2]
        os.makedirs(os.path.join(folder, gender), exist_ok=True)
        pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(os.path.join(folder, gender, f'{i:06d}.jpg'))


# ---------------------------------------------------------------- what is measured

def load_script(script):
    """A training script as a module (importing one has no side effects)."""
    import importlib
    return importlib.import_module(script.removesuffix('.py'))


def flops_per_image(script, width, batch):
    """FLOPs of one training step per image: G forward, D on real and fake, D's and G's backward passes."""
    from torch.utils.flop_counter import FlopCounterMode
    module = load_script(script)
    sized = {'d': width} if width and hasattr(module, 'd') else {}
    G, D = module.Generator(**sized), module.Discriminator(**sized)
    z = torch.randn(batch, module.z_dim)
    labels = [torch.randint(0, module.N_CLASSES, (batch,))] if hasattr(module, 'N_CLASSES') else []
    with FlopCounterMode(display=False) as counter:
        fake = G(z, *labels)
        (D(torch.randn_like(fake), *labels).sum() + D(fake.detach(), *labels).sum()).backward()
        D(fake, *labels).sum().backward()
    return counter.get_total_flops() / batch


def measure_peaks(dtype, device, n_threads):
    """(matmul, conv) GFLOP/s of this device in dtype: the best of several timed runs of each."""
    torch.set_num_threads(n_threads)
    a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
    conv = torch.nn.Conv2d(256, 512, 4, 2, 1).to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(128, 256, 16, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv_flops = 2 * 128 * 512 * 8 * 8 * 256 * 4 * 4

    def best_rate(work, flops):
        with torch.no_grad():
            work()
            times = []
            for _ in range(5):
                hardware.synchronize(device)
                start = time.perf_counter()
                work()
                hardware.synchronize(device)
                times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9
    return best_rate(lambda: a @ b, 2 * 2048 ** 3), best_rate(lambda: conv(x), conv_flops)


def run_script(script, data_dir, results_dir, precision, layout, memory_format, width, batch, device_name):
    """The script's own images per second over its second epoch, of all its processes."""
    module = load_script(script)
    args = [f'--data_dir={data_dir}', f'--results_dir={results_dir}', '--train_epoch=2', '--resume=false',
            f'--train_limit={batch * steps}', f'--batch_size={batch}', f'--precision={precision}',
            f'--device={device_name}']
    args += ['--quality_samples=0'] if hasattr(module, 'quality_samples') else []
    args += [f'--channels_last={memory_format == "channels_last"}'] if hasattr(module, 'channels_last') else []
    args += [f'--d={width}'] if width and hasattr(module, 'd') else []
    processes, n_threads = layout
    env = {**os.environ, 'OMP_NUM_THREADS': str(n_threads)}
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}']
    # '--' ends torchrun's options (it would take --d=8 for one of its own); a plain python run needs none.
    path = os.path.join(REPO, script)
    command = [*launcher, path, '--', *args] if processes > 1 else [sys.executable, path, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        console.fail(f"{script} {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1]}")
    with open(os.path.join(results_dir, f"{module.MODEL}_train_hist.json")) as f:
        return json.load(f)['epochs'][-1]['images_per_second']


def native_precisions(device):
    if device.type == 'cuda':
        return ['fp32', 'bf16', 'fp16'] if torch_compat.cuda_has_native_bf16() else ['fp32', 'fp16']
    return ['fp32', 'bf16']


def main():
    names = chosen_among('scripts', scripts, SCRIPTS)
    chosen = chosen_among('precisions', precisions, PRECISIONS, empty_means="those the device runs natively")
    shapes = parse_layouts(layouts)
    formats = listed(memory_formats)
    if not formats or not set(formats) <= set(MEMORY_FORMATS) or len(set(formats)) < len(formats):
        console.fail(f"--memory_formats={memory_formats}: use channels_last, contiguous or both, comma-separated", 2)
    path = None if smoke else output_path()
    run_device = hardware.pick_device(device)
    native = native_precisions(run_device)
    if run_device.type == 'cuda' and 'bf16' in chosen and 'bf16' not in native:
        console.fail(f"--precisions={precisions}: this GPU ({describe(run_device)}) has no bf16; "
                     f"choose among {', '.join(native)}", 2)
    chosen = chosen or native
    shapes = [(1, 1)] if run_device.type != 'cpu' else shapes  # one GPU
    formats_of = {s: formats if hasattr(load_script(s), 'channels_last') else ['-'] for s in names}  # MLPs: none
    width, batch, rounds = (8, 16, 1) if smoke else (None, 128, repeats)
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}

    print(f"device: {run_device} ({describe(run_device)}); torch {torch.__version__}", flush=True)
    peaks = {(p, n): measure_peaks(dtypes[p], run_device, n) for p in chosen for n in {k * t for k, t in shapes}}
    flops = {s: flops_per_image(s, width, batch) for s in names}
    rates = {(s, n, m, p): [] for s in names for n in shapes for m in formats_of[s] for p in chosen}
    with tempfile.TemporaryDirectory() as work:
        data = {'mnist': os.path.join(work, 'mnist'), 'celeba': os.path.join(work, 'faces')}
        write_mnist(data['mnist'], batch * steps)
        write_faces(data['celeba'], batch * steps)
        for round_ in range(rounds):
            for s in names:
                for n in shapes:
                    for m in formats_of[s]:
                        for p in chosen:
                            rate = run_script(s, data[s.split('_')[0]], os.path.join(work, 'out'), p, n, m, width,
                                              batch, str(run_device))
                            rates[s, n, m, p].append(rate)
                            print(f"round {round_ + 1}/{rounds}: {s}, {n[0]}x{n[1]}, {m}, {p}: {rate:.1f} img/s",
                                  flush=True)
    table = report(names, shapes, formats_of, chosen, rates, flops, peaks)
    print(table)
    if not smoke:
        safe_files.save_json({'device': describe(run_device), 'torch': torch.__version__, 'batch': batch, 'steps': steps,
                          'rates': {f"{s} {n[0]}x{n[1]} {m} {p}": r for (s, n, m, p), r in rates.items()},
                          'flops_per_image': flops,
                          'peaks_gflops': {f"{p} {n}": {'matmul': m, 'conv': c} for (p, n), (m, c) in peaks.items()},
                          'table': table}, path)


def describe(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'cpu':
        model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
                     'unknown CPU') if os.path.exists('/proc/cpuinfo') else 'unknown CPU'
        return f"{model}, native bf16: {hardware.cpu_bf16_instructions() or 'none'}"
    return device.type


def report(names, shapes, formats_of, chosen, rates, flops, peaks):
    """A markdown table: one row per script, layout (processes x threads), memory format and precision."""
    rows = ["| experiment | processes x threads | memory format | precision | img/s (median, min-max) | vs fp32 "
            "| s/epoch | GFLOP/img | peak GFLOP/s (matmul, conv) | share of peak |", "|" + "---|" * 10]
    for s in names:
        conv = formats_of[s] != ['-']
        for n in shapes:
            for m in formats_of[s]:
                fp32 = statistics.median(rates[s, n, m, 'fp32']) if 'fp32' in chosen else None
                for p in chosen:
                    got = rates[s, n, m, p]
                    median = statistics.median(got)
                    matmul, conv_peak = peaks[p, n[0] * n[1]]
                    peak = conv_peak if conv else matmul
                    ratio = f"{median / fp32:.2f}x" if fp32 else ''
                    epoch = IMAGES_PER_EPOCH[s.split('_')[0]] / median
                    rows.append(f"| {s} | {n[0]}x{n[1]} | {m} | {p} | {median:.1f} ({min(got):.1f}-{max(got):.1f}) "
                                f"| {ratio} | {epoch:,.0f} | {flops[s] / 1e9:.2f} | {matmul:.0f}, {conv_peak:.0f} "
                                f"| {flops[s] * median / 1e9 / peak:.0%} of {'conv' if conv else 'matmul'} |")
    return '\n'.join(rows)


if __name__ == '__main__':
    config.configure(globals())
    main()
