"""CelebA DCGAN (Radford et al. 2015): the MNIST DCGAN with 3 colour channels, on 64x64 CelebA faces.

Data:      python celeba_preprocess.py      (--isCrop=True for the tighter face crop)
Train:     python celeba_dcgan.py           (any constant below: --name=value, e.g. --isCrop=True)
Sample:    python celeba_dcgan.py --generate=25
Score:     python celeba_dcgan.py --score=50000    (the Inception FID as papers report it: README, Results)
"""
import common  # first: from here on a Ctrl-C is one line, even while torch loads
import contextlib

import torch
import torch.nn as nn

# ---------------------------------------------------------------- the experiment
isCrop = False                        # train on the tighter 108x108 face crop, with its own data and results folders
train_epoch = 20                      # [1, 10000]: epochs to train (lr / 10 at the start of epochs 11 and 16)
batch_size = 128                      # >= 2: images per step
lr = 0.0002                           # > 0: Adam learning rate of both networks
beta1 = 0.5                           # [0, 1): Adam beta1
z_dim = 100                           # [1, 10000]: length of the noise vector, drawn from N(0, 1)
d = 128                               # [1, 1024]: the width; G's and D's layers have 8d, 4d, 2d, d channels
img_size = 64                         # {64}: image side in pixels (the layers fix it at 64)
seed = 0                              # [0, 4294967295]: seed of every random draw
label_smoothing = 0.0                 # [0, 1): D's target for real images is 1 - this (one-sided); 0 = original
ema_decay = 0.999                     # [0, 1): grids and saved G use an EMA of G's weights; 0 = original (raw G)

# ---------------------------------------------------------------- the run
data_dir = ''                         # holds female/ and male/ of 64x64 faces; '' = data/resized_celebA(_crop)
results_dir = ''                      # grids, plots, weights, history, checkpoint; '' = CelebA_DCGAN(_crop)_results
train_limit = 0                       # >= 0: 0 = all 202,599 faces; N = N faces spread evenly over both genders
resume = True                         # continue from results_dir/checkpoint.pt when it exists
device = 'auto'                       # auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps
precision = 'auto'                    # {auto, bf16, fp16, fp32}: auto = bf16 on hardware with native bf16, else fp32
channels_last = True                  # convolutions in channels-last (NHWC) memory order, faster on CPU and GPU
sync_batchnorm = False                # under torchrun on GPUs: BatchNorm statistics of the global batch
compile = False                       # torch.compile G and D (minutes to start; no clear gain measured here)
quality_samples = 5000                # 0 or [2, 100000]: faces scored with the Inception FID (fid); 0 = off
quality_every = 1                     # [1, 10000]: score after every this many epochs, and after the last
inception_weights = ''                # torch-fidelity's Inception-v3 weights file; '' = downloaded on first use
collapse_factor = 4.0                 # 0 or > 1: an epoch whose fid is over this times the best is a collapse; 0 = off
stop_on_collapse = False              # on a collapse: True stops training, False goes on; the best G is kept
generate = 0                          # [0, 1000]: 0 trains; N only writes a grid of N new samples from the trained G
generate_from = 'best'                # {best, last}: --generate and --score take the best generator by fid, or the last
score = 0                             # 0 or [2, 100000]: 0 trains; N only prints the fid of N samples of the trained G

MODEL = 'CelebA_DCGAN'
BF16_BY_DEFAULT = True  # 'auto' may take bf16: the MNIST cDCGAN's fid kept within fp32's seed spread (README)


def noise(n, device):
    return torch.randn(n, z_dim, device=device)


def init_normal(module):
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


def up(c_in, c_out, stride=2, padding=1):
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride, padding), nn.BatchNorm2d(c_out), nn.ReLU()]


def down(c_in, c_out, batch_norm=True):
    return [nn.Conv2d(c_in, c_out, 4, 2, 1), *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.LeakyReLU(0.2)]


class Generator(nn.Module):
    def __init__(self, z_dim=z_dim, d=d):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(
            *up(z_dim, 8 * d, stride=1, padding=0),                    # 4x4
            *up(8 * d, 4 * d), *up(4 * d, 2 * d), *up(2 * d, d),       # 8, 16, 32
            nn.ConvTranspose2d(d, 3, 4, 2, 1))                         # 64, then tanh
        self.apply(init_normal)

    def forward(self, z):
        # tanh in fp32: under bf16 autocast it rounds to exactly +-1 beyond |x| = 3.5, where its gradient is
        # then exactly 0, so a saturated pixel could never change again (an fp32 tensor is left as it is)
        return torch.tanh(self.net(z.view(-1, self.z_dim, 1, 1)).float())


class Discriminator(nn.Module):
    def __init__(self, d=d):
        super().__init__()
        self.net = nn.Sequential(
            *down(3, d, batch_norm=False),                             # 32x32
            *down(d, 2 * d), *down(2 * d, 4 * d), *down(4 * d, 8 * d),  # 16, 8, 4
            nn.Conv2d(8 * d, 1, 4, 1, 0))                              # 1
        self.apply(init_normal)

    def forward(self, x):
        return self.net(x).view(-1)


def fixed_inputs(device):
    """The noise of the per-epoch grid and of the quality measurement, kept for the whole run."""
    return {'z': noise(25, device), 'quality_z': noise(quality_samples, device)}


def learning_rate(epoch):
    return lr / 10 ** sum(epoch >= drop for drop in (11, 16))


def generate_samples(run):
    G = run.trained_generator(Generator(z_dim, d))
    path = run.save_grid(f"{run.name}_generated.png", common.sample(G, noise(generate, run.device)),
                         nrow=common.square_side(generate))
    print(f"wrote {path}: {generate} samples")


def score_samples(run):
    """--score=N: the trained G's fid on N samples against all the faces, as papers report it for N = 50,000."""
    G = run.trained_generator(Generator(z_dim, d))
    common.load_celeba(data_dir, isCrop, img_size, 0, 2, torch.device('cpu'))  # decoded: what the statistics read
    common.CelebaFid(data_dir, inception_weights, run.device).print_score(G, noise(score, run.device))


def train(run):
    # images: uint8 (N, 3, 64, 64), on the device where they fit
    images, _ = common.load_celeba(data_dir, isCrop, img_size, train_limit, batch_size, run.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    G = Generator(z_dim, d).to(run.device, memory_format=memory_format)
    D = Discriminator(d).to(run.device, memory_format=memory_format)
    G_ema = common.moving_average(G, ema_decay)  # what the grids, the scores and the saved G sample
    opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=(beta1, 0.999), fused=True)
    opt_D = torch.optim.Adam(D.parameters(), lr=lr, betas=(beta1, 0.999), fused=True)
    # Mixed precision, as nanoGPT sets it up: the forward passes under autocast; fp16 alone scales the losses.
    autocast = torch.autocast(run.device.type, dtype=run.dtype) if run.dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype is torch.float16)
    if compile:
        G.compile()  # in place: the state_dict keeps its names
        D.compile()
    # Before the resume, whose restored random state must not be drawn from by anything but training.
    quality = common.CelebaFid(data_dir, inception_weights, run.device) if quality_samples else None
    fixed = run.lock_folder_and_resume(G, D, G_ema, opt_G, opt_D, scaler, fixed_inputs, scored_by=quality)
    G, D = run.ddp(G), run.ddp(D)  # under torchrun: DistributedDataParallel, gradients averaged over processes
    real = images[common.evenly_spaced(len(images), 25)]  # from across the set: it is sorted by gender
    run.save_grid('raw_CelebA.png', real, nrow=5)
    loss = nn.BCEWithLogitsLoss()

    for epoch in run.epochs(learning_rate):
        for x in run.batches(images):
            n = len(x)  # this process's share of the batch
            real_target = torch.full((n,), 1.0 - label_smoothing, device=x.device)  # D's target for real images
            # update D: maximise log D(x) + log(1 - D(G(z)))
            with autocast:
                fake = G(noise(n, x.device))
                d_real, d_fake = D(x), D(fake.detach())
                loss_d = loss(d_real, real_target) + loss(d_fake, torch.zeros_like(real_target))
            opt_D.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(opt_D)

            # update G: maximise log D(G(z)), the non-saturating form of minimising log(1 - D(G(z)))
            with autocast:
                loss_g = loss(D(fake), torch.ones_like(real_target))
            opt_G.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.step(opt_G)
            scaler.update()
            G_ema.update_parameters(G)

            run.log(loss_d=loss_d, loss_g=loss_g,  # D's mean probabilities in fp32, as the losses
                    d_real=d_real.float().sigmoid().mean(), d_fake=d_fake.float().sigmoid().mean())
        scored = quality and (epoch % quality_every == 0 or epoch == train_epoch)
        run.end_epoch(fixed_grid=(common.sample(G_ema, fixed['z']), 5),
                      scores=quality.score(G_ema, fixed['quality_z']) if scored else {})


if __name__ == '__main__':
    common.main(globals(), train, generate_samples, score_samples)
