"""The data (README, CelebA): MNIST's IDX files read, checked and looked for; CelebA's folders of faces, the
memory-mapped cache decoded from them (by one process under torchrun), and what is refused; the batches of
every epoch. A damaged file or a wrong folder stops with one line before anything is written. Making the faces:
test_celeba_preprocess.py.
"""
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from plumbing import celeba, data
from plumbing.interrupts import Stopped, raise_stopped
from conftest import ENV, OFFLINE, REPO, TINY, assert_refused, dead_pid, fake_face, folder_state, name_of, one_line, \
    run_script, tiny, write_faces, write_idx, write_txt


# ---------------------------------------------------------------- MNIST

IMAGES = 'train-images-idx3-ubyte'
LABELS = 'train-labels-idx1-ubyte'


DAMAGED_MNIST = [
    (IMAGES + '.gz', lambda gz, raw: gz[:-100],
     'its gzip data is damaged: Compressed file ended before the end-of-stream marker was reached'),
    (IMAGES + '.gz', lambda gz, raw: b'no gzip here' * 10, "its gzip data is damaged: Not a gzipped file (b'no')"),
    (IMAGES + '.gz', lambda gz, raw: gzip.compress(b''), 'it is empty'),
    (IMAGES + '.gz', lambda gz, raw: b'', 'it is empty'),
    (IMAGES, lambda gz, raw: b'', 'it is empty'),
    (IMAGES, lambda gz, raw: raw[:5000], 'its header announces 401,408 bytes of data but it holds 4,984: it is '
                                         'truncated or damaged'),
    (IMAGES, lambda gz, raw: b'\x00\x00\x0d\x03' + raw[4:], 'it is not an IDX file of unsigned bytes'),
    (IMAGES, lambda gz, raw: raw[:10], 'its header is cut short'),
]


@pytest.mark.parametrize('name, damage, problem', DAMAGED_MNIST, ids=[problem[:30] for _, _, problem in DAMAGED_MNIST])
def test_a_damaged_mnist_file_is_one_line_naming_it(mnist_dir, tmp_path, capsys, name, damage, problem):
    raw_dir = tmp_path / 'MNIST' / 'raw'
    shutil.copytree(mnist_dir / 'MNIST' / 'raw', raw_dir)
    gz = (raw_dir / (IMAGES + '.gz')).read_bytes()
    (raw_dir / name).write_bytes(damage(gz, gzip.decompress(gz)))  # the unzipped name is read first
    with pytest.raises(SystemExit) as stop:
        data.load_mnist(str(tmp_path))
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: {raw_dir / name} is damaged: {problem}; replace it with a good '
                                       f'copy, or delete it to download MNIST again\n')


def test_mnist_labels_that_are_no_digits_are_one_line(mnist_dir, tmp_path, capsys):
    raw_dir = tmp_path / 'MNIST' / 'raw'
    shutil.copytree(mnist_dir / 'MNIST' / 'raw', raw_dir)
    raw = bytearray(gzip.decompress((raw_dir / (LABELS + '.gz')).read_bytes()))
    raw[-1] = 10
    (raw_dir / LABELS).write_bytes(bytes(raw))
    with pytest.raises(SystemExit):
        data.load_mnist(str(tmp_path))
    assert capsys.readouterr().err == (f'error: {raw_dir / LABELS} does not hold digit labels 0-9; replace it with '
                                       f'a good copy, or delete it to download MNIST again\n')


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


def test_a_batch_larger_than_the_data_says_how_many_images_there_are(script_server, mnist_dir, tmp_path):
    result = script_server('mnist_gan.py', [f'--data_dir={mnist_dir}', '--results_dir=out', '--batch_size=70000'],
                           tmp_path)
    one_line(result, 1, f'{mnist_dir}/MNIST/raw/ holds 512 training image(s), less than one batch of 70000; '
                        f'pass --batch_size=512 or lower')
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=out', '--train_limit=1000',
                                               '--batch_size=512', '--d=8'], tmp_path)
    one_line(result, 1, 'faces/ holds 40 training image(s), less than one batch of 512; pass --batch_size=40 or lower')


def test_a_script_on_a_damaged_mnist_file_stops_before_writing(work, script_server, mnist_dir):
    data = work / 'data'
    shutil.copytree(mnist_dir, data)
    (data / 'MNIST' / 'raw' / (IMAGES + '.gz')).write_bytes(b'')
    before = folder_state(work / 'out')
    assert_refused(script_server('mnist_gan.py', tiny(data, 'out', 2), work), 1,
                   f'{data}/MNIST/raw/{IMAGES}.gz is damaged: it is empty; replace it with a good copy, '
                   f'or delete it to download MNIST again')
    assert folder_state(work / 'out') == before


def test_missing_mnist_without_network_names_the_folder_and_files(tmp_path):
    result = run_script('mnist_cgan.py', '--data_dir=nowhere', cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: MNIST is missing from nowhere/MNIST/raw/')
    assert 'train-images-idx3-ubyte' in last and 't10k-labels-idx1-ubyte' in last


def test_a_failed_download_leaves_no_empty_folders(script_server, tmp_path):
    result = script_server('mnist_gan.py', ['--data_dir=nowhere', '--results_dir=out'], tmp_path)
    assert result['status'] == 1 and result['stderr'].startswith('error: MNIST is missing from nowhere/MNIST/raw/')
    assert os.listdir(tmp_path) == []


def test_the_default_data_is_the_mnist_beside_the_scripts_from_any_folder(tmp_path):
    env = {**os.environ, **OFFLINE, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    done = subprocess.run([sys.executable, str(REPO / 'mnist_gan.py'), '--results_dir=out', '--train_epoch=1',
                           '--train_limit=64', '--batch_size=32', '--quality_samples=0', '--device=cpu'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ['out']  # no ./data/MNIST/raw made, nothing downloaded


def test_a_script_started_through_a_link_finds_the_mnist_shipped_beside_it(tmp_path):
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'gan.py').symlink_to(REPO / 'mnist_gan.py')
    result = subprocess.run([sys.executable, 'gan.py', '--train_epoch=1', *TINY, '--results_dir=out'],
                            cwd=tmp_path / 'other', env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'download' not in result.stdout and not (tmp_path / 'other' / 'data').exists()


# ---------------------------------------------------------------- CelebA: the folder of faces

@pytest.mark.parametrize('script, args, command', [
    ('celeba_dcgan.py', [], 'python celeba_preprocess.py'),
    ('celeba_cdcgan.py', ['--isCrop=True', '--data_dir=my faces'],
     "python celeba_preprocess.py --isCrop=True '--output_dir=my faces'"),
])
def test_missing_faces_get_one_line_with_the_preprocess_command(tmp_path, script, args, command):
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
    assert result.stderr.rstrip().endswith(f'make it with: {command}')


def test_faces_of_another_size_get_one_line(tmp_path):
    write_faces(tmp_path / 'data' / 'resized_celebA', {'female': 2, 'male': 2}, size=32)
    result = run_script('celeba_dcgan.py', cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr and result.stderr.count('\n') == 1
    assert ('is 32x32, not 64x64: data/resized_celebA/ holds images of another size, not faces '
            'celeba_preprocess.py made at img_size 64; make them in another folder with: python celeba_preprocess.py '
            '--output_dir=data/resized_celebA_64 and pass --data_dir=data/resized_celebA_64') in result.stderr
    assert 'delete' not in result.stderr  # the folder is not one the scripts are known to have made
    assert not (tmp_path / 'data' / 'resized_celebA.u8').exists()


def test_faces_of_another_size_in_the_default_folder_say_to_make_them_beside_it(tmp_path, capsys, monkeypatch):
    write_faces(tmp_path / 'data' / 'resized_celebA', {'female': 2, 'male': 2}, size=32)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        celeba.load_celeba('data/resized_celebA', False, 64, 0, 2, torch.device('cpu'))
    assert stop.value.code == 1 and capsys.readouterr().err == (
        'error: data/resized_celebA/female/000000.jpg is 32x32, not 64x64: data/resized_celebA/ holds images of '
        'another size, not faces celeba_preprocess.py made at img_size 64; make them in another folder with: '
        'python celeba_preprocess.py --output_dir=data/resized_celebA_64 and pass --data_dir=data/resized_celebA_64\n')
    assert sorted(os.listdir(tmp_path / 'data')) == ['resized_celebA']


def test_a_stray_face_of_another_size_is_named(script_server, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    Image.new('RGB', (65, 64)).save(tmp_path / 'faces' / 'male' / 'stray.png')
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=out', '--batch_size=8', '--d=8'],
                           tmp_path)
    one_line(result, 1, '1 of the 41 images in faces/ are not 64x64: faces/male/stray.png (65x64); '
                        'move them out of faces/')


def test_unprocessed_faces_as_data_dir_say_what_the_folder_is(script_server, tmp_path):
    """CelebA's 178x218 JPEGs sorted into female/ and male/: not deleted, and the command that makes 64x64 ones."""
    for cls, i in (('female', 1), ('male', 3)):
        os.makedirs(tmp_path / 'mine' / cls)
        (tmp_path / 'mine' / cls / name_of(i)).write_bytes(fake_face(i))
    before = folder_state(tmp_path)
    result = script_server('celeba_dcgan.py', ['--data_dir=mine', '--device=cpu'], tmp_path)
    assert (result['status'], result['stderr']) == (1, (
        'error: mine/female/000001.jpg is 178x218, not 64x64: mine/ holds images of another size, not faces '
        'celeba_preprocess.py made at img_size 64; make them with: python celeba_preprocess.py and train '
        'without --data_dir\n'))
    assert folder_state(tmp_path) == before


def test_celeba_as_downloaded_as_data_dir_says_how_to_make_the_faces(script_server, tmp_path):
    os.makedirs(tmp_path / 'celebA' / 'img_align_celeba')
    (tmp_path / 'celebA' / 'img_align_celeba' / name_of(1)).write_bytes(fake_face(1))
    write_txt(tmp_path / 'celebA' / 'list_attr_celeba.txt', 1)
    before = folder_state(tmp_path)
    result = script_server('celeba_cdcgan.py', ['--data_dir=celebA', '--isCrop=True', '--device=cpu'], tmp_path)
    assert (result['status'], result['stderr']) == (1, (
        'error: celebA/ is CelebA as downloaded (it holds img_align_celeba), not the faces the scripts train on; '
        'make those with: python celeba_preprocess.py --celeba_dir=celebA --isCrop=True and train without '
        '--data_dir\n'))
    assert folder_state(tmp_path) == before


def test_training_on_faces_made_with_another_crop_is_refused(tmp_path, capsys, monkeypatch):
    write_faces(tmp_path / 'data' / 'resized_celebA', {'female': 2, 'male': 2})
    (tmp_path / 'data' / 'resized_celebA' / celeba.SETTINGS_FILE).write_text('{"isCrop": false, "img_size": 64}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        celeba.load_celeba('data/resized_celebA', True, 64, 0, 2, torch.device('cpu'))
    assert capsys.readouterr().err == (
        'error: data/resized_celebA/ holds faces made with --isCrop=False --img_size=64 (its celeba_preprocess.json '
        'says so), not --isCrop=True --img_size=64; train on them with --isCrop=False, or make --isCrop=True '
        '--img_size=64 faces with: python celeba_preprocess.py --isCrop=True and train without --data_dir\n')


def test_a_results_folder_inside_the_faces_folder_is_refused(script_server, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=faces/male/out', '--d=8'], tmp_path)
    one_line(result, 2, '--results_dir=faces/male/out is inside the faces\' folder faces/; pass a --results_dir '
                        'outside it')


def test_train_limit_keeps_both_genders(tmp_path):
    write_faces(tmp_path / 'faces', {'female': 30, 'male': 10})
    images, labels = celeba.load_celeba(str(tmp_path / 'faces'), False, 64, 8, 4, torch.device('cpu'))
    assert images.shape == (8, 3, 64, 64) and 0 < labels.sum() < 8


# ---------------------------------------------------------------- CelebA: the cache of the decoded faces

def test_the_cache_holds_imagefolder_order_and_pixels(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor
    write_faces(tmp_path / 'faces', {'female': 5, 'male': 3})
    images, labels, classes = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    reference = ImageFolder(str(tmp_path / 'faces'))
    assert classes == reference.classes == ['female', 'male'] and images.shape == (8, 3, 64, 64)
    assert labels.tolist() == reference.targets == [0] * 5 + [1] * 3
    for i, (picture, _) in enumerate(reference):
        assert torch.equal(images[i], pil_to_tensor(picture))


def test_the_cache_is_built_once_and_rebuilt_when_the_folder_changes(tmp_path, capsys):
    folder = str(tmp_path / 'faces')
    write_faces(folder, {'female': 4, 'male': 4})
    cache = tmp_path / 'faces.u8'
    celeba.image_folder_tensor(folder, 64, 'cmd')
    assert 'decoding the 8 images' in capsys.readouterr().out
    built = cache.stat().st_mtime_ns

    images, _, _ = celeba.image_folder_tensor(folder, 64, 'cmd')
    assert capsys.readouterr().out == '' and cache.stat().st_mtime_ns == built and len(images) == 8

    write_faces(folder, {'male': 1}, seed=7)  # one more face
    images, labels, _ = celeba.image_folder_tensor(folder, 64, 'cmd')
    assert 'decoding the 9 images' in capsys.readouterr().out
    assert len(images) == 9 and labels.tolist() == [0] * 4 + [1] * 5


def padded(data, length):
    """The JPEG with bytes after its end marker, which decoders ignore: two faces of one file size."""
    return data + b'\0' * (length - len(data))


def test_a_face_replaced_with_the_same_size_and_mtime_rebuilds_the_cache(tmp_path, capsys):
    """As `cp -p` of another face of the same size leaves it: only the ctime and the inode tell."""
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    write_faces(tmp_path / 'other', {'male': 1}, seed=5)
    target, other = tmp_path / 'faces' / 'male' / '000001.jpg', tmp_path / 'other' / 'male' / '005000.jpg'
    length = max(target.stat().st_size, other.stat().st_size)
    target.write_bytes(padded(target.read_bytes(), length))
    before, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    before = before.clone()
    stat = target.stat()
    replacement = tmp_path / 'replacement.jpg'
    replacement.write_bytes(padded(other.read_bytes(), length))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    capsys.readouterr()

    after, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert 'decoding the 5 images' in capsys.readouterr().out
    with Image.open(other) as im:
        expected = pil_to_tensor(im.convert("RGB"))
    assert torch.equal(after[4], expected) and not torch.equal(before[4], expected)
    assert torch.equal(after[:4], before[:4])


def test_a_face_whose_mtime_alone_changed_rebuilds_the_cache(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    capsys.readouterr()
    face = tmp_path / 'faces' / 'female' / '000000.jpg'
    os.utime(face, ns=(face.stat().st_atime_ns, face.stat().st_mtime_ns - 10**9))  # older, as cp -p can make it
    celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert 'decoding the 4 images' in capsys.readouterr().out


def test_a_damaged_face_is_one_line_and_leaves_no_cache(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    damaged = sorted((tmp_path / 'faces' / 'male').iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.raises(SystemExit) as stop:
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'python celeba_preprocess.py')
    assert stop.value.code == 1
    assert capsys.readouterr().err == (f'error: cannot decode {damaged}: it is damaged; replace it with a good copy, '
                                       f'or move it out of {tmp_path}/faces/\n')  # no settings file: not ours
    assert os.listdir(tmp_path) == ['faces']  # no cache, no temporary file


@pytest.mark.parametrize('made_by_preprocess', [True, False], ids=['preprocessed', 'unknown'])
def test_a_damaged_face_is_deleted_only_where_the_preprocessing_made_it(tmp_path, capsys, made_by_preprocess):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    if made_by_preprocess:
        (tmp_path / 'faces' / celeba.SETTINGS_FILE).write_text('{"isCrop": false, "img_size": 64}')
    damaged = tmp_path / 'faces' / 'male' / '000000.jpg'
    damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.raises(SystemExit):
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'python celeba_preprocess.py')
    remedy = ('delete it and make it again with: python celeba_preprocess.py (with --celeba_dir=FOLDER where '
              'CelebA as downloaded is not in data/celebA/)' if made_by_preprocess else
              f'replace it with a good copy, or move it out of {tmp_path}/faces/')
    assert capsys.readouterr().err == f'error: cannot decode {damaged}: it is damaged; {remedy}\n'
    assert os.listdir(tmp_path) == ['faces']


def test_a_damaged_face_advises_the_celeba_dir_its_rerun_needs(script_server, tmp_path):
    write_faces(tmp_path / 'faces', {'female': 20, 'male': 20})
    (tmp_path / 'faces' / 'celeba_preprocess.json').write_text(json.dumps({'isCrop': False, 'img_size': 64}))
    (tmp_path / 'faces' / 'male' / '000005.jpg').write_bytes(b'')
    result = script_server('celeba_dcgan.py', ['--data_dir=faces', '--results_dir=out', '--batch_size=8', '--d=8'],
                           tmp_path)
    one_line(result, 1, 'cannot decode faces/male/000005.jpg: it is damaged; delete it and make it again with: '
                        'python celeba_preprocess.py --output_dir=faces (with --celeba_dir=FOLDER where CelebA as '
                        'downloaded is not in data/celebA/)')


@pytest.mark.parametrize('damage', ['index', 'cut short'])
def test_a_damaged_cache_is_decoded_again(tmp_path, capsys, damage):
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 2})
    images, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    images = images.clone()  # not the mapped file, which is cut short below
    if damage == 'index':
        (tmp_path / 'faces.u8.json').write_text('{"fingerprint": ')
    else:
        os.truncate(tmp_path / 'faces.u8', 1000)
    capsys.readouterr()
    again, _, _ = celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert 'decoding the 5 images' in capsys.readouterr().out
    assert torch.equal(again, images)


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


def torchrun(args, cwd):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'celeba_dcgan.py'), '--', *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_under_torchrun_a_damaged_cache_is_decoded_again_before_any_process_maps_it(tmp_path):
    write_faces(tmp_path / 'faces', {'female': 40, 'male': 40})
    args = ['--data_dir=faces', '--train_epoch=1', '--batch_size=16', '--d=8', '--device=cpu', '--quality_samples=0']
    clean = torchrun([*args, '--results_dir=clean'], tmp_path)
    assert clean.returncode == 0, clean.stderr
    cache = tmp_path / 'faces.u8'
    cache.write_bytes(bytes(cache.stat().st_size))  # zeroed after it was built: black faces
    damaged = torchrun([*args, '--results_dir=again'], tmp_path)
    assert damaged.returncode == 0, damaged.stderr
    assert 'does not match its checksum' in damaged.stdout
    losses = [[{k: h[k] for k in ('loss_d', 'loss_g', 'd_real', 'd_fake')}
               for h in json.loads((tmp_path / run / 'CelebA_DCGAN_train_hist.json').read_text())['epochs']]
              for run in ('clean', 'again')]
    assert losses[0] == losses[1]  # every process trained on the same, sound faces as the clean run


def test_a_folder_where_the_cache_belongs_is_one_line(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    (tmp_path / 'faces.u8').mkdir()
    with pytest.raises(SystemExit):
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert capsys.readouterr().err == (f'error: cannot write {tmp_path}/faces.u8 (Is a directory); a folder stands '
                                       f'where the file should be; move it away or choose another folder\n')
    assert sorted(os.listdir(tmp_path)) == ['faces', 'faces.u8']


def test_a_build_removes_the_temporaries_of_dead_builds_only(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    dead, alive = dead_pid(), os.getppid()
    left = [f'faces.tmp{dead}.u8', f'faces.u8.tmp{dead}.json']
    for name in left + [f'faces.tmp{alive}.u8', 'faces.tmpX.u8', f'other.tmp{dead}.u8']:
        (tmp_path / name).write_bytes(b'\0' * 1000)
    celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert 'removed 2 temporary file(s)' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(['faces', 'faces.u8', 'faces.u8.json', f'faces.tmp{alive}.u8',
                                                   'faces.tmpX.u8', f'other.tmp{dead}.u8'])


def test_a_full_disk_while_building_the_cache_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    """posix_fallocate reserves the space before the map is written: a full disk is ENOSPC, not a Bus error."""
    if not hasattr(os, 'posix_fallocate'):
        pytest.skip('no posix_fallocate here: the file stays sparse')
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    asked = []

    def full(fd, offset, length):
        asked.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'posix_fallocate', full)
    with pytest.raises(SystemExit) as stop:
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert stop.value.code == 1 and asked == [4 * 3 * 64 * 64]
    assert capsys.readouterr().err == (f'error: cannot write {tmp_path}/faces.u8 (No space left on device); free '
                                       f'some space (or lift the limit on file sizes), then run the same command again\n')
    assert os.listdir(tmp_path) == ['faces']


def test_sigterm_while_decoding_is_not_blamed_on_a_face(tmp_path, capsys, monkeypatch):
    """World turns SIGTERM into Stopped, an Exception: the decoder's except must let it through."""
    write_faces(tmp_path / 'faces', {'female': 3, 'male': 3})
    opened = []
    real_open = Image.open

    def open_then_sigterm(*args, **kwargs):
        opened.append(args[0])
        im = real_open(*args, **kwargs)
        if len(opened) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the decoder's try
        return im
    monkeypatch.setattr(Image, 'open', open_then_sigterm)
    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        with pytest.raises(Stopped):
            celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(opened) == 3 and capsys.readouterr().err == ''
    assert os.listdir(tmp_path) == ['faces']  # the temporary cache removed


# ---------------------------------------------------------------- the batches of an epoch

def test_shuffled_batches_are_full_and_hold_each_index_at_most_once():
    batches = data.shuffled_batches(10, 3, torch.device('cpu'), seed=0, epoch=1)
    assert batches.shape == (3, 3) and batches.dtype == torch.int64
    assert len(batches.flatten().unique()) == 9 and 0 <= batches.min() and batches.max() < 10


def test_shuffled_batches_are_a_fresh_permutation_each_epoch_and_repeat_with_the_seed():
    cpu = torch.device('cpu')
    first, second = (data.shuffled_batches(64, 8, cpu, seed=1, epoch=epoch) for epoch in (1, 2))
    assert sorted(first.flatten().tolist()) == sorted(second.flatten().tolist()) == list(range(64))
    assert not torch.equal(first, second) and not torch.equal(first.flatten(), torch.arange(64))
    torch.manual_seed(123)  # the global random stream, which draws the noise, does not change the order
    assert torch.equal(data.shuffled_batches(64, 8, cpu, seed=1, epoch=1), first)
    assert not torch.equal(data.shuffled_batches(64, 8, cpu, seed=2, epoch=1), first)


def test_under_torchrun_each_process_takes_its_share_of_every_global_batch(monkeypatch):
    cpu = torch.device('cpu')
    whole = data.shuffled_batches(64, 8, cpu, seed=1, epoch=3)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(data, 'rank', lambda rank=rank: rank)
        monkeypatch.setattr(data, 'world_size', lambda: 2)
        shares.append(data.shuffled_batches(64, 8, cpu, seed=1, epoch=3))
    assert shares[0].shape == shares[1].shape == (8, 4)
    assert torch.equal(torch.cat(shares, dim=1), whole)  # together, each global batch once
