"""The collection's own CUDA paths, run against the installed torch with the GPU mocked (CI has none): each
torch call they make is checked against that torch's real signature, so a keyword or function missing on
one end of the supported range (torch 2.4 to the newest) fails here, not on a user's GPU."""
import inspect
import os

import pytest
import torch

from plumbing import data, hardware, results_folder, torchrun


def checked(real, calls):
    """A stand-in for torch function real that records its arguments after binding them to real's own
    signature: a call this torch would refuse raises TypeError here too."""
    signature = inspect.signature(real)

    def stand_in(*args, **kwargs):
        signature.bind(*args, **kwargs)
        calls.append((args, kwargs))
    return stand_in


@pytest.fixture
def a_gpu(monkeypatch):
    """torch as it looks with one CUDA GPU of compute capability 8.0, as far as this code asks."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Some GPU')
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)


def test_choosing_a_gpu_turns_on_tf32_and_cudnn_s_benchmark(a_gpu, monkeypatch):
    real_empty = torch.empty
    monkeypatch.setattr(torch, 'empty', lambda *size, device=None, **kw: real_empty(*size, **kw))  # the probe
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    spelled_new = hasattr(torch.backends.cuda.matmul, 'fp32_precision')
    before = ((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) if spelled_new
              else (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    try:
        assert hardware.pick_device('cuda') == torch.device('cuda')
        assert torch.backends.cudnn.benchmark is True
        if spelled_new:
            assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == \
                ('tf32', 'tf32')
        else:
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        if spelled_new:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_auto_takes_bf16_on_a_gpu_that_has_it(a_gpu):
    assert hardware.choose_precision('auto', torch.device('cuda')) == (torch.bfloat16, 'this GPU (Some GPU) supports bf16')


def test_a_batch_sliced_on_the_host_goes_to_the_gpu_pinned_and_without_waiting(monkeypatch):
    pinned, copies = [], []
    real_pin, real_to = torch.Tensor.pin_memory, torch.Tensor.to

    def pin_memory(self, *args, **kwargs):
        pinned.append((self.shape, args, kwargs))
        return self

    def to(self, *args, **kwargs):  # the same arguments, tried for real on the CPU: this torch must take them
        copies.append((args, kwargs))
        return real_to(self, 'cpu', *args[1:], **kwargs)
    monkeypatch.setattr(torch.Tensor, 'pin_memory', pin_memory)
    monkeypatch.setattr(torch.Tensor, 'to', to)
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    batch = data.real_batch(images, torch.tensor([0, 3]), torch.device('cuda'), torch.channels_last)
    assert pinned == [(torch.Size([2, 1, 4, 4]), (), {})] and callable(real_pin)
    assert copies[0] == ((torch.device('cuda'),), {'non_blocking': True})
    assert batch.shape == (2, 1, 4, 4) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_under_torchrun_on_gpus_each_process_joins_nccl_on_its_local_gpu(a_gpu, monkeypatch):
    joined, devices = [], []
    for name, value in {'WORLD_SIZE': '2', 'RANK': '1', 'LOCAL_RANK': '1', 'MASTER_ADDR': '127.0.0.1',
                        'MASTER_PORT': '29500'}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, 'init_process_group',
                        checked(torch.distributed.init_process_group, joined))
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: devices.append(device))
    monkeypatch.setattr(torchrun, 'pick_device', lambda choice, local_rank=None: torch.device('cuda', local_rank))
    monkeypatch.setattr(torchrun.atexit, 'register', lambda function: None)
    monkeypatch.setattr(torchrun.sys, 'stdout', torchrun.sys.stdout)  # rank 1 sends its stdout to os.devnull
    world = torchrun.World('cuda', batch_size=8, sync_batchnorm=True)
    assert world.device == torch.device('cuda', 1) and devices == [torch.device('cuda', 1)]
    (args, kwargs), = joined
    assert args == ('nccl',) and kwargs['device_id'] == torch.device('cuda', 1)
    assert kwargs['timeout'] == torchrun.PROCESS_GROUP_TIMEOUT


def test_on_gpus_batchnorm_can_be_synchronised_and_ddp_takes_the_gpu(monkeypatch):
    wrapped = []
    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel',
                        checked(torch.nn.parallel.DistributedDataParallel, wrapped))
    world = torchrun.World.__new__(torchrun.World)
    world.size, world.sync_batchnorm, world.device = 2, True, torch.device('cuda', 0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    world.parallel(model)
    (args, kwargs), = wrapped
    assert isinstance(args[0][1], torch.nn.SyncBatchNorm)
    assert kwargs['device_ids'] == [torch.device('cuda', 0)]
    assert kwargs == {'device_ids': [torch.device('cuda', 0)], **torchrun.torch_compat.ddp_keeps_buffers_local()}


def test_the_checkpoint_keeps_and_restores_the_gpu_s_random_state(a_gpu, monkeypatch, tmp_path):
    cuda_state = torch.ByteTensor(list(range(16)))
    restored = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': cuda_state.clone())
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append(state))
    config = {'results_dir': str(tmp_path), 'resume': True, 'seed': 0, 'train_epoch': 2}
    G = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(G.parameters())
    first = results_folder.RunFolder('M', config, models={'generator': G}, optimizers={'generator': optimizer},
                             exports={'generator': G})
    first.start(lambda: {'z': torch.zeros(2, 2)})
    first.end_epoch(1, {'loss_d': 1.0, 'loss_g': 1.0}, 1.0, 2, {})
    first.finish()
    state = torch.load(os.path.join(tmp_path, 'checkpoint.pt'), weights_only=True)
    assert torch.equal(state['rng'][0]['cuda'], cuda_state)
    again = results_folder.RunFolder('M', config, models={'generator': G}, optimizers={'generator': optimizer},
                             exports={'generator': G})
    assert again.start(lambda: {'z': torch.zeros(2, 2)}) == 2
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
