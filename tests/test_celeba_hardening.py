"""CelebA's bad inputs and interruptions (issue 19): each is one true line, and nothing is lost or mixed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO, fake_face, folder_state, name_of, run_script, write_csv, write_txt
from plumbing import celeba

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
