"""Nothing silently wrong, nothing lost (issue #11): ranges of the constants, one run per results folder,
an epoch line only after its checkpoint, honest messages, failed writes and damaged data as one line.

Runs that stop at once go through the script server (a fresh process each, without loading torch each
time); what needs a process of its own (two at once, a kill, a Ctrl-C, a file size limit) starts one.
"""
import errno
import multiprocessing
import resource

from conftest import run_script


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
