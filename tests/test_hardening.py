"""Nothing silently wrong, nothing lost (issue #11): ranges of the constants, one run per results folder,
an epoch line only after its checkpoint, honest messages, failed writes and damaged data as one line.

Runs that stop at once go through the script server (a fresh process each, without loading torch each
time); what needs a process of its own (two at once, a kill, a Ctrl-C, a file size limit) starts one.
"""
import errno
import gzip
import multiprocessing
import os
import resource
import shutil

import pytest
import torch

from plumbing import celeba, data
from conftest import assert_refused, folder_state, run_script, tiny, write_faces


# ---------------------------------------------------------------- 1. every constant in its range

# ---------------------------------------------------------------- 2. one run per results folder


# ---------------------------------------------------------------- 3. honest order and messages

# ---------------------------------------------------------------- 4. failed writes


def test_celeba_preprocess_on_a_full_disk_stops_with_one_line_and_no_partial_face(tmp_path):
    from test_celeba_preprocess import LISTED, write_images, write_txt
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
    from test_celeba_preprocess import fake_face
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


# ---------------------------------------------------------------- 5. damaged data

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


def test_a_script_on_a_damaged_mnist_file_stops_before_writing(work, script_server, mnist_dir):
    data = work / 'data'
    shutil.copytree(mnist_dir, data)
    (data / 'MNIST' / 'raw' / (IMAGES + '.gz')).write_bytes(b'')
    before = folder_state(work / 'out')
    assert_refused(script_server('mnist_gan.py', tiny(data, 'out', 2), work), 1,
                   f'{data}/MNIST/raw/{IMAGES}.gz is damaged: it is empty; replace it with a good copy, '
                   f'or delete it to download MNIST again')
    assert folder_state(work / 'out') == before


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


def test_a_folder_where_the_cache_belongs_is_one_line(tmp_path, capsys):
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    (tmp_path / 'faces.u8').mkdir()
    with pytest.raises(SystemExit):
        celeba.image_folder_tensor(str(tmp_path / 'faces'), 64, 'cmd')
    assert capsys.readouterr().err == (f'error: cannot write {tmp_path}/faces.u8 (Is a directory); a folder stands '
                                       f'where the file should be; move it away or choose another folder\n')
    assert sorted(os.listdir(tmp_path)) == ['faces', 'faces.u8']
