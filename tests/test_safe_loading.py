"""Files a user may have downloaded (generator weights, checkpoints, the classifier's weights) are read as tensors
only: a pickle carrying code is refused with one line, and its code never runs."""
import ast
import os

import pytest
import torch

from conftest import REPO, run_in_process, write_faces

SCRIPTS = {'mnist_gan.py': 'MNIST_GAN', 'mnist_cgan.py': 'MNIST_cGAN', 'mnist_dcgan.py': 'MNIST_DCGAN',
           'mnist_cdcgan.py': 'MNIST_cDCGAN', 'celeba_dcgan.py': 'CelebA_DCGAN', 'celeba_cdcgan.py': 'CelebA_cDCGAN'}


class Payload:
    """Unpickling this makes a folder: the visible trace of code run by loading a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_booby_trap(path, marker):
    """A file torch.save wrote, shaped like the state_dict (or checkpoint) expected, that runs code when unpickled."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'weight': Payload(marker), 'models': Payload(marker)}, path)


def assert_refused_in_one_line(stop, capsys, path, marker):
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and error.startswith('error: ') and str(path) in error
    assert not os.path.exists(marker), 'loading the file ran the code it carried'


def test_every_torch_load_in_the_code_reads_weights_only():
    """No other loader than torch.load(..., weights_only=True) in the scripts: no pickle, no numpy pickles."""
    for source in sorted(REPO.glob('*.py')):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f'{source.name}:{node.lineno}: {ast.unparse(node)}'
            assert name not in ('pickle.load', 'pickle.loads', 'pickle.Unpickler'), where
            keywords = {k.arg: k.value for k in node.keywords}
            if name == 'torch.load':
                assert isinstance(keywords.get('weights_only'), ast.Constant), where
                assert keywords['weights_only'].value is True, where
            if name.endswith('.load') and 'allow_pickle' in keywords:
                assert ast.literal_eval(keywords['allow_pickle']) is False, where


def data_args(script, mnist_dir, tmp_path):
    if script.startswith('mnist'):
        return [f'--data_dir={mnist_dir}', '--quality_samples=0']
    write_faces(tmp_path / 'faces', {'female': 2, 'male': 2})
    return [f'--data_dir={tmp_path / "faces"}']


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_generate_refuses_a_generator_file_carrying_code(script, tmp_path, capsys):
    marker = tmp_path / 'code_ran'
    for kind in ('generator', 'generator_best'):  # whichever --generate picks
        write_booby_trap(tmp_path / 'out' / f'{SCRIPTS[script]}_{kind}.pt', marker)
    with pytest.raises(SystemExit) as stop:
        run_in_process(script, f'--results_dir={tmp_path / "out"}', '--generate=4', '--device=cpu')
    assert_refused_in_one_line(stop, capsys, tmp_path / 'out', marker)


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_resume_refuses_a_checkpoint_carrying_code(script, mnist_dir, tmp_path, capsys):
    marker = tmp_path / 'code_ran'
    write_booby_trap(tmp_path / 'out' / 'checkpoint.pt', marker)
    width = ['--d=8'] if 'dcgan' in script else []
    with pytest.raises(SystemExit) as stop:
        run_in_process(script, *data_args(script, mnist_dir, tmp_path), f'--results_dir={tmp_path / "out"}',
                       '--batch_size=2', '--device=cpu', *width)
    assert_refused_in_one_line(stop, capsys, tmp_path / 'out' / 'checkpoint.pt', marker)


def test_the_quality_classifier_refuses_weights_carrying_code(mnist_dir, tmp_path, capsys):
    from plumbing.mnist_quality import MnistQuality
    marker = tmp_path / 'code_ran'
    write_booby_trap(tmp_path / 'classifier.pt', marker)
    with pytest.raises(SystemExit) as stop:
        MnistQuality(str(mnist_dir), 28, 'cpu', weights=str(tmp_path / 'classifier.pt'))
    assert_refused_in_one_line(stop, capsys, tmp_path / 'classifier.pt', marker)
