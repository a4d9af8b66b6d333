"""plumbing.torch_compat against the installed torch, with the GPU mocked where the path needs one: a torch
call that is missing or spelt otherwise on this end of the supported range (2.4 to the newest) fails here.

The CUDA paths without a helper (NCCL set-up with device_id, SyncBatchNorm, pinned non-blocking copies, CUDA
random state in the checkpoint) are checked here too, against torch itself: CI has no GPU to run them."""
import inspect
import types
import warnings

import pytest
import torch

from plumbing import torch_compat


@pytest.fixture
def tf32_flags():
    """The TF32 flags as they were before the test, restored after it, in whichever spelling this torch has."""
    new = hasattr(torch.backends.cuda.matmul, 'fp32_precision')
    places = ((torch.backends.cuda.matmul, 'fp32_precision'), (torch.backends.cudnn.conv, 'fp32_precision')) \
        if new else ((torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'allow_tf32'))
    before = [getattr(owner, name) for owner, name in places]
    yield new
    for (owner, name), value in zip(places, before):
        setattr(owner, name, value)


def test_use_tf32_turns_on_tf32_for_matmuls_and_convolutions_and_reads_back(tf32_flags):
    if tf32_flags:  # the spelling of torch 2.9 on
        torch.backends.cuda.matmul.fp32_precision = 'ieee'
        torch.backends.cudnn.conv.fp32_precision = 'ieee'
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a deprecated spelling warns: the helper must not pick it
        torch_compat.use_tf32()
    if tf32_flags:
        assert torch.backends.cuda.matmul.fp32_precision == 'tf32'
        assert torch.backends.cudnn.conv.fp32_precision == 'tf32'
    else:
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True


def test_use_tf32_takes_the_new_spelling_wherever_torch_has_it(tf32_flags):
    """Where both spellings exist the old one must stay untouched: mixing them makes torch raise."""
    torch_compat.use_tf32()
    if tf32_flags:
        with pytest.raises(RuntimeError, match='mix of the legacy and new APIs'):
            torch.backends.cuda.matmul.allow_tf32  # noqa: B018  (reading it is the check)
    else:
        assert not hasattr(torch.backends.cudnn, 'conv')


# ---------------------------------------------------------------- the CPU's bf16 instructions

FLAGS = {'AMX': 'fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8', 'AVX512_BF16': 'fpu avx512f avx512_bf16',
         None: 'fpu sse2 avx2 avx512f'}


def cpuinfo(tmp_path, flags):
    path = tmp_path / 'cpuinfo'
    path.write_text(f'processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n'
                    f'processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {flags}\n')
    return str(path)


@pytest.mark.parametrize('expected', list(FLAGS))
def test_without_torch_s_answer_the_cpu_instructions_come_from_linux_s_flags(monkeypatch, tmp_path, expected):
    for check in ('_is_amx_tile_supported', '_is_avx512_bf16_supported'):
        monkeypatch.delattr(torch.cpu, check, raising=False)  # as in torch 2.4
    monkeypatch.setattr(torch_compat, 'CPUINFO', cpuinfo(tmp_path, FLAGS[expected]))
    assert torch_compat.cpu_bf16_instructions() == expected


def test_without_torch_s_answer_or_a_cpuinfo_file_the_answer_is_none(monkeypatch, tmp_path):
    for check in ('_is_amx_tile_supported', '_is_avx512_bf16_supported'):
        monkeypatch.delattr(torch.cpu, check, raising=False)
    monkeypatch.setattr(torch_compat, 'CPUINFO', str(tmp_path / 'none'))  # macOS, Windows
    assert torch_compat.cpu_bf16_instructions() is None


def test_where_torch_can_tell_its_answer_is_taken(monkeypatch, tmp_path):
    if not hasattr(torch.cpu, '_is_amx_tile_supported'):
        pytest.skip('this torch cannot tell (torch 2.4): Linux\'s flags answer, tested above')
    monkeypatch.setattr(torch_compat, 'CPUINFO', cpuinfo(tmp_path, FLAGS['AMX']))  # torch's answer wins over it
    for amx, avx512_bf16, expected in ((True, True, 'AMX'), (False, True, 'AVX512_BF16'), (False, False, None)):
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda b=avx512_bf16: b)
        assert torch_compat.cpu_bf16_instructions() == expected


def test_on_this_machine_torch_and_linux_agree():
    """The true answer on both ends: this torch's own checks (where it has them) and /proc/cpuinfo."""
    flags = torch_compat.cpu_flags()
    if not flags:
        pytest.skip('no /proc/cpuinfo flags here')
    from_linux = 'AMX' if 'amx_bf16' in flags else 'AVX512_BF16' if 'avx512_bf16' in flags else None
    assert torch_compat.cpu_bf16_instructions() == from_linux


# ---------------------------------------------------------------- a GPU, mocked

@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of compute capability (major, 0), as torch.cuda sees it, for torch's own code to read."""
    def pretend(major):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
        monkeypatch.setattr(torch.cuda, 'get_device_properties',
                            lambda device=None: types.SimpleNamespace(major=major, minor=0, name='Some GPU'))
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (major, 0))
        monkeypatch.setattr(torch.version, 'cuda', '12.1')  # a CUDA build, as the wheel a GPU user has
        monkeypatch.setattr(torch.version, 'hip', None)
    return pretend


@pytest.mark.parametrize('major, native', [(7, False), (8, True), (9, True)])
def test_a_gpu_has_native_bf16_from_compute_capability_8(gpu, major, native):
    """torch's is_bf16_supported itself runs, on the mocked device: a keyword it lacks would fail here."""
    gpu(major)
    assert torch_compat.cuda_has_native_bf16() is native


def test_without_a_gpu_there_is_no_native_bf16_and_no_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert torch_compat.cuda_has_native_bf16() is False


def test_is_bf16_supported_takes_including_emulation():
    assert 'including_emulation' in inspect.signature(torch.cuda.is_bf16_supported).parameters


# ---------------------------------------------------------------- several processes

@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, in this process: DistributedDataParallel can be made on the CPU."""
    store = torch.distributed.FileStore(str(tmp_path / 'store'), 1)
    torch.distributed.init_process_group('gloo', store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


class BatchNormed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.linear(x))


def test_ddp_takes_the_keyword_and_stops_the_per_forward_buffer_broadcast(one_process_group):
    keyword = torch_compat.ddp_keeps_buffers_local()
    assert keyword in ({'forward_sync_buffers': False}, {'broadcast_buffers': False})
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # torch 2.13 on warns of broadcast_buffers: the helper must not pick it there
        model = torch.nn.parallel.DistributedDataParallel(BatchNormed(), **keyword)
    assert model.will_sync_module_buffers() is False
    # D's step: two forwards, then one backward of both
    real, fake = model(torch.randn(8, 4)), model(torch.randn(8, 4))
    (real.square().mean() + fake.square().mean()).backward()
    assert model.module.linear.weight.grad is not None


def test_nccl_set_up_takes_device_id_and_syncbatchnorm_converts():
    """World's NCCL start passes device_id; --sync_batchnorm converts D's BatchNorm before DDP wraps it."""
    assert 'device_id' in inspect.signature(torch.distributed.init_process_group).parameters
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    model[1].running_mean.fill_(0.5)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], torch.nn.SyncBatchNorm) and torch.equal(converted[1].running_mean,
                                                                             torch.full((2,), 0.5))


def test_a_pinned_non_blocking_copy_is_spelt_as_this_torch_takes_it():
    """real_batch's host-to-GPU copy: Tensor.pin_memory() and to(device, non_blocking=True)."""
    batch = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    assert callable(batch.pin_memory)
    assert batch.to(torch.device('cpu'), non_blocking=True).dtype == torch.uint8


def test_a_checkpoint_with_cuda_random_states_loads_as_weights_only(tmp_path):
    """The checkpoint's rng entry: per process, the CPU's and CUDA's generator states (uint8 tensors, as
    torch.cuda.get_rng_state returns), next to the run's plain Python values; weights_only must read it all."""
    assert callable(torch.cuda.get_rng_state) and callable(torch.cuda.set_rng_state)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # the dtype and device torch.cuda.get_rng_state gives
    state = {'epoch': 2, 'config': {'lr': 0.0002, 'd': 8, 'precision': 'bf16', 'compile': False},
             'history': [{'epoch': 1, 'loss_d': 1.25, 'fid': 31.5}],
             'rng': [{'cpu': torch.get_rng_state(), 'cuda': cuda_state}, {'cpu': torch.get_rng_state(), 'cuda': None}],
             'scaler': torch.amp.GradScaler('cpu', enabled=True).state_dict()}
    torch.save(state, tmp_path / 'checkpoint.pt')
    loaded = torch.load(tmp_path / 'checkpoint.pt', map_location='cpu', weights_only=True)
    assert torch.equal(loaded['rng'][0]['cuda'], cuda_state) and loaded['rng'][1]['cuda'] is None
    assert loaded['config'] == state['config'] and loaded['history'] == state['history']
    assert loaded['scaler'] == state['scaler']
