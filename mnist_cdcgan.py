"""MNIST conditional DCGAN: convolutional G and D on MNIST resized to 32x32, conditioned on the digit.

Train:     python mnist_cdcgan.py            (any constant below: --name=value, e.g. --d=64)
Sample:    python mnist_cdcgan.py --generate=10
"""
import common  # first: from here on a Ctrl-C is one line, even while torch loads
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------- the experiment
train_epoch = 20                      # [1, 10000]: epochs to train (lr / 10 at the start of epochs 11 and 16)
batch_size = 128                      # >= 2: images per step
lr = 0.0002                           # > 0: Adam learning rate of both networks
beta1 = 0.5                           # [0, 1): Adam beta1
z_dim = 100                           # [1, 10000]: length of the noise vector, drawn from N(0, 1)
d = 128                               # [2, 1024], even: width; G's layers have 4d, 2d, d channels, D's d/2, d, 2d, 4d
img_size = 32                         # {32}: image side in pixels (the layers fix it at 32)
seed = 0                              # [0, 4294967295]: seed of every random draw
label_smoothing = 0.0                 # [0, 1): D's target for real images is 1 - this (one-sided); 0 = original
ema_decay = 0.999                     # [0, 1): grids and saved G use an EMA of G's weights; 0 = original (raw G)
instance_noise = 0.2                  # [0, 1]: std of Gaussian noise on every image D sees, real or fake; 0 = original

# ---------------------------------------------------------------- the run
data_dir = 'data'                     # holds MNIST/raw/ with the four IDX files
results_dir = 'MNIST_cDCGAN_results'  # non-empty: grids, plots, weights, history and checkpoint go here
train_limit = 0                       # >= 0: 0 = all 60,000 training images; N = only the first N
resume = True                         # continue from results_dir/checkpoint.pt when it exists
device = 'auto'                       # auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps
precision = 'auto'                    # {auto, bf16, fp16, fp32}: auto = bf16 on hardware with native bf16, else fp32
channels_last = True                  # convolutions in channels-last (NHWC) memory order, faster on CPU and GPU
sync_batchnorm = False                # under torchrun on GPUs: BatchNorm statistics of the global batch
compile = False                       # torch.compile G and D (minutes to start; no clear gain measured here)
quality_samples = 2000                # 0 or [2, 100000]: samples scored after each epoch (fid, class_entropy); 0 = off
collapse_factor = 4.0                 # 0 or > 1: an epoch whose fid is over this times the best is a collapse; 0 = off
stop_on_collapse = False              # on a collapse: True stops training, False goes on; the best G is kept
generate = 0                          # [0, 1000]: 0 trains; N only writes N new samples per digit from the trained G
generate_from = 'best'                # {best, last}: --generate samples from the best generator by fid, or the last

MODEL = 'MNIST_cDCGAN'
N_CLASSES = 10
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
        self.z_branch = nn.Sequential(*up(z_dim, 2 * d, stride=1, padding=0))          # 4x4
        self.label_branch = nn.Sequential(*up(N_CLASSES, 2 * d, stride=1, padding=0))  # 4x4
        self.body = nn.Sequential(
            *up(4 * d, 2 * d), *up(2 * d, d),                                          # 8, 16
            nn.ConvTranspose2d(d, 1, 4, 2, 1))                                         # 32, then tanh
        self.apply(init_normal)

    def forward(self, z, labels):
        y = F.one_hot(labels, N_CLASSES).float().view(-1, N_CLASSES, 1, 1)
        h = torch.cat([self.z_branch(z.view(-1, self.z_dim, 1, 1)), self.label_branch(y)], dim=1)
        # tanh in fp32: under bf16 autocast it rounds to exactly +-1 beyond |x| = 3.5, where its gradient is
        # then exactly 0, so a saturated pixel could never change again (an fp32 tensor is left as it is)
        return torch.tanh(self.body(h).float())


class Discriminator(nn.Module):
    def __init__(self, d=d):
        super().__init__()
        self.image_branch = nn.Sequential(*down(1, d // 2, batch_norm=False))           # 16x16
        self.label_branch = nn.Sequential(*down(N_CLASSES, d // 2, batch_norm=False))   # 16x16
        self.body = nn.Sequential(
            *down(d, 2 * d), *down(2 * d, 4 * d),                                       # 8, 4
            nn.Conv2d(4 * d, 1, 4, 1, 0))                                               # 1
        self.apply(init_normal)

    def forward(self, x, labels):
        # The label enters as constant planes: plane y is ones, the others zeros.
        planes = F.one_hot(labels, N_CLASSES).float()[:, :, None, None].expand(-1, -1, *x.shape[2:])
        h = torch.cat([self.image_branch(x), self.label_branch(planes)], dim=1)
        return self.body(h).view(-1)


def noisy(images):
    """Instance noise (Sonderby et al. 2017): D sees real and fake images alike through fresh Gaussian noise, so
    it cannot win by details finer than the noise (README, Departures from the originals)."""
    return images + instance_noise * torch.randn_like(images) if instance_noise else images


def class_grid_inputs(columns, device):
    """Row i is digit i; column j uses noise vector j in every row, so a column shows one style."""
    z = noise(columns, device).repeat(N_CLASSES, 1)
    labels = torch.arange(N_CLASSES, device=device).repeat_interleave(columns)
    return z, labels


def fixed_inputs(device):
    """The inputs of the per-epoch grid and of the quality measurement, kept for the whole run."""
    grid_z, grid_labels = class_grid_inputs(10, device)
    return {'z': grid_z, 'labels': grid_labels, 'quality_z': noise(quality_samples, device),
            'quality_labels': torch.arange(quality_samples, device=device) % N_CLASSES}


def learning_rate(epoch):
    return lr / 10 ** sum(epoch >= drop for drop in (11, 16))


def generate_samples(run):
    G = run.trained_generator(Generator(z_dim, d))
    z, labels = class_grid_inputs(generate, run.device)
    path = run.save_grid(f"{MODEL}_generated.png", common.sample(G, z, labels), nrow=generate)
    print(f"wrote {path}: {generate} samples of each digit, one row per digit")


def train(run):
    # images, labels: uint8 (N, 1, 32, 32), int64 (N,), on the device
    images, labels = common.mnist_training_set(data_dir, img_size, train_limit, batch_size, run.device)
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
    quality = common.MnistQuality(data_dir, img_size, run.device) if quality_samples else None
    fixed = run.lock_folder_and_resume(G, D, G_ema, opt_G, opt_D, scaler, fixed_inputs, scored_by=quality)
    G, D = run.ddp(G), run.ddp(D)  # under torchrun: DistributedDataParallel, gradients averaged over processes
    run.save_grid('raw_MNIST.png', images[:100], nrow=10)
    loss = nn.BCEWithLogitsLoss()

    for epoch in run.epochs(learning_rate):
        for x, y in run.batches(images, labels):
            n = len(x)  # this process's share of the batch
            fake_labels = torch.randint(0, N_CLASSES, (n,), device=x.device)
            real_target = torch.full((n,), 1.0 - label_smoothing, device=x.device)  # D's target for real images
            # update D: maximise log D(x|y) + log(1 - D(G(z|y')|y')), y' the fake labels
            with autocast:
                fake = G(noise(n, x.device), fake_labels)
                d_real, d_fake = D(noisy(x), y), D(noisy(fake.detach()), fake_labels)
                loss_d = loss(d_real, real_target) + loss(d_fake, torch.zeros_like(real_target))
            opt_D.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(opt_D)

            # update G: maximise log D(G(z|y')|y'), the non-saturating form of minimising log(1 - D(...))
            with autocast:
                loss_g = loss(D(noisy(fake), fake_labels), torch.ones_like(real_target))
            opt_G.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.step(opt_G)
            scaler.update()
            G_ema.update_parameters(G)

            run.log(loss_d=loss_d, loss_g=loss_g,  # D's mean probabilities in fp32, as the losses
                    d_real=d_real.float().sigmoid().mean(), d_fake=d_fake.float().sigmoid().mean())
        run.end_epoch(fixed_grid=(common.sample(G_ema, fixed['z'], fixed['labels']), 10),
                      scores=quality.score(common.sample(G_ema, fixed['quality_z'], fixed['quality_labels']),
                                           fixed['quality_labels']) if quality else {})


if __name__ == '__main__':
    common.main(globals(), train, generate_samples)
