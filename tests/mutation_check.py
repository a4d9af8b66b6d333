"""Plant one bug at a time in a copy of the repository and report which of them the tests catch.

    python tests/mutation_check.py                 # every mutant (a few minutes on 2 cores)
    python tests/mutation_check.py -k shuffl       # only the mutants whose name contains 'shuffl'
    python tests/mutation_check.py --list          # the mutants and the tests each is given to

Each mutant is data: a name, a file, an exact snippet of the original code, its replacement, and the pytest
arguments selecting the tests that should catch it. The repository's files as they are in the working tree
(tracked, and untracked but not ignored) are copied to a temporary folder once; for each mutant its snippet is
replaced there, the selected tests run with -x and a time limit, and the file is restored. A snippet missing
from its file (the code was refactored) is reported as such, never as caught or missed: update the mutant.
Finally every test that caught a mutant runs once more on the unmutated copy: a test failing there caught
nothing, and is reported. Not named test_*.py, so pytest does not collect it.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: list  # pytest arguments: test files, node ids, -k expressions


def loop(file, *keywords):
    """Tests of tests/test_training_loop.py for one script, chosen by keywords of their names."""
    return ['tests/test_training_loop.py', '-k', f"{file[:-3]} and ({' or '.join(keywords)})"]


MUTANTS = [
    # The seven bugs of issue #12.
    Mutant('MNIST cDCGAN: D ignores its label planes', 'mnist_cdcgan.py',
           'h = torch.cat([self.image_branch(x), self.label_branch(planes)], dim=1)',
           'h = torch.cat([self.image_branch(x), self.label_branch(torch.zeros_like(planes))], dim=1)',
           ['tests/test_conditioning.py', '-k', 'mnist_cdcgan']),
    Mutant('cGAN: D sees real images with random labels', 'mnist_cgan.py',
           'd_real, d_fake = D(noisy(x), y), D(noisy(fake.detach()), fake_labels)',
           'd_real, d_fake = D(noisy(x), torch.randint_like(y, N_CLASSES)), D(noisy(fake.detach()), fake_labels)',
           loop('mnist_cgan.py', 'real_images_reach')),
    Mutant('CelebA cDCGAN: morphing image with every row female', 'celeba_cdcgan.py',
           "common.sample(G_ema, fixed['morph_z'], fixed['morph_labels'])",
           "common.sample(G_ema, fixed['morph_z'], torch.zeros_like(fixed['morph_labels']))",
           ['tests/test_celeba_outputs.py', '-k', 'celeba_cdcgan and morphing']),
    Mutant('cDCGAN: lr schedule loses its drop at epoch 16', 'mnist_cdcgan.py',
           'for drop in (11, 16))', 'for drop in (11,))',
           loop('mnist_cdcgan.py', 'learning_rate', 'scheduled_rate')),
    Mutant('no shuffling: batches in file order every epoch', 'plumbing/data.py',
           'order = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch)))).to(device)',
           'order = torch.arange(n, device=device)',
           ['tests/test_data.py', 'tests/test_training_loop.py', '-k',
            'shuffled_batches or (mnist_gan and fresh_permutation)']),
    Mutant('generator loader: torch.load(..., weights_only=False)', 'plumbing/safe_files.py',
           "return torch.load(f, map_location='cpu', weights_only=True)",
           "return torch.load(f, map_location='cpu', weights_only=False)",
           ['tests/test_checkpoint_and_resume.py', '-k', 'generate_refuses']),
    Mutant('best generator kept by the highest fid', 'plumbing/results_folder.py',
           "best = self.best()\n        if best is not None and best['epoch'] == epoch:",
           "best = max((h for h in self.history if 'fid' in h), key=lambda h: h['fid'], default=None)\n"
           "        if best is not None and best['epoch'] == epoch:",
           ['tests/test_mnist_outputs.py', '-k', 'lowest_fid']),
    # The end-to-end tests alone catch a discriminator blind to the label: the samples lose their class.
    Mutant('MNIST cDCGAN: D ignores its label planes (end-to-end test only)', 'mnist_cdcgan.py',
           'h = torch.cat([self.image_branch(x), self.label_branch(planes)], dim=1)',
           'h = torch.cat([self.image_branch(x), self.label_branch(torch.zeros_like(planes))], dim=1)',
           ['tests/test_conditioning.py', '-k', 'mnist_cdcgan and short_training']),
    Mutant('CelebA cDCGAN: D ignores its label planes (end-to-end test only)', 'celeba_cdcgan.py',
           'h = torch.cat([self.image_branch(x), self.label_branch(planes)], dim=1)',
           'h = torch.cat([self.image_branch(x), self.label_branch(torch.zeros_like(planes))], dim=1)',
           ['tests/test_conditioning.py', '-k', 'requested_gender']),
    # More in the same spirit.
    Mutant('cGAN: G ignores its label', 'mnist_cgan.py',
           'h = torch.cat([self.z_branch(z), self.label_branch(y)], dim=1)',
           'h = torch.cat([self.z_branch(z), self.label_branch(torch.zeros_like(y))], dim=1)',
           ['tests/test_conditioning.py', '-k', 'mnist_cgan']),
    Mutant('MNIST cDCGAN: D label planes for the wrong class', 'mnist_cdcgan.py',
           'planes = F.one_hot(labels, N_CLASSES)', 'planes = F.one_hot((labels + 1) % N_CLASSES, N_CLASSES)',
           ['tests/test_conditioning.py', '-k', 'mnist_cdcgan and not short']),
    Mutant('cGAN: D judges fakes against the real batch\'s labels', 'mnist_cgan.py',
           'd_real, d_fake = D(noisy(x), y), D(noisy(fake.detach()), fake_labels)',
           'd_real, d_fake = D(noisy(x), y), D(noisy(fake.detach()), y)',
           loop('mnist_cgan.py', 'fake_images_reach')),
    Mutant('cDCGAN: G step trained towards zeros instead of ones', 'mnist_cdcgan.py',
           'loss_g = loss(D(noisy(fake), fake_labels), torch.ones_like(real_target))',
           'loss_g = loss(D(noisy(fake), fake_labels), torch.zeros_like(real_target))',
           loop('mnist_cdcgan.py', 'documented_losses')),
    Mutant('DCGAN: the EMA of G is never updated', 'mnist_dcgan.py',
           'G_ema.update_parameters(G)', 'pass',
           loop('mnist_dcgan.py', 'moving_average')),
    Mutant('DCGAN: Fixed grid drawn from fresh noise', 'mnist_dcgan.py',
           "fixed_grid=(common.sample(G_ema, fixed['z']), 5)",
           "fixed_grid=(common.sample(G_ema, noise(25, run.device)), 5)",
           ['tests/test_mnist_outputs.py', '-k', 'mnist_dcgan and fixed_grid']),
    Mutant('GAN: Random grid drawn from the fixed noise', 'mnist_gan.py',
           "random_grid=(common.sample(G_ema, noise(25, run.device)), 5)",
           "random_grid=(common.sample(G_ema, fixed['z']), 5)",
           ['tests/test_mnist_outputs.py', '-k', 'mnist_gan and random_grid']),
    Mutant('cGAN: grid rows cycle through the digits, not one digit a row', 'mnist_cgan.py',
           'labels = torch.arange(N_CLASSES, device=device).repeat_interleave(columns)',
           'labels = torch.arange(N_CLASSES, device=device).repeat(columns)',
           ['tests/test_mnist_outputs.py', '-k', 'mnist_cgan and fixed_grid']),
    Mutant('CelebA cDCGAN: 4x4 grid drawn all female', 'celeba_cdcgan.py',
           "(common.sample(G_ema, fixed['z'], fixed['labels']), 4)",
           "(common.sample(G_ema, fixed['z'], torch.zeros_like(fixed['labels'])), 4)",
           ['tests/test_celeba_outputs.py', '-k', 'celeba_cdcgan and fixed_grid']),
    Mutant('CelebA cDCGAN: --generate draws both rows female', 'celeba_cdcgan.py',
           'z, labels = gender_rows(noise(generate, run.device).view(1, generate, z_dim))',
           'z, labels = gender_rows(noise(generate, run.device).view(1, generate, z_dim)); labels = 0 * labels',
           ['tests/test_celeba_outputs.py', '-k', 'celeba_cdcgan and generate_draws']),
    Mutant('shuffled_batches keeps a partial batch', 'plumbing/data.py',
           'batches = order[:n // batch_size * batch_size].view(-1, batch_size)',
           'batches = torch.cat([order, order[:-n % batch_size]]).view(-1, batch_size)',
           ['tests/test_data.py', '-k', 'shuffled_batches']),
    Mutant('batches drawn once, the same order every epoch', 'plumbing/run.py',
           "batches = shuffled_batches(len(images), config['batch_size'], images.device, config['seed'], self.epoch)",
           "batches = shuffled_batches(len(images), config['batch_size'], images.device, config['seed'], "
           "self.first_epoch)",
           loop('mnist_gan.py', 'fresh_permutation')),
    Mutant('optimizers keep the initial lr (schedule computed, not applied)', 'plumbing/run.py',
           "group['lr'] = learning_rate(epoch)", "learning_rate(epoch)",
           loop('celeba_cdcgan.py', 'learning_rate', 'scheduled_rate')),
    Mutant('checkpoint loader: torch.load(..., weights_only=False)', 'plumbing/safe_files.py',
           "return torch.load(f, map_location='cpu', weights_only=True)",
           "return torch.load(f, map_location='cpu', weights_only=False)",
           ['tests/test_checkpoint_and_resume.py', '-k', 'resume_refuses_a_checkpoint']),
    Mutant('resume forgets the random state', 'plumbing/results_folder.py',
           "torch.set_rng_state(streams[rank()]['cpu'])", 'pass',
           ['tests/test_mnist_outputs.py', '-k', 'mnist_gan and resumed_run']),
    Mutant('resume accepts a changed experiment constant', 'plumbing/results_folder.py',
           'if k not in self.MAY_CHANGE_ON_RESUME]', 'if False]',
           ['tests/test_checkpoint_and_resume.py', '-k', 'refuses_a_changed_experiment_constant']),
    Mutant('torch files loaded without their checksums checked', 'plumbing/safe_files.py',
           'damaged = zipfile.ZipFile(f).testzip()', 'damaged = None',
           ['tests/test_checkpoint_and_resume.py', '-k', 'flipped_bytes']),
    Mutant('the CelebA cache trusted without its checksum', 'plumbing/celeba.py',
           "if file_crc32(data_path) == stored_index(data_path).get('crc32'):", 'if True:',
           ['tests/test_data.py', '-k', 'zeroed_stretch']),
    Mutant('cGAN: the original\'s lr drops whatever constant_lr says', 'mnist_cgan.py',
           'return lr if constant_lr else lr / 10 ** sum(epoch >= drop for drop in (30, 40))',
           'return lr / 10 ** sum(epoch >= drop for drop in (30, 40))',
           ['tests/test_training_loop.py', '-k', 'keeps_its_learning_rate']),
    # Issue 26's instance noise.
    Mutant('cGAN: D sees the fakes of its own step without the noise', 'mnist_cgan.py',
           'D(noisy(fake.detach()), fake_labels)', 'D(fake.detach(), fake_labels)',
           ['tests/test_training_loop.py', '-k', 'mnist_cgan and instance_noise']),
    Mutant('cDCGAN: G learns from D\'s view of its fakes without the noise', 'mnist_cdcgan.py',
           'loss_g = loss(D(noisy(fake), fake_labels)', 'loss_g = loss(D(fake, fake_labels)',
           ['tests/test_training_loop.py', '-k', 'mnist_cdcgan and instance_noise']),
    Mutant('cGAN: one noise image for the whole batch', 'mnist_cgan.py',
           'instance_noise * torch.randn_like(images)', 'instance_noise * torch.randn_like(images[:1])',
           ['tests/test_training_loop.py', '-k', 'mnist_cgan and instance_noise']),
    Mutant('cGAN: trains without instance noise by default', 'mnist_cgan.py',
           'instance_noise = 0.1  ', 'instance_noise = 0.0  ',
           ['tests/test_training_loop.py', '-k', 'mnist_cgan and instance_noise']),
    Mutant('cDCGAN: trains without instance noise by default', 'mnist_cdcgan.py',
           'instance_noise = 0.2  ', 'instance_noise = 0.0  ',
           ['tests/test_training_loop.py', '-k', 'mnist_cdcgan and instance_noise']),
    Mutant('cDCGAN: the noise the cGAN uses, too little at d = 128', 'mnist_cdcgan.py',
           'instance_noise = 0.2  ', 'instance_noise = 0.1  ',
           ['tests/test_training_loop.py', '-k', 'mnist_cdcgan and instance_noise']),
    # Issue 24's guards.
    Mutant('under torchrun every process checks the CelebA cache for itself', 'plumbing/celeba.py',
           "    decode = writes_files() and not cache_is_sound(index, data_path)\n"
           "    if decode and os.path.exists(data_path + '.json'):\n"
           "        os.remove(data_path + '.json')\n"
           "    barrier()\n",
           "    barrier()\n"
           "    decode = writes_files() and not cache_is_sound(index, data_path)\n",
           ['tests/test_data.py', '-k', 'under_torchrun_a_damaged_cache']),
    Mutant('a fresh start removes another model\'s checkpoint', 'plumbing/results_folder.py',
           'owner = None if resume else checkpoint_owner(self.checkpoint_path)', 'owner = None',
           ['tests/test_mnist_outputs.py', '-k', 'another_models_checkpoint']),
    Mutant('animations written with durations in seconds, which GIF readers take as milliseconds', 'plumbing/images.py',
           "duration=1000 * seconds_per_frame", "duration=seconds_per_frame",
           ['tests/test_mnist_outputs.py', '-k', 'half_a_second']),
    Mutant('a resume leaves the files made from the checkpoint as a kill left them', 'plumbing/results_folder.py',
           "            self._write_what_the_checkpoint_makes()\n            return first_epoch",
           "            return first_epoch",
           ['tests/test_mnist_outputs.py', '-k', 'kill_after_any_write']),
    Mutant('resume forgets the optimizers\' state', 'plumbing/results_folder.py',
           "optimizer.load_state_dict(state['optimizers'][name])", 'pass',
           ['tests/test_celeba_outputs.py', '-k', 'resumed_run']),
    # benchmarks/gpu_check.py
    Mutant('GPU check: a Ctrl-C leaves the running checks\' runs going', 'benchmarks/gpu_check.py',
           '        for process in list(running):\n            end_group(process)\n', '',
           ['tests/test_gpu_check.py', '-k', 'ctrl_c']),
    Mutant('GPU check: a Ctrl-C waits for the job the main thread waits on', 'benchmarks/gpu_check.py',
           'concurrent.futures.wait(futures.values(), timeout=0.2)', 'concurrent.futures.wait(futures.values())',
           ['tests/test_gpu_check.py', '-k', 'ctrl_c']),
    Mutant('GPU check: the queued checks start after a Ctrl-C', 'benchmarks/gpu_check.py',
           '    if interrupted.is_set():\n        return Ran(None, \'\', "not started: interrupted", 0.0)\n', '',
           ['tests/test_gpu_check.py', '-k', 'ctrl_c']),
    # Issue 25: the CelebA runs' Inception FID.
    Mutant('CelebA FID: each gender\'s statistics made of the other gender\'s faces', 'plumbing/celeba_fid.py',
           'moments[name].add(found[labels[batch] == label])', 'moments[name].add(found[labels[batch] != label])',
           ['tests/test_celeba_fid.py', '-k', 'torch_fidelity_s_own']),
    Mutant('CelebA FID: each gender\'s samples scored as the other gender\'s', 'plumbing/celeba_fid.py',
           'moments[name].add(found[(part[1] == label).to(found.device)])',
           'moments[name].add(found[(part[1] != label).to(found.device)])',
           ['tests/test_celeba_fid.py', '-k', 'torch_fidelity_s_own']),
    Mutant('CelebA FID: the statistics kept when the faces or the weights change', 'plumbing/celeba_fid.py',
           'current = isinstance(state, dict) and {k: state.get(k) for k in key} == key',
           'current = isinstance(state, dict)',
           ['tests/test_celeba_fid.py', '-k', 'statistics_are_made_once']),
    Mutant('CelebA FID: the statistics kept under another torch-fidelity', 'plumbing/celeba_fid.py',
           "'torch_fidelity': importlib.metadata.version('torch-fidelity')}", '}',
           ['tests/test_celeba_fid.py', '-k', 'another_torch_fidelity']),
    Mutant('CelebA FID: damaged statistics trusted', 'plumbing/celeba_fid.py',
           'intact = zipfile.ZipFile(f).testzip() is None', 'intact = True',
           ['tests/test_celeba_fid.py', '-k', 'damaged_statistics']),
    Mutant('CelebA FID: other weights than the published ones accepted from torch\'s folder', 'plumbing/celeba_fid.py',
           'if digest != WEIGHTS_SHA256:', 'if False:',
           ['tests/test_celeba_fid.py', '-k', 'not_the_published_weights']),
    Mutant('CelebA FID: a resume under other Inception weights accepted', 'plumbing/results_folder.py',
           "if scored_with and self.yardstick and scored_with['sha256'] != self.yardstick['sha256']:", 'if False:',
           ['tests/test_celeba_fid.py', '-k', 'resume_under_other_weights']),
    Mutant('CelebA FID: under torchrun every process computes the statistics', 'plumbing/celeba_fid.py',
           'compute = writes_files() and statistics is None', 'compute = statistics is None',
           ['tests/test_celeba_fid.py', '-k', 'torchrun']),
    Mutant('CelebA FID: weights carrying code handed to torch-fidelity unchecked', 'plumbing/celeba_fid.py',
           '    load_state_dict(path, remedy)\n', '',
           ['tests/test_celeba_fid.py', '-k', 'carrying_code']),
    Mutant('CelebA DCGAN: only the last epoch scored', 'celeba_dcgan.py',
           'scored = quality and (epoch % quality_every == 0 or epoch == train_epoch)',
           'scored = quality and epoch == train_epoch',
           ['tests/test_celeba_fid.py', '-k', 'celeba_dcgan and each_scored_epoch']),
]


def repository_files():
    """The working tree's files that git tracks or would track: what a commit of the current state would hold."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return sorted({path for path in listed.split('\0') if path and (REPO / path).is_file()})


def copy_repository(target):
    for path in repository_files():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, target / path)


def run_tests(copy, arguments, timeout):
    """pytest in the copy: (exit status or None on timeout, ids of the failed tests, seconds, output)."""
    # No bytecode: a mutated and a restored file of the same size, written within a second, share an mtime.
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONDONTWRITEBYTECODE': '1'}
    command = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', '-rfE', *arguments]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, [], time.perf_counter() - start, ''
    failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', done.stdout, re.MULTILINE)
    return done.returncode, failed, time.perf_counter() - start, done.stdout + done.stderr


def check(mutant, copy, timeout):
    """(verdict, catching test or detail, seconds) of one mutant."""
    path = copy / mutant.file
    source = path.read_text()
    found = source.count(mutant.original)
    if found != 1:
        return ('snippet not found — update the mutant' if found == 0 else
                f'snippet found {found} times — make it unique'), '', 0.0
    path.write_text(source.replace(mutant.original, mutant.replacement))
    try:
        status, failed, seconds, output = run_tests(copy, mutant.tests, timeout)
    finally:
        path.write_text(source)
    if status is None:
        return f'timed out after {timeout} s', '', seconds
    if status == 1:
        return 'caught', ', '.join(failed) or '?', seconds
    if status == 0:
        return 'MISSED', '', seconds
    if status == 5:
        return 'no tests selected — update the mutant', '', seconds
    last = output.strip().splitlines()[-1] if output.strip() else ''
    return f'error (pytest exit {status})', last, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-k', default='', help='only the mutants whose name contains this (case-insensitive)')
    parser.add_argument('--list', action='store_true', help='list the mutants and their tests, run nothing')
    parser.add_argument('--timeout', type=int, default=300, help='seconds for one mutant\'s tests')
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    {m.file}: {m.original!r}\n    -> {m.replacement!r}\n    pytest {' '.join(m.tests)}")
        return 0

    rows, catchers = [], set()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='mutation_check_') as folder:
        copy = Path(folder)
        copy_repository(copy)
        for m in mutants:
            verdict, detail, seconds = check(m, copy, args.timeout)
            print(f"{m.name}: {verdict} {detail} ({seconds:.0f} s)", flush=True)
            rows.append((m.name, verdict, detail, seconds))
            if verdict == 'caught':
                catchers.update(test for test in detail.split(', ') if '::' in test)
        # A test that fails on the unmutated code caught nothing.
        status, broken, unmutated_seconds, output = (run_tests(copy, sorted(catchers), args.timeout) if catchers
                                                      else (0, [], 0.0, ''))
    passed = re.search(r'(\d+) passed', output)
    if status != 0:
        broken = broken or ['(the run did not finish)']
        rows = [(name, 'NOT A CATCH: fails unmutated' if set(detail.split(', ')) & set(broken) else verdict,
                 detail, sec) for name, verdict, detail, sec in rows]

    print('\n| mutant | caught? | by which test | seconds |\n|---|---|---|---|')
    for name, verdict, detail, seconds in rows:
        print(f"| {name} | {verdict} | {detail.replace('|', '/')} | {seconds:.0f} |")
    caught = sum(verdict == 'caught' for _, verdict, _, _ in rows)
    print(f"\n{caught} of {len(rows)} mutants caught; the {len(catchers)} catching tests pass unmutated: "
          f"{'yes' if status == 0 else 'NO: ' + ', '.join(broken)} ({passed.group(1) if passed else 0} passed in "
          f"{unmutated_seconds:.0f} s); {time.perf_counter() - started:.0f} s in all")
    return 0 if caught == len(rows) and status == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
