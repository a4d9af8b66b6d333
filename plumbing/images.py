"""Images out: sampling a generator, grids with captions, the animation of the fixed grids, and plots."""
import io
import math
import os

import torch

from plumbing.distributed import writes_files
from plumbing.safe_files import atomic_write, make_folder, save_bytes


def sample(G, *inputs, chunk=500):
    """G's images for the inputs (z, and labels for conditional models) in eval mode, chunk by chunk."""
    G.eval()
    images = torch.cat([G(*part) for part in zip(*(x.split(chunk) for x in inputs))])
    G.train()
    return images

def square_side(n):
    """Columns of the squarest grid that holds n images."""
    return math.ceil(math.sqrt(n))


def save_grid(images, path, nrow, label=None):
    """Save images in [-1, 1] as one grid PNG, with an optional caption strip below it."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid, save_image
    if not writes_files():
        return
    make_folder(os.path.dirname(path))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    if label is None:
        atomic_write(path, lambda temp: save_image(grid, temp))
        return
    from torchvision.transforms.functional import to_pil_image
    picture = to_pil_image(grid)
    captioned = Image.new('RGB', (picture.width, picture.height + 16), 'white')
    captioned.paste(picture, (0, 0))
    ImageDraw.Draw(captioned).text((4, picture.height + 2), label, fill='black')
    atomic_write(path, captioned.save)


def save_animation(frame_paths, gif_path, seconds_per_frame=0.5):
    import imageio.v2 as imageio
    if not writes_files():
        return
    frames = [imageio.imread(p) for p in frame_paths]
    gif = io.BytesIO()  # encoded in memory: imageio reports a failed file write again, as a traceback, later
    # imageio 2's GIF writer (Pillow's) takes each frame's duration in milliseconds
    imageio.mimwrite(gif, frames, format='GIF', duration=1000 * seconds_per_frame, loop=0)
    save_bytes(gif.getbuffer(), gif_path)


def plot_curves(history, panels, path):
    """Per-epoch curves side by side: panels is [(y label, [history keys], y scale), ...]."""
    import matplotlib
    if not writes_files():
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (ylabel, keys, yscale) in zip(axes[0], panels):
        for key in keys:  # over the epochs that have it: with quality_every > 1 not all are scored
            ax.plot(*zip(*[(h['epoch'], h[key]) for h in history if key in h]), marker='.', label=key)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        ax.set_ylabel(ylabel)
        ax.set_yscale(yscale)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)


def plot_quality(history, fid, path):
    """The scores by epoch: fid and its parts (fid_female, fid_male) on a log scale, since fid falls from ~1000
    to single digits and only a log scale shows the late epochs; beside them the MNIST classifier's shares."""
    measured = {key for h in history for key in h}
    shares = [key for key in ('class_acc', 'class_entropy') if key in measured]
    plot_curves(history, [('fid (lower is better)', sorted(key for key in measured if key.startswith(fid)), 'log')] +
                [('share or nats', shares, 'linear')] * bool(shares), path)
