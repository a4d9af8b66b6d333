"""celeba_preprocess.py on a small fake CelebA in the real file formats (CelebA itself is not needed)."""
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from PIL import Image, ImageChops, ImageStat

from conftest import HEADER, REPO, fake_face, folder_state, is_male, name_of, run_script, write_csv, write_txt

SCRIPT = 'celeba_preprocess.py'

GOOD = 30  # 000001.jpg ... 000030.jpg are fine
TRUNCATED, NOT_JPEG, MISSING = '000031.jpg', '000032.jpg', '000033.jpg'  # listed, but bad
UNLISTED = '000034.jpg'  # present, not in the attribute file
LISTED = 33


def write_images(folder):
    """The fake img_align_celeba/: good images, a truncated one, a non-JPEG, one unlisted; MISSING is absent."""
    os.makedirs(folder)
    files = {name_of(i): fake_face(i) for i in range(1, GOOD + 1)}
    files[TRUNCATED] = fake_face(31)[:3000]
    files[NOT_JPEG] = b'this is no jpeg\n' * 100
    files[UNLISTED] = fake_face(34)
    for name, data in files.items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data)


def zip_folder(folder, zip_path):
    with zipfile.ZipFile(zip_path, 'w') as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), 'img_align_celeba/' + name)


def run(cwd, *args, check=True):
    proc = run_script(SCRIPT, *args, '--workers=2', cwd=cwd)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def outputs(out):
    """{class/name: bytes} of every output image (not the .NAME.tmp a killed run may leave)."""
    return {f'{cls}/{name}': open(os.path.join(out, cls, name), 'rb').read()
            for cls in ('female', 'male') for name in os.listdir(os.path.join(out, cls)) if name.endswith('.jpg')}


@pytest.fixture(scope='module')
def celeba(tmp_path_factory):
    """A fake CelebA in the official layout: data/celebA/{img_align_celeba/, list_attr_celeba.txt}."""
    root = tmp_path_factory.mktemp('official')
    write_images(root / 'img_align_celeba')
    write_txt(root / 'list_attr_celeba.txt', LISTED)
    return root


@pytest.fixture(scope='module')
def full(celeba, tmp_path_factory):
    cwd = tmp_path_factory.mktemp('full')
    proc = run(cwd, f'--celeba_dir={celeba}', '--output_dir=out')
    return cwd / 'out', proc.stdout


def test_classes_follow_male_column_and_images_are_64px(full):
    out, _ = full
    expected = {name_of(i): 'male' if is_male(i) else 'female' for i in range(1, GOOD + 1)}
    assert {name: cls for cls in ('female', 'male') for name in os.listdir(out / cls)} == expected
    for cls in ('female', 'male'):
        for name in os.listdir(out / cls):
            with Image.open(out / cls / name) as im:
                im.load()
                assert (im.format, im.mode, im.size) == ('JPEG', 'RGB', (64, 64))


def test_summary_counts_written_missing_corrupt_unlisted(full):
    _, stdout = full
    males = sum(is_male(i) for i in range(1, GOOD + 1))
    assert f'wrote {GOOD - males} female and {males} male faces' in stdout
    assert '(0 already there)' in stdout
    assert 'skipped 1 listed but missing' in stdout and MISSING in stdout
    assert 'skipped 2 corrupt or truncated' in stdout and TRUNCATED in stdout and NOT_JPEG in stdout
    assert 'ignored 1 not listed' in stdout and UNLISTED in stdout


def test_draft_decoding_matches_full_resolution(celeba):
    from celeba_preprocess import square_face
    for crop, side in ((False, 178), (True, 108)):
        for i in (1, 2, 3):
            with Image.open(celeba / 'img_align_celeba' / name_of(i)) as im:
                fast = square_face(im, 64, crop)
            with Image.open(celeba / 'img_align_celeba' / name_of(i)) as im:
                left, top = (178 - side) / 2, (218 - side) / 2
                slow = im.convert('RGB').resize((64, 64), Image.LANCZOS, box=(left, top, left + side, top + side))
            assert max(ImageStat.Stat(ImageChops.difference(fast, slow)).mean) < 3  # in 0..255 levels


def test_crop_differs_from_whole_face(celeba, full, tmp_path):
    run(tmp_path, f'--celeba_dir={celeba}', '--output_dir=out', '--isCrop=True')
    whole, cropped = outputs(full[0]), outputs(tmp_path / 'out')
    assert whole.keys() == cropped.keys()
    for path in whole:
        assert ImageChops.difference(Image.open(tmp_path / 'out' / path), Image.open(full[0] / path)).getbbox()


def test_rerun_writes_nothing(celeba, full):
    out, _ = full
    before = {path: os.stat(out / path).st_mtime_ns for path in outputs(out)}
    stdout = run(out.parent, f'--celeba_dir={celeba}', '--output_dir=out').stdout
    assert 'wrote 0 female and 0 male faces' in stdout and f'({GOOD} already there)' in stdout
    assert {path: os.stat(out / path).st_mtime_ns for path in outputs(out)} == before


def test_other_size_into_same_folder_is_refused(celeba, full):
    before = folder_state(full[0])
    proc = run(full[0].parent, f'--celeba_dir={celeba}', '--output_dir=out', '--img_size=32', check=False)
    assert proc.returncode == 1
    assert proc.stderr == ('error: out/ holds faces made with --isCrop=False --img_size=64 (as its '
                           'celeba_preprocess.json records), not --isCrop=False --img_size=32; give another '
                           '--output_dir, or pass --img_size=64 to add to them\n')
    assert folder_state(full[0]) == before


def kaggle(celeba, root):
    shutil.copytree(celeba / 'img_align_celeba', root / 'img_align_celeba' / 'img_align_celeba')
    write_csv(root / 'list_attr_celeba.csv', LISTED)


def torchvision(celeba, root):
    shutil.copytree(celeba / 'img_align_celeba', root / 'celeba' / 'img_align_celeba')
    write_txt(root / 'celeba' / 'list_attr_celeba.txt', LISTED, newline='\r\n')


def downloaded_zip(celeba, root):
    os.makedirs(root)
    zip_folder(celeba / 'img_align_celeba', root / 'img_align_celeba.zip')
    shutil.copy(celeba / 'list_attr_celeba.txt', root)


@pytest.mark.parametrize('layout', [downloaded_zip, kaggle, torchvision])
def test_other_layouts_give_the_same_output(celeba, full, tmp_path, layout):
    layout(celeba, tmp_path / 'celebA')
    stdout = run(tmp_path, '--celeba_dir=celebA', '--output_dir=out').stdout
    assert outputs(tmp_path / 'out') == outputs(full[0])
    assert 'skipped 2 corrupt' in stdout and 'skipped 1 listed but missing' in stdout


def assert_all_decode(out):
    for path in outputs(out):
        with Image.open(out / path) as im:
            im.load()
            assert im.size == (64, 64)


def test_killed_run_is_finished_by_rerun(celeba, tmp_path):
    count = 1500  # enough that one worker is still busy when the kill comes
    faces = [open(celeba / 'img_align_celeba' / name_of(i), 'rb').read() for i in range(1, GOOD + 1)]
    os.makedirs(tmp_path / 'many' / 'img_align_celeba')
    for i in range(1, count + 1):
        (tmp_path / 'many' / 'img_align_celeba' / name_of(i)).write_bytes(faces[i % GOOD])
    write_txt(tmp_path / 'many' / 'list_attr_celeba.txt', count)
    args = [sys.executable, str(REPO / SCRIPT), '--celeba_dir=many', '--output_dir=out', '--workers=1']
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(tmp_path / 'out' / 'male') and len(os.listdir(tmp_path / 'out' / 'male')) >= 20:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker too, as a crash or power cut would
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    done = len(outputs(tmp_path / 'out'))
    assert 20 <= done < count
    assert_all_decode(tmp_path / 'out')

    (tmp_path / 'out' / 'female' / '.000002.jpg.tmp').write_bytes(faces[2][:1000])  # as a kill mid-write leaves
    stdout = run(tmp_path, '--celeba_dir=many', '--output_dir=out').stdout
    assert f'({done} already there)' in stdout
    assert len(outputs(tmp_path / 'out')) == count
    assert not [n for cls in ('female', 'male') for n in os.listdir(tmp_path / 'out' / cls) if n.endswith('.tmp')]
    assert_all_decode(tmp_path / 'out')


def no_data(celeba, root):
    os.makedirs(root)


def wrong_header(celeba, root):
    shutil.copytree(celeba / 'img_align_celeba', root / 'img_align_celeba')
    write_txt(root / 'list_attr_celeba.txt', LISTED, with_count=False)


def no_male_column(celeba, root):
    shutil.copytree(celeba / 'img_align_celeba', root / 'img_align_celeba')
    write_txt(root / 'list_attr_celeba.txt', LISTED, header=[n.replace('Male', 'Man') for n in HEADER])


@pytest.mark.parametrize('make, message', [
    (no_data, 'mmlab.ie.cuhk.edu.hk/projects/CelebA.html'),
    (wrong_header, 'line 1 should be the image count and line 2 the 40 attribute names'),
    (no_male_column, 'has no Male column'),
])
def test_bad_input_gives_one_line_error(celeba, tmp_path, make, message):
    make(celeba, tmp_path / 'celebA')
    proc = run(tmp_path, '--celeba_dir=celebA', '--output_dir=out', check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith('error: ') and proc.stderr.count('\n') == 1 and message in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_output_folder_default(celeba, tmp_path):
    """Without --output_dir the faces go where the training scripts look for them."""
    from plumbing.celeba import celeba_folder
    assert celeba_folder(False) == 'data/resized_celebA' and celeba_folder(True) == 'data/resized_celebA_crop'
    run(tmp_path, f'--celeba_dir={celeba}', '--isCrop=True')
    assert sorted(os.listdir(tmp_path / celeba_folder(True))) == ['celeba_preprocess.json', 'female', 'male']
