"""The exponential moving average of G's weights that the grids, the scores, the saved generator and --generate
sample from."""
import torch
from torch.optim.swa_utils import AveragedModel


def moving_average(model, decay):
    """An exponential moving average of model's weights and BatchNorm statistics: a module to sample from
    (it calls its copy of model), updated by update_parameters(model) after each step.

    decay 0 makes it a plain copy of the latest weights, the original recipe. Made before model is
    compiled or wrapped, so the copy is a plain module.
    """

    @torch.no_grad()
    def ema(ema_params, current_params, steps):
        # A short memory at first, (1 + n) / (10 + n), so early grids do not show the random start.
        n = int(steps)
        keep = min(decay, (1 + n) / (10 + n))
        for average, current in zip(ema_params, current_params):
            if average.is_floating_point():
                average.lerp_(current, 1 - keep)
            else:  # BatchNorm's step counter
                average.copy_(current)
    return AveragedModel(model, multi_avg_fn=ema, use_buffers=True)
