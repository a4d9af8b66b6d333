"""CelebA's bad inputs and interruptions (issue 19): each is one true line, and nothing is lost or mixed."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import REPO, dead_pid, fake_face, folder_state, name_of, run_script, write_csv, write_faces, write_txt
from plumbing import celeba
from plumbing.interrupts import Stopped, raise_stopped

SCRIPT = 'celeba_preprocess.py'
FEW = 8  # faces of the small fake CelebA


def preprocess(cwd, *args, workers=1):
    return run_script(SCRIPT, *args, f'--workers={workers}', cwd=cwd)


def assert_one_line(proc, status, line):
    assert (proc.returncode, proc.stderr) == (status, f'error: {line}\n')


@pytest.fixture(scope='module')
def few(tmp_path_factory):
    """A small fake CelebA: FEW good 178x218 faces and their attribute file."""
    root = tmp_path_factory.mktemp('few')
    os.makedirs(root / 'img_align_celeba')
    for i in range(1, FEW + 1):
        (root / 'img_align_celeba' / name_of(i)).write_bytes(fake_face(i))
    write_txt(root / 'list_attr_celeba.txt', FEW)
    return root


@pytest.fixture(scope='module')
def whole(few, tmp_path_factory):
    """out/, made by celeba_preprocess.py without the crop; each test works on a copy."""
    cwd = tmp_path_factory.mktemp('whole')
    proc = preprocess(cwd, f'--celeba_dir={few}', '--output_dir=out')
    assert proc.returncode == 0, proc.stderr
    return cwd / 'out'


def settings(out):
    return json.loads((out / celeba.SETTINGS_FILE).read_text())


# ---------------------------------------------------------------- 6: a rerun with other settings

def test_the_output_folder_records_its_settings(whole):
    assert settings(whole) == {'isCrop': False, 'img_size': 64}
    assert not [name for name in os.listdir(whole) if '.tmp' in name]


def test_crop_into_a_folder_made_whole_is_refused(few, whole, tmp_path):
    shutil.copytree(whole, tmp_path / 'out')
    before = folder_state(tmp_path / 'out')
    proc = preprocess(tmp_path, f'--celeba_dir={few}', '--output_dir=out', '--isCrop=True')
    assert_one_line(proc, 1, 'out/ holds faces made with --isCrop=False --img_size=64 (as its '
                             'celeba_preprocess.json records), not --isCrop=True --img_size=64; give another '
                             '--output_dir, or pass --isCrop=False to add to them')
    assert folder_state(tmp_path / 'out') == before


def test_the_default_crop_folder_made_whole_names_the_folder_in_the_way_on(few, whole, tmp_path):
    """Without --output_dir, --isCrop=False alone would write to the other default folder: the line says both."""
    shutil.copytree(whole, tmp_path / 'data' / 'resized_celebA_crop')
    proc = preprocess(tmp_path, f'--celeba_dir={few}', '--isCrop=True')
    assert proc.returncode == 1 and proc.stderr.endswith(
        'give another --output_dir, or pass --isCrop=False --output_dir=data/resized_celebA_crop to add to them\n')


@pytest.mark.parametrize('made_cropped', [False, True], ids=['whole', 'cropped'])
def test_a_folder_of_an_older_version_is_judged_by_its_faces(few, tmp_path, made_cropped):
    """No celeba_preprocess.json: the crop is told from a face and its source, and then recorded."""
    crop = [f'--isCrop={made_cropped}']
    assert preprocess(tmp_path, f'--celeba_dir={few}', '--output_dir=out', *crop).returncode == 0
    (tmp_path / 'out' / celeba.SETTINGS_FILE).unlink()  # as an older celeba_preprocess.py left it
    before = folder_state(tmp_path / 'out')
    proc = preprocess(tmp_path, f'--celeba_dir={few}', '--output_dir=out', f'--isCrop={not made_cropped}')
    assert_one_line(proc, 1, f'out/ holds faces made with --isCrop={made_cropped} --img_size=64 (told from its '
                             f'faces: it has no celeba_preprocess.json, from an older celeba_preprocess.py), '
                             f'not --isCrop={not made_cropped} --img_size=64; give another --output_dir, or '
                             f'pass --isCrop={made_cropped} to add to them')
    assert folder_state(tmp_path / 'out') == before

    proc = preprocess(tmp_path, f'--celeba_dir={few}', '--output_dir=out', *crop)
    assert proc.returncode == 0 and f'({FEW} already there)' in proc.stdout
    assert settings(tmp_path / 'out') == {'isCrop': made_cropped, 'img_size': 64}


# ---------------------------------------------------------------- 6: the cache notices a replaced face

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


# ---------------------------------------------------------------- 9: no advice to delete what is not the scripts'

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


@pytest.mark.parametrize('made_by_preprocess', [True, False], ids=['preprocessed', 'unknown'])
def test_a_damaged_face_is_deleted_only_where_the_preprocessing_made_it(tmp_path, capsys, made_by_preprocess):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    if made_by_preprocess:
        (tmp_path / 'faces' / celeba.SETTINGS_FILE).write_text('{"isCrop": false, "img_size": 64}')
    damaged = tmp_path / 'faces' / 'male' / '000000.jpg'
    damaged.write_bytes(damaged.read_bytes()[:300])
    with pytest.raises(SystemExit):
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'python celeba_preprocess.py')
    remedy = ('delete it and make it again with: python celeba_preprocess.py' if made_by_preprocess else
              f'replace it with a good copy, or move it out of {tmp_path}/faces/')
    assert capsys.readouterr().err == f'error: cannot decode {damaged}: it is damaged; {remedy}\n'
    assert os.listdir(tmp_path) == ['faces']


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


# ---------------------------------------------------------------- 10: killed and full-disk cache builds

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


# ---------------------------------------------------------------- 8: SIGTERM during the cache build

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


# ---------------------------------------------------------------- 18: SIGTERM, a BOM, small faces in the preprocessing

def test_sigterm_is_one_line_and_a_rerun_finishes(few, tmp_path):
    count = 1500  # enough that the workers are busy when SIGTERM comes
    faces = [(few / 'img_align_celeba' / name_of(i)).read_bytes() for i in range(1, FEW + 1)]
    os.makedirs(tmp_path / 'many' / 'img_align_celeba')
    for i in range(1, count + 1):
        (tmp_path / 'many' / 'img_align_celeba' / name_of(i)).write_bytes(faces[i % FEW])
    write_txt(tmp_path / 'many' / 'list_attr_celeba.txt', count)
    args = [sys.executable, str(REPO / SCRIPT), '--celeba_dir=many', '--output_dir=out', '--workers=2']
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(tmp_path / 'out' / 'male') and len(os.listdir(tmp_path / 'out' / 'male')) >= 20:
            proc.send_signal(signal.SIGTERM)  # the main process alone, as `kill PID` sends it
            break
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=60)  # also waits for the workers, which share stderr
    assert (proc.returncode, stderr) == (143, 'error: stopped by SIGTERM; run the same command again to finish '
                                              '(the images written so far are kept)\n')
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker left running
    done = sum(name.endswith('.jpg') for cls in ('female', 'male') for name in os.listdir(tmp_path / 'out' / cls))
    assert 20 <= done < count
    rerun = preprocess(tmp_path, '--celeba_dir=many', '--output_dir=out', workers=2)
    assert rerun.returncode == 0 and f'({done} already there)' in rerun.stdout
    assert sum(len(os.listdir(tmp_path / 'out' / cls)) for cls in ('female', 'male')) == count


@pytest.mark.parametrize('kind', ['txt', 'csv'])
def test_an_attribute_file_with_a_bom_is_read(few, tmp_path, kind):
    shutil.copytree(few / 'img_align_celeba', tmp_path / 'celebA' / 'img_align_celeba')
    path = tmp_path / 'celebA' / f'list_attr_celeba.{kind}'
    (write_txt if kind == 'txt' else write_csv)(path, FEW)
    path.write_bytes(b'\xef\xbb\xbf' + path.read_bytes())  # as Notepad saves 'UTF-8 with BOM'
    proc = preprocess(tmp_path, '--celeba_dir=celebA', '--output_dir=out')
    assert proc.returncode == 0, proc.stderr
    assert f'wrote {FEW - FEW // 3} female and {FEW // 3} male faces' in proc.stdout


def test_faces_too_small_for_the_crop_are_counted_apart(few, tmp_path):
    shutil.copytree(few / 'img_align_celeba', tmp_path / 'celebA' / 'img_align_celeba')
    write_txt(tmp_path / 'celebA' / 'list_attr_celeba.txt', FEW)
    Image.new('RGB', (100, 120), 'grey').save(tmp_path / 'celebA' / 'img_align_celeba' / name_of(2))
    proc = preprocess(tmp_path, '--celeba_dir=celebA', '--output_dir=out', '--isCrop=True')
    assert proc.returncode == 0, proc.stderr
    assert f'skipped 1 too small for the 108x108 crop: {name_of(2)} (100x120)\n' in proc.stdout
    assert 'corrupt' not in proc.stdout
    assert name_of(2) not in os.listdir(tmp_path / 'out' / 'female') + os.listdir(tmp_path / 'out' / 'male')
