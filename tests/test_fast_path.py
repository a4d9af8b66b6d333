"""The fast path (docs/speed.md): the precision choice, mixed-precision runs that train and resume, channels_last,
the generators' output under bf16. Its CUDA paths, with the GPU mocked: test_gpu_paths.py; the benchmark:
test_tools.py."""
import json
import math

import pytest
import torch

from plumbing import data, hardware
from conftest import run_script

CPU, CUDA = torch.device('cpu'), torch.device('cuda')


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has these native bf16 instructions (None: none)."""
    def pretend(instructions):
        monkeypatch.setattr(hardware, 'cpu_bf16_instructions', lambda: instructions)
    return pretend


@pytest.fixture
def gpu_with(monkeypatch):
    """Pretend to be on a GPU that has, or has not, bf16."""
    def pretend(has_bf16):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Some GPU')
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: has_bf16)
    return pretend


@pytest.mark.parametrize('instructions', ['AMX', 'AVX512_BF16'])
def test_auto_picks_bf16_on_a_cpu_with_native_bf16_and_says_why(cpu_with, instructions):
    cpu_with(instructions)
    assert hardware.choose_precision('auto', CPU) == (torch.bfloat16, f"this CPU has {instructions}")


def test_auto_stays_fp32_for_a_model_whose_training_bf16_changed(cpu_with, gpu_with):
    cpu_with('AMX')
    dtype, why = hardware.choose_precision('auto', CPU, bf16_by_default=False)
    assert dtype is None and '--precision=bf16' in why
    assert hardware.choose_precision('bf16', CPU, bf16_by_default=False)[0] is torch.bfloat16  # asked for: taken
    gpu_with(True)
    assert hardware.choose_precision('auto', CUDA, bf16_by_default=False)[0] is None


@pytest.mark.parametrize('script, takes_bf16', [('mnist_gan.py', False), ('mnist_cgan.py', False),
                                                ('mnist_dcgan.py', True), ('mnist_cdcgan.py', True),
                                                ('celeba_dcgan.py', True), ('celeba_cdcgan.py', True)])
def test_auto_takes_bf16_for_the_conv_models_and_keeps_fp32_for_the_mlps(cpu_with, script, takes_bf16):
    """Measured (docs/results.md, bf16 against fp32): bf16 collapsed the cGAN, and kept the cDCGAN within fp32's
    seed spread."""
    import importlib
    cpu_with('AMX')
    dtype, _ = hardware.choose_precision('auto', CPU, importlib.import_module(script[:-3]).BF16_BY_DEFAULT)
    assert dtype is (torch.bfloat16 if takes_bf16 else None)


def test_auto_stays_fp32_on_a_cpu_without_native_bf16(cpu_with):
    cpu_with(None)
    dtype, why = hardware.choose_precision('auto', CPU)
    assert dtype is None and 'no native bf16' in why and 'slower' in why


def test_asked_for_precisions_are_taken_as_asked_and_a_slow_choice_says_so(cpu_with):
    cpu_with(None)
    assert hardware.choose_precision('fp32', CPU) == (None, 'as asked')
    dtype, why = hardware.choose_precision('bf16', CPU)
    assert dtype is torch.bfloat16 and 'slower than fp32' in why
    dtype, why = hardware.choose_precision('fp16', CPU)
    assert dtype is torch.float16 and 'slow' in why


def test_the_cpu_instructions_are_read_from_torch(monkeypatch):
    for amx, avx512_bf16, expected in ((True, True, 'AMX'), (False, True, 'AVX512_BF16'), (False, False, None)):
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda b=avx512_bf16: b, raising=False)
        assert hardware.cpu_bf16_instructions() == expected


def test_auto_picks_bf16_on_a_gpu_that_has_it_and_fp32_on_one_that_has_not(gpu_with):
    gpu_with(True)
    assert hardware.choose_precision('auto', CUDA) == (torch.bfloat16, 'this GPU (Some GPU) supports bf16')
    gpu_with(False)
    dtype, why = hardware.choose_precision('auto', CUDA)
    assert dtype is None and 'has no bf16' in why
    assert hardware.choose_precision('fp16', CUDA) == (torch.float16, 'as asked')


def test_bf16_on_a_gpu_without_it_is_one_line_and_status_2(gpu_with, capsys):
    gpu_with(False)
    with pytest.raises(SystemExit) as stop:
        hardware.choose_precision('bf16', CUDA)
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: --precision=bf16: this GPU (Some GPU) has no bf16; "
                                       "use --precision=fp16 or auto\n")


def test_auto_stays_fp32_on_apple_mps():
    dtype, why = hardware.choose_precision('auto', torch.device('mps'))
    assert dtype is None and 'mps' in why


def test_an_unknown_precision_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as stop:
        hardware.choose_precision('fp8', CPU)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: --precision=fp8: choose one of auto, bf16, fp16, fp32\n"


@pytest.mark.parametrize('choice, dtype', [('fp32', None), ('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_the_precision_chosen_is_the_autocast_dtype_and_the_run_says_it(choice, dtype, capsys):
    assert hardware.autocast_dtype(choice, CPU) is dtype
    assert capsys.readouterr().out.startswith(f"cpu, {choice}")


def test_a_precision_a_script_cannot_use_is_one_line(mnist_dir, tmp_path):
    result = run_script('mnist_cgan.py', f'--data_dir={mnist_dir}', f'--results_dir={tmp_path / "out"}',
                        '--precision=fp8', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --precision=fp8: choose one of auto, bf16, fp16, fp32\n"
    result = run_script('mnist_gan.py', '--channels_last=true', cwd=tmp_path)  # an MLP has no memory format
    assert result.returncode == 2 and result.stderr.startswith("error: unknown constant 'channels_last'")


# ---------------------------------------------------------------- tiny mixed-precision runs

TINY = {'mnist_gan.py': ('MNIST_GAN', []), 'mnist_cdcgan.py': ('MNIST_cDCGAN', ['--d=8'])}


def tiny_run(script, mnist_dir, out, precision, epochs, *extra):
    model, args = TINY[script]
    result = run_script(script, f'--data_dir={mnist_dir}', f'--results_dir={out}', f'--train_epoch={epochs}',
                        '--train_limit=128', '--batch_size=32', '--quality_samples=100', f'--precision={precision}',
                        *args, *extra, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    with open(out / f'{model}_train_hist.json') as f:
        return result.stdout, json.load(f)['epochs']


@pytest.mark.parametrize('script', TINY)
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_a_mixed_precision_run_trains_resumes_and_stays_finite(mnist_dir, tmp_path, script, precision):
    out = tmp_path / 'resumed'
    stdout, _ = tiny_run(script, mnist_dir, out, precision, 1)
    assert stdout.startswith(f"cpu, {precision} autocast: ")
    checkpoint = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert bool(checkpoint['scaler']) == (precision == 'fp16')
    if precision == 'fp16':
        # As if the scale had backed off after overflows: the resumed run must go on from it, not from 65536.
        checkpoint['scaler']['scale'] = 128.0
        torch.save(checkpoint, out / 'checkpoint.pt')
    stdout, resumed = tiny_run(script, mnist_dir, out, precision, 2)
    assert 'resuming after epoch 1' in stdout
    assert all(math.isfinite(value) for epoch in resumed for value in epoch.values())
    assert resumed[1]['loss_d'] != resumed[0]['loss_d']  # it trained on
    if precision == 'fp16':
        assert torch.load(out / 'checkpoint.pt', weights_only=True)['scaler']['scale'] == 128.0
    generator = torch.load(out / f'{TINY[script][0]}_generator.pt', weights_only=True)
    weights = [w for w in generator.values() if w.is_floating_point()]  # not BatchNorm's step counters
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights)


def test_bf16_resumed_equals_uninterrupted(mnist_dir, tmp_path):
    _, straight = tiny_run('mnist_cdcgan.py', mnist_dir, tmp_path / 'straight', 'bf16', 2)
    tiny_run('mnist_cdcgan.py', mnist_dir, tmp_path / 'resumed', 'bf16', 1)
    _, resumed = tiny_run('mnist_cdcgan.py', mnist_dir, tmp_path / 'resumed', 'bf16', 2)
    losses = ('loss_d', 'loss_g', 'd_real', 'd_fake', 'fid')
    assert [[e[k] for k in losses] for e in resumed] == [[e[k] for k in losses] for e in straight]


# ---------------------------------------------------------------- channels_last

CONV_MODELS = [('mnist_dcgan.py', False), ('mnist_cdcgan.py', True), ('celeba_dcgan.py', False),
               ('celeba_cdcgan.py', True)]


@pytest.mark.parametrize('script, conditional', CONV_MODELS)
def test_channels_last_models_give_the_same_outputs_as_contiguous_ones(script, conditional):
    import importlib
    module = importlib.import_module(script.removesuffix('.py'))
    torch.manual_seed(0)
    G, D = module.Generator(z_dim=100, d=8), module.Discriminator(d=8)
    labels = [torch.tensor([0, 1, 1, 0])] if conditional else []
    z = torch.randn(4, 100)
    with torch.no_grad():
        contiguous = G(z, *labels), D(G(z, *labels), *labels)
        G_cl, D_cl = (m.to(memory_format=torch.channels_last) for m in (G, D))
        images = G_cl(z, *labels)
        channels_last = images, D_cl(images.contiguous(memory_format=torch.channels_last), *labels)
    assert images.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(contiguous, channels_last):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_real_batch_is_in_the_models_memory_format_and_range():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    index = torch.tensor([3, 1, 4])
    batch = data.real_batch(images, index, CPU, torch.channels_last)
    assert batch.is_contiguous(memory_format=torch.channels_last) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, images[index].float() / 127.5 - 1)


# ---------------------------------------------------------------- the generators' output under bf16

GENERATORS = [('mnist_gan.py', {}, False), ('mnist_cgan.py', {}, True)] + [
    (script, {'d': 8}, conditional) for script, conditional in CONV_MODELS]


@pytest.mark.parametrize('script, sized, conditional', GENERATORS, ids=[g[0] for g in GENERATORS])
def test_under_bf16_a_saturated_pixel_still_gets_a_gradient(script, sized, conditional):
    """bf16's tanh rounds to exactly 1 beyond x = 3.5 and its gradient there is exactly 0: a pixel pushed
    that far would stay white for the rest of the run (the speckled digits of a bf16 cGAN)."""
    import importlib
    module = importlib.import_module(script.removesuffix('.py'))
    torch.manual_seed(0)
    G = module.Generator(**sized)
    last = [m for m in G.modules() if isinstance(m, (torch.nn.Linear, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.bias.fill_(6.0)  # every pixel's tanh input near 6: tanh 0.99999 in fp32, 1.0 in bf16
    labels = [torch.tensor([0, 1, 1, 0])] if conditional else []
    with torch.autocast('cpu', dtype=torch.bfloat16):
        images = G(torch.randn(4, G.z_dim), *labels)
    assert images.dtype == torch.float32
    assert (images < 1).all()  # not rounded onto the saturated value
    images.sum().backward()
    assert (last.bias.grad > 0).all()
