"""The yardstick of the CelebA generators: the Inception FID as papers report it, through torch-fidelity (its
Inception-v3 with the TensorFlow weights of 2015-12-05, TensorFlow 1's resizing to 299x299, the 2048 pool
features), against the statistics of all the faces of a folder, computed once and kept beside it.

    quality = CelebaFid('data/resized_celebA', weights='', device='cpu', by_gender=True)
    quality.score(G, z)  ->  {'fid': ..., 'fid_female': ..., 'fid_male': ...}
"""
import importlib.metadata
import http.client
import io
import math
import os
import socket
import sys
import time
import warnings
import zipfile

import torch

from plumbing.celeba import CLASSES, cache_path, scan_image_folder, stored_index
from plumbing.console import fail, progress
from plumbing.distributed import barrier, rank, world_size, writes_files
from plumbing.frechet import Moments, frechet_distance, sqrtm_psd
from plumbing.images import sample
from plumbing.safe_files import file_sha256, load_state_dict, load_torch, make_folder, save_torch

# The sha256 of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes): the file's name
# publishes its first 8 digits, as torch.hub names files; the whole digest is as other projects record it.
WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
EXTRACTOR, FEATURES = 'inception-v3-compat', '2048'  # torch-fidelity's names of the network and its pool features
BATCH = 50             # images per Inception pass: bounds memory (0.7 GB of activations on a CPU), not results
DOWNLOAD_TIMEOUT = 60  # seconds a download may wait on a silent network before it counts as failed, not a hang
NO_SCORES = "or pass --quality_samples=0 to train without scores"


def inception_v3():
    """torch-fidelity's module of its Inception-v3, or one line saying how to install it."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3
    except ImportError:
        fail(f"scoring the faces needs torch-fidelity: pip install -r requirements.txt (it is there), {NO_SCORES}")
    return feature_extractor_inceptionv3


def weights_url():
    return inception_v3().URL_INCEPTION_V3


def hub_weights_path():
    """Where torch-fidelity's own download keeps the weights: torch.hub's checkpoints folder."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights_url()))


def weights_sha256(path):
    return file_sha256(path, f"fix that, {NO_SCORES}", described=f"the Inception weights {path}")


def download_weights(path):
    """torch-fidelity's weights into path, from its address, with their digest checked; one line if that fails."""
    url = weights_url()
    print(f"downloading the Inception weights (96 MB) from {url} to {path}", flush=True)
    make_folder(os.path.dirname(path))
    default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # torch.hub's urlopen has none: a silent network would hang it
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=WEIGHTS_SHA256, progress=sys.stdout.isatty())
    except (OSError, http.client.HTTPException, RuntimeError) as e:  # no network; a broken or a wrong download
        fail(f"no Inception weights to score the faces with: {path} is missing and downloading it from {url} failed "
             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no reason given'}); on a machine with "
             f"internet download that file, then put it there or pass --inception_weights=FILE, {NO_SCORES}")
    finally:
        socket.setdefaulttimeout(default)


def wait_for(path):
    """Under torchrun the processes other than rank 0 wait here while it makes path: by polling, not in a
    collective, which would time out (PROCESS_GROUP_TIMEOUT) long before hours of work on a CPU end."""
    while not os.path.exists(path):
        time.sleep(1)


def inception_weights(given):
    """(path, sha256) of the weights to score with: given (--inception_weights), any file of the architecture,
    or else torch-fidelity's file in torch.hub's folder, downloaded there on first use (by rank 0 under
    torchrun) and refused unless its digest is the published one."""
    if given:
        if not os.path.isfile(given):
            fail(f"--inception_weights={given}: no such file; pass torch-fidelity's "
                 f"{os.path.basename(weights_url())} (from {weights_url()}), {NO_SCORES}")
        digest = weights_sha256(given)
        if digest != WEIGHTS_SHA256 and writes_files():
            print(f"{given} is not torch-fidelity's Inception weights of 2015-12-05 (sha256 {digest[:12]}..., not "
                  f"{WEIGHTS_SHA256[:12]}...): its FIDs do not compare with published ones", flush=True)
        return given, digest
    path = hub_weights_path()
    if writes_files() and not os.path.exists(path):
        download_weights(path)
    wait_for(path)
    digest = weights_sha256(path)
    if digest != WEIGHTS_SHA256:
        fail(f"{path} is not torch-fidelity's Inception weights of 2015-12-05 (sha256 {digest[:12]}..., not "
             f"{WEIGHTS_SHA256[:12]}...): damaged, or another file; delete it and it is downloaded again, or pass "
             f"other weights with --inception_weights=FILE, {NO_SCORES}")
    return path, digest


def load_inception(path, device):
    """torch-fidelity's Inception-v3 feature extractor with the weights at path, in eval mode on device."""
    remedy = f"pass torch-fidelity's {os.path.basename(weights_url())} with --inception_weights=FILE, {NO_SCORES}"
    # Read here first as weights only, after its checksums: torch-fidelity loads the file with
    # weights_only=False, which would run any code a crafted file holds.
    load_state_dict(path, remedy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # torch 2.4's on weights_only=False, checked above
            network = inception_v3().FeatureExtractorInceptionV3(EXTRACTOR, [FEATURES],
                                                                 feature_extractor_weights_path=path)
    except RuntimeError:  # load_state_dict's: other layers or shapes
        fail(f"{path} does not hold the weights of torch-fidelity's Inception-v3; {remedy}")
    # channels-last: oneDNN convolves it 1.5x faster (6.6-6.9 img/s against 4.3 on one thread of the Intel
    # Xeon with AMX, loaded, 2026-12-03); the features agree to float rounding
    return network.to(device, memory_format=torch.channels_last)


def write_stand_in_weights(path, seed=0):
    """A weights file of torch-fidelity's Inception-v3 with random values (seeded): what the tests and
    benchmarks score with where the real file cannot be had. Its FIDs are no one's to compare."""

    class Architecture(inception_v3().FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # the layers alone, their values drawn below
            return None

    nothing = io.BytesIO()
    torch.save({}, nothing)
    nothing.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = Architecture(EXTRACTOR, [FEATURES], feature_extractor_weights_path=nothing)
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):  # He's scale keeps the activations alive through 94 layers
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
    save_torch(network.state_dict(), path)


# ---------------------------------------------------------------- the statistics of the real faces

def statistics_path(folder):
    """Where the Inception statistics of folder's faces are kept: <folder>.fid.pt beside it."""
    return os.path.normpath(folder) + '.fid.pt'


def stored_statistics(path, key):
    """The statistics at path if they are sound and of key's faces and weights, else None: there are none,
    they are of other faces or weights, or damaged (their checksums do not match), and are computed again."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, 'rb') as f:
            intact = zipfile.ZipFile(f).testzip() is None
    except (zipfile.BadZipFile, EOFError, OSError):
        intact = False
    if not intact:
        print(f"{path} does not match its checksums (damaged): computing the statistics again", flush=True)
        return None
    state = load_torch(path, "delete it, and it is computed again")
    current = isinstance(state, dict) and {k: state.get(k) for k in key} == key
    return state['statistics'] if current else None


def folder_statistics(folder, weights_sha256, features):
    """{'all': ..., 'female': ..., 'male': ...}, each {'count', 'mu', 'sigma'}: the Gaussians of the Inception
    features (features(uint8 images)) of folder's faces, all and by gender, as load_celeba decoded them.

    Kept in <folder>.fid.pt with the decoded cache's fingerprint of the folder, the weights' digest and
    torch-fidelity's version (its resizing is part of the features), and computed again when any of them
    changes, or the file is damaged. Under torchrun rank 0 computes them while
    the others wait, as for the decoded cache.
    """
    index = stored_index(cache_path(folder))  # current: load_celeba has just checked it
    key = {'fingerprint': index['fingerprint'], 'shape': index['shape'], 'inception_sha256': weights_sha256,
           'torch_fidelity': importlib.metadata.version('torch-fidelity')}
    path = statistics_path(folder)
    statistics = stored_statistics(path, key) if writes_files() else None
    compute = writes_files() and statistics is None
    if compute and os.path.exists(path):
        os.remove(path)  # before the others pass the barrier, so that they wait for the new file
    barrier()
    if compute:
        _, _, labels, fingerprint = scan_image_folder(folder)
        if fingerprint != key['fingerprint']:
            fail(f"the faces in {folder}/ changed while this run started; run it again")
        images = torch.from_file(cache_path(folder), shared=False, size=math.prod(key['shape']),
                                 dtype=torch.uint8).view(key['shape'])
        print(f"computing the Inception statistics of the {len(images)} faces of {folder}/ once, into {path}; later "
              f"runs reuse them", flush=True)
        moments = {name: Moments(int(FEATURES), 'cpu') for name in ('all', *CLASSES)}
        with torch.no_grad():
            for batch in progress(torch.arange(len(images)).split(BATCH), 'Inception statistics'):
                found = features(images[batch]).cpu()
                moments['all'].add(found)
                for label, name in enumerate(CLASSES):
                    moments[name].add(found[labels[batch] == label])
        statistics = {name: m.gaussian() for name, m in moments.items()}
        save_torch({**key, 'statistics': statistics}, path)
    wait_for(path)
    return statistics if statistics is not None else stored_statistics(path, key)


# ---------------------------------------------------------------- scoring generated faces

def to_pixels(images):
    """Images in [-1, 1] as the uint8 pixels a PNG of them holds, what torch-fidelity's network reads."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


class CelebaFid:
    """Scores generated faces with the Inception FID against all the faces of data_dir (not train_limit's
    share), as load_celeba decoded them, and with by_gender each gender's samples against that gender's too.

    The yardstick a run is pinned to is the weights file's sha256: a resume under others is refused. The
    faces' statistics are read, or computed, at the first scoring: a refused resume costs no hours for them.
    """

    def __init__(self, data_dir, weights, device, by_gender=False):
        self.device, self.data_dir, self.by_gender = torch.device(device), data_dir, by_gender
        path, digest = inception_weights(weights)
        self.yardstick = {'inception_weights': path, 'sha256': digest}
        self.network = load_inception(path, self.device)
        self.statistics = None
        self.roots = {}  # the square roots of the faces' covariances, made at their first use

    @property
    def reference(self):
        """The statistics of data_dir's faces (folder_statistics), from the first call on."""
        if self.statistics is None:
            self.statistics = folder_statistics(self.data_dir, self.yardstick['sha256'], self.features)
        return self.statistics

    def features(self, pixels):
        """(N, 2048) pool features of uint8 images (N, 3, H, W), TensorFlow 1's resize to 299x299 included."""
        return self.network(pixels.to(self.device))[0]

    def genders(self, n):
        """n labels, female (0) then male (1), in the proportion of the folder's faces (but 2 of each at least,
        for a covariance)."""
        female = round(n * self.reference['female']['count'] / self.reference['all']['count'])
        female = min(max(female, 2), n - 2)
        return (torch.arange(n) >= female).long()

    @torch.no_grad()
    def score(self, G, z):
        """{'fid': ...} of G's faces for the noise z (N, z_dim), and with by_gender 'fid_female' and 'fid_male'
        of its faces of each gender (in the folder's proportion); NaN for a generator gone to NaN.

        Under torchrun each process scores its share of z and the moments are summed: every process gets
        the scores, in 1 / (processes) of the time.
        """
        inputs = [z] + ([self.genders(len(z)).to(z.device)] if self.by_gender else [])
        share = [x.tensor_split(world_size())[rank()] for x in inputs]
        moments = {name: Moments(int(FEATURES), self.device) for name in ('all', *CLASSES)}
        for part in zip(*(x.split(BATCH) for x in share)):
            images = sample(G, *part)
            found = self.features(to_pixels(images)) if torch.isfinite(images).all() else \
                torch.full((len(images), int(FEATURES)), math.nan)  # NaN sums: NaN scores in every process
            moments['all'].add(found)
            if self.by_gender:
                for label, name in enumerate(CLASSES):
                    moments[name].add(found[(part[1] == label).to(found.device)])
        names = [('fid', 'all')] + ([(f'fid_{name}', name) for name in CLASSES] if self.by_gender else [])
        scores = {}
        for score_name, name in names:
            fake, real = moments[name].summed().gaussian(), self.reference[name]
            if name not in self.roots:
                self.roots[name] = sqrtm_psd(real['sigma'])
            scores[score_name] = (frechet_distance(real['mu'], real['sigma'], fake['mu'], fake['sigma'],
                                                   root1=self.roots[name])
                                  if torch.isfinite(fake['sigma']).all() else math.nan)
        return scores

    def print_score(self, G, z):
        """Print score(G, z) and what it measured: --score's one line."""
        named = ', '.join(f"{name} {value:.2f}" for name, value in self.score(G, z).items())
        print(f"{named}: {len(z)} samples against the {self.reference['all']['count']} faces of {self.data_dir}/, "
              f"with the Inception weights {self.yardstick['inception_weights']} (sha256 "
              f"{self.yardstick['sha256'][:12]}...)")
