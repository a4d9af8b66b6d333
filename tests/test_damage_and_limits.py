"""Damage and limits (issue #19): checksums of what the scripts read back, SIGTERM and Ctrl-C while a
checkpoint loads, too few MNIST images, memory running out, and torchrun's variables without torchrun."""
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, REPO, assert_refused, dead_pid, folder_state, tiny, write_faces, write_idx
from plumbing import safe_files
from plumbing.results_folder import RunFolder
from plumbing.interrupts import Stopped
from plumbing.run import Run

ENV = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def damage(path, offset, data):
    content = bytearray(path.read_bytes())
    content[offset:offset + len(data)] = data
    path.unlink()  # replaced, not written in place: the copy shares its files with the trained folder
    path.write_bytes(bytes(content))


def test_flipped_bytes_in_the_weights_are_found_before_sampling(work, script_server, mnist_dir):
    best = work / 'out' / 'MNIST_GAN_generator_best.pt'
    damage(best, best.stat().st_size // 2, bytes(64))
    result = script_server('mnist_gan.py', [*tiny(mnist_dir, 'out', 1), '--generate=4'], work)
    assert result['status'] == 1
    assert result['stderr'].startswith('error: out/MNIST_GAN_generator_best.pt is damaged: its checksums do not match')
    assert result['stderr'].count('\n') == 1 and not (work / 'out' / 'MNIST_GAN_generated.png').exists()


def test_an_overwritten_stretch_of_the_checkpoint_is_found_before_resuming(work, script_server, mnist_dir):
    checkpoint = work / 'out' / 'checkpoint.pt'
    damage(checkpoint, checkpoint.stat().st_size // 3, os.urandom(4096))
    before = folder_state(work)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 1 and 'Traceback' not in result['stderr']
    assert result['stderr'].startswith('error: out/checkpoint.pt is damaged:') and result['stderr'].count('\n') == 1
    assert folder_state(work) == before


def test_a_sigterm_while_a_file_loads_is_no_damage(tmp_path, monkeypatch):
    path = tmp_path / 'weights.pt'
    torch.save({'w': torch.ones(3)}, path)

    def stopped(*args, **kwargs):
        raise Stopped()
    monkeypatch.setattr(torch, 'load', stopped)
    with pytest.raises(Stopped):
        safe_files.load_torch(path, 'retrain')


def test_an_interruption_while_resuming_says_the_checkpoint_is_as_it_was(tmp_path, capsys):
    run = RunFolder('M', {'results_dir': str(tmp_path), 'resume': True}, models={}, optimizers={}, exports={})
    run.resuming = True
    with pytest.raises(SystemExit) as stop:
        run.interrupted(KeyboardInterrupt())
    assert stop.value.code == 130
    assert capsys.readouterr().err == (f'error: interrupted; it was resuming, and {tmp_path}/checkpoint.pt is as it '
                                       f'was. Run the same command again to resume\n')


@pytest.mark.parametrize('count', [0, 1])
def test_an_mnist_file_of_too_few_images_is_one_line_before_training(mnist_dir, tmp_path, script_server, count):
    data = tmp_path / 'data'
    shutil.copytree(mnist_dir, data)
    raw = data / 'MNIST' / 'raw'
    images, labels = torch.zeros(count, 28, 28, dtype=torch.uint8), torch.zeros(count, dtype=torch.uint8)
    write_idx(raw / 't10k-images-idx3-ubyte.gz', images)
    write_idx(raw / 't10k-labels-idx1-ubyte.gz', labels)
    assert_refused(script_server('mnist_gan.py', tiny(data, 'out', 1), tmp_path), 1,
                   f'{raw}/t10k-images-idx3-ubyte.gz holds {count} image(s), too few to train or measure with; '
                   f'replace it with a good copy, or delete it to download MNIST again')
    assert not (tmp_path / 'out' / 'checkpoint.pt').exists()


class FakeRun(Run):
    def __init__(self, config, folder=None):
        self.config, self.folder, self.device = config, folder, torch.device('cpu')


@pytest.mark.parametrize('error, cause', [
    (RuntimeError('[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can\'t allocate memory: you '
                  'tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)'),
     'it tried to allocate 536870912 bytes more'),
    (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total)'),
     'it tried to allocate 20.00 MiB more'),
    (MemoryError(), 'MemoryError')])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, capsys, error, cause):
    with pytest.raises(SystemExit) as stop:
        FakeRun({'batch_size': 512, 'd': 64})._stop_with_one_line(error)
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: out of memory on cpu ({cause}); lower --batch_size (now 512) or --d '
                                       f'(now 64), or free some memory, and run again\n')
    folder = RunFolder('M', {'results_dir': str(tmp_path), 'resume': True}, models={}, optimizers={}, exports={})
    folder.saved_epoch = 2
    with pytest.raises(SystemExit):
        FakeRun({'batch_size': 512}, folder)._stop_with_one_line(error)
    assert capsys.readouterr().err == (f'error: out of memory on cpu ({cause}); {tmp_path}/checkpoint.pt holds epoch '
                                       f'2: free some memory and run the same command again to resume, or lower '
                                       f'--batch_size (now 512) with --resume=false to start afresh\n')


def test_a_bug_is_no_memory_trouble_and_keeps_its_traceback(capsys):
    FakeRun({'batch_size': 512})._stop_with_one_line(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    assert capsys.readouterr().err == ''  # nothing said: the caller re-raises it whole


def test_a_run_out_of_memory_stops_with_one_line(mnist_dir, tmp_path):
    limit = 4 * 2 ** 30  # address space: torch and torchvision load within it; at d = 1024 a layer's weights are 2 GiB

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    probe = subprocess.run([sys.executable, '-c', 'import torch, torchvision.transforms.functional'],
                           preexec_fn=limited, env=ENV, capture_output=True)
    if probe.returncode:
        pytest.skip('torch does not load within the limit here')
    done = subprocess.run([sys.executable, str(REPO / 'mnist_dcgan.py'), f'--data_dir={mnist_dir}', '--results_dir=out',
                           '--train_epoch=1', '--batch_size=32', '--d=1024', '--quality_samples=0',
                           '--precision=fp32'],
                          cwd=tmp_path, preexec_fn=limited, env=ENV, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (1, 'error: out of memory on cpu (it tried to allocate 2147483648 bytes '
                                                 'more); lower --batch_size (now 32) or --d (now 1024), or free some '
                                                 'memory, and run again\n')


@pytest.mark.parametrize('variables, line', [
    ({'WORLD_SIZE': '2', 'RANK': '1'}, 'WORLD_SIZE=2 is set, but not MASTER_ADDR and MASTER_PORT: start the script '
     'with torchrun (python -m torch.distributed.run --nproc_per_node=2 ...), or unset RANK, WORLD_SIZE and '
     'LOCAL_RANK to run one process'),
    ({'RANK': '1'}, 'RANK=1 does not fit WORLD_SIZE=1: start the script with torchrun, or unset RANK, WORLD_SIZE and '
     'LOCAL_RANK to run one process'),
    ({'WORLD_SIZE': 'two'}, "WORLD_SIZE='two' is not a process number: start the script with torchrun, or unset "
     "RANK, WORLD_SIZE and LOCAL_RANK to run one process")])
def test_torchrun_s_variables_left_set_without_torchrun_are_one_line(mnist_dir, tmp_path, variables, line):
    done = subprocess.run([sys.executable, str(REPO / 'mnist_gan.py'), *tiny(mnist_dir, 'out', 1)], cwd=tmp_path,
                          env={**ENV, **variables}, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, f'error: {line}\n')
    assert not (tmp_path / 'out').exists()


def test_a_zeroed_stretch_of_the_celeba_cache_is_decoded_again(tmp_path, capsys):
    from plumbing import celeba
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    images, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    original = images.clone()
    cache = tmp_path / 'faces.u8'
    content = bytearray(cache.read_bytes())
    content[len(content) // 2:] = bytes(len(content) - len(content) // 2)
    cache.unlink()
    cache.write_bytes(bytes(content))
    capsys.readouterr()
    again, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert f'{cache} does not match its checksum (damaged, or made by an older version): decoding it again' in \
        capsys.readouterr().out
    assert torch.equal(again, original)


def test_a_run_is_pinned_to_the_classifier_that_scores_it(work, script_server, mnist_dir):
    from plumbing.mnist_quality import DEFAULT_WEIGHTS, weights_digest
    shipped = weights_digest(DEFAULT_WEIGHTS)
    record = json.loads((work / 'out' / 'MNIST_GAN_train_hist.json').read_text())
    assert record['scored_with'] == {'classifier': DEFAULT_WEIGHTS, 'sha256': shipped}
    checkpoint = work / 'out' / 'checkpoint.pt'
    state = torch.load(checkpoint, weights_only=True)
    assert state['yardstick']['sha256'] == shipped
    state['yardstick']['sha256'] = 'f' * 64  # as if the classifier had been retrained since
    checkpoint.unlink()
    torch.save(state, checkpoint)
    before = folder_state(work)
    assert_refused(script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work), 1,
                   f'out/checkpoint.pt was scored with another MNIST classifier than {DEFAULT_WEIGHTS} holds now '
                   f'(sha256 ffffffffffff..., now {shipped[:12]}...): its fid would not compare with this run\'s; put '
                   f'that classifier back, or pass --resume=false or another --results_dir')
    assert folder_state(work) == before


def test_a_run_removes_what_a_killed_run_s_saves_left_behind(work, script_server, mnist_dir):
    dead, alive = dead_pid(), os.getpid()
    out = work / 'out'
    left = [out / f'checkpoint.tmp{dead}.pt', out / 'Fixed_results' / f'MNIST_GAN_2.tmp{dead}.png']
    kept = [out / f'MNIST_GAN_generated.tmp{alive}.png', out / 'notes.txt']
    for path in left + kept:
        path.write_bytes(b'\0' * 1000)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 1), work)
    assert result['status'] == 0, result['stderr']
    assert 'removed 1 temporary file(s) of 0 MB left in out/ by a process that was killed' in result['stdout']
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)


def test_only_a_failed_collective_is_an_interruption(monkeypatch):
    from plumbing import torchrun
    from plumbing.run import is_interruption
    gloo = RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:525] Read error [127.0.0.1]:8623: '
                        'Connection reset by peer')
    bug = RuntimeError('mat1 and mat2 shapes cannot be multiplied (32x100 and 10x256)')
    assert is_interruption(KeyboardInterrupt()) and is_interruption(Stopped())
    assert not is_interruption(gloo) and not is_interruption(bug)  # one process: no collective to fail
    monkeypatch.setattr(torchrun, 'world_size', lambda: 2)
    assert is_interruption(gloo) and is_interruption(torch.distributed.DistBackendError('NCCL error'))
    assert not is_interruption(bug) and not is_interruption(ValueError('a bug'))  # seen in full, under torchrun too


def test_a_checkpoint_from_before_the_resume_records_resumes(work, script_server, mnist_dir):
    checkpoint = work / 'out' / 'checkpoint.pt'
    state = torch.load(checkpoint, weights_only=True)
    for newer in ('config_changes', 'yardstick'):  # fields added since: an older checkpoint lacks them
        del state[newer]
    checkpoint.unlink()
    torch.save(state, checkpoint)
    result = script_server('mnist_gan.py', tiny(mnist_dir, 'out', 2), work)
    assert result['status'] == 0, result['stderr']
    assert 'resuming after epoch 1' in result['stdout']
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 2
