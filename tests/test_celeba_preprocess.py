"""celeba_preprocess.py (README, CelebA) on a small fake CelebA in the real file formats (CelebA itself is not
needed): the faces it writes, their classes and its summary; the settings it records, and a rerun that adds to
faces made alike and refuses others; kills (of the run or of a worker), SIGTERM and failed writes; bad input as
one line. The faces as the training scripts read them: test_data.py."""
import errno
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from PIL import Image, ImageChops, ImageStat

from plumbing.celeba import SETTINGS_FILE
from conftest import ENV, HEADER, REPO, fake_face, folder_state, is_male, name_of, run_script, write_csv, write_txt

SCRIPT = 'celeba_preprocess.py'

GOOD = 30  # 000001.jpg ... 000030.jpg are fine
TRUNCATED, NOT_JPEG, MISSING = '000031.jpg', '000032.jpg', '000033.jpg'  # listed, but bad
UNLISTED = '000034.jpg'  # present, not in the attribute file
LISTED = 33
FEW = 8  # faces of the small fake CelebA


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
    """celeba_preprocess.py with 2 workers, its success asserted unless check=False."""
    proc = run_script(SCRIPT, *args, '--workers=2', cwd=cwd)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def preprocess(cwd, *args, workers=1):
    """celeba_preprocess.py with one worker unless asked, its result as it is."""
    return run_script(SCRIPT, *args, f'--workers={workers}', cwd=cwd)


def assert_one_line(proc, status, line):
    assert (proc.returncode, proc.stderr) == (status, f'error: {line}\n')


def outputs(out):
    """{class/name: bytes} of every output image (not the .NAME.tmp a killed run may leave)."""
    return {f'{cls}/{name}': open(os.path.join(out, cls, name), 'rb').read()
            for cls in ('female', 'male') for name in os.listdir(os.path.join(out, cls)) if name.endswith('.jpg')}


def settings(out):
    return json.loads((out / SETTINGS_FILE).read_text())


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


# ---------------------------------------------------------------- the faces written: classes, size, crop, the summary

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


def test_output_folder_default(celeba, tmp_path):
    """Without --output_dir the faces go where the training scripts look for them."""
    from plumbing.celeba import celeba_folder
    assert celeba_folder(False) == 'data/resized_celebA' and celeba_folder(True) == 'data/resized_celebA_crop'
    run(tmp_path, f'--celeba_dir={celeba}', '--isCrop=True')
    assert sorted(os.listdir(tmp_path / celeba_folder(True))) == ['celeba_preprocess.json', 'female', 'male']


# ---------------------------------------------------------------- a rerun: adds to faces made alike, refuses others

def test_rerun_writes_nothing(celeba, full):
    out, _ = full
    before = {path: os.stat(out / path).st_mtime_ns for path in outputs(out)}
    stdout = run(out.parent, f'--celeba_dir={celeba}', '--output_dir=out').stdout
    assert 'wrote 0 female and 0 male faces' in stdout and f'({GOOD} already there)' in stdout
    assert {path: os.stat(out / path).st_mtime_ns for path in outputs(out)} == before


def test_the_output_folder_records_its_settings(whole):
    assert settings(whole) == {'isCrop': False, 'img_size': 64}
    assert not [name for name in os.listdir(whole) if '.tmp' in name]


def test_other_size_into_same_folder_is_refused(celeba, full):
    before = folder_state(full[0])
    proc = run(full[0].parent, f'--celeba_dir={celeba}', '--output_dir=out', '--img_size=32', check=False)
    assert proc.returncode == 1
    assert proc.stderr == ('error: out/ holds faces made with --isCrop=False --img_size=64 (as its '
                           'celeba_preprocess.json records), not --isCrop=False --img_size=32; give another '
                           '--output_dir, or pass --img_size=64 to add to them\n')
    assert folder_state(full[0]) == before


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
    (tmp_path / 'out' / SETTINGS_FILE).unlink()  # as an older celeba_preprocess.py left it
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


# ---------------------------------------------------------------- kills, SIGTERM and failed writes

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


def test_a_sigterm_ends_the_preprocessing_with_one_line(tmp_path):
    (tmp_path / 'many' / 'img_align_celeba').mkdir(parents=True)
    face = fake_face(1)
    for i in range(1, 3001):
        (tmp_path / 'many' / 'img_align_celeba' / name_of(i)).write_bytes(face)
    write_txt(tmp_path / 'many' / 'list_attr_celeba.txt', 3000)
    args = [sys.executable, str(REPO / 'celeba_preprocess.py'), '--celeba_dir=many', '--output_dir=out', '--workers=2']
    proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((tmp_path / 'out' / 'male').is_dir() and
                                          len(os.listdir(tmp_path / 'out' / 'male')) >= 20):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.startswith('error: stopped by SIGTERM') and stderr.count('\n') == 1


def test_a_dead_preprocessing_worker_ends_the_run_with_one_line_and_a_rerun_finishes(tmp_path):
    count = 3000
    faces = [fake_face(i) for i in range(1, 31)]
    (tmp_path / 'many' / 'img_align_celeba').mkdir(parents=True)
    for i in range(1, count + 1):
        (tmp_path / 'many' / 'img_align_celeba' / name_of(i)).write_bytes(faces[i % 30])
    write_txt(tmp_path / 'many' / 'list_attr_celeba.txt', count)
    args = [sys.executable, str(REPO / 'celeba_preprocess.py'), '--celeba_dir=many', '--output_dir=out', '--workers=2']
    proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        written = sum(len(os.listdir(tmp_path / 'out' / c)) for c in ('female', 'male')
                      if (tmp_path / 'out' / c).is_dir())
        workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        if written >= 20 and workers:
            os.kill(int(workers[0]), signal.SIGKILL)  # as the out-of-memory killer would
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr.startswith('error: a worker process died (killed, or out of memory) after ') and \
        stderr.endswith('run the same command again: it converts those not written yet\n') and stderr.count('\n') == 1
    again = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sum(len([n for n in os.listdir(tmp_path / 'out' / c) if n.endswith('.jpg')]) for c in ('female', 'male')) \
        == count


def test_celeba_preprocess_on_a_full_disk_stops_with_one_line_and_no_partial_face(tmp_path):
    write_images(str(tmp_path / 'celeba' / 'img_align_celeba'))
    write_txt(str(tmp_path / 'celeba' / 'list_attr_celeba.txt'), LISTED)

    def full_at_a_kilobyte():  # no 64x64 face fits: PIL's JPEG encoder would write the first 1000 bytes, silently
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    result = run_script('celeba_preprocess.py', '--celeba_dir=celeba', '--output_dir=out', '--workers=1',
                        cwd=tmp_path, preexec_fn=full_at_a_kilobyte)
    assert result.returncode == 1
    assert result.stderr == ('error: cannot write out/female/000001.jpg (File too large); free some space '
                             '(or lift the limit on file sizes), then run the same command again\n')
    written = [path for path in (tmp_path / 'out').rglob('*') if path.is_file()]
    assert written == [tmp_path / 'out' / 'celeba_preprocess.json']  # its settings, and no cut face, no temp file


def test_after_a_failed_write_the_preprocessing_workers_skip_the_rest_and_end_without_terminate(tmp_path):
    import celeba_preprocess
    source = tmp_path / 'face.jpg'
    source.write_bytes(fake_face(1))
    jobs = [(f'{i:06d}.jpg', str(source), str(tmp_path / 'no_such_folder' / f'{i:06d}.jpg')) for i in range(800)]
    results = celeba_preprocess.convert_all(jobs, None, 64, False, processes=1)
    problems = [problem for _, problem, _ in results]
    assert len(results) == len(jobs) and set(problems) == {'unwritable', 'skipped'}
    assert problems.count('skipped') >= 400  # the flag stopped the worker within its next 64-image chunk or two
    error = results[0][2]
    assert (error.errno, error.filename) == (errno.ENOENT, jobs[0][2])
    assert multiprocessing.active_children() == []  # closed and joined


# ---------------------------------------------------------------- bad input: one line

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


@pytest.mark.parametrize('make, line', [
    (lambda root: (root / 'list_attr_celeba.txt').mkdir(),
     "cannot read {root}/list_attr_celeba.txt (Is a directory); it should be CelebA's attribute file, readable"),
    (lambda root: (root / 'img_align_celeba').write_text('a file'),
     "cannot read {root}/img_align_celeba (Not a directory); it should be CelebA's folder of faces, readable"),
    (lambda root: (root / 'img_align_celeba.zip').mkdir(),
     "cannot read {root}/img_align_celeba.zip (Is a directory); it should be the zip of CelebA's faces, readable"),
], ids=['attributes_a_folder', 'images_a_file', 'zip_a_folder'])
def test_celeba_as_downloaded_but_of_the_wrong_kind_is_one_line(tmp_path, make, line):
    root = tmp_path / 'celeba'
    root.mkdir()
    make(root)
    if not (root / 'list_attr_celeba.txt').exists():
        write_txt(root / 'list_attr_celeba.txt', 3)
    if not any((root / name).exists() for name in ('img_align_celeba', 'img_align_celeba.zip')):
        (root / 'img_align_celeba').mkdir()
    result = run_script('celeba_preprocess.py', '--celeba_dir=celeba', '--output_dir=out', cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, f"error: {line.format(root='celeba')}\n")
