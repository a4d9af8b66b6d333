"""The collapse report: a run that falls apart is said plainly, by its fid or by its discriminator's loss."""
import math

from plumbing.distributed import from_rank0


def bce_floor(label_smoothing):
    """The least BCE loss of a discriminator's real half: the entropy of its target 1 - label_smoothing."""
    target = 1 - label_smoothing
    return -sum(p * math.log(p) for p in (target, 1 - target) if p > 0)


class CollapseCheck:
    """Says plainly when a run falls apart: fid far above its best, or the discriminator winning outright.

    D 'wins outright' when its mean loss over an epoch is within WON_MARGIN of its floor: it then gives
    G no gradient. Only a fall counts: D often wins the first epochs outright and G still learns
    (the non-saturating loss), so an epoch counts only after an earlier, contested one.
    """
    WON_MARGIN = 0.05

    def __init__(self, label_smoothing, stop_on_collapse, fid_factor=None):
        self.floor = bce_floor(label_smoothing)  # of loss_d = real half + fake half; the fake half can reach 0
        self.stop = stop_on_collapse
        self.factor = fid_factor

    def won_outright(self, loss_d):
        return loss_d - self.floor < self.WON_MARGIN

    def stops(self, run):
        """Check run's last epoch; print a COLLAPSE line if it fell apart. True when training should stop."""
        *earlier, last = run.history
        best = run.best()
        signs = []
        if self.factor and 'fid' in last and last['fid'] > self.factor * best['fid']:
            signs.append(f"fid {last['fid']:.1f} is over {self.factor:g} times the best, "
                         f"{best['fid']:.1f} at epoch {best['epoch']}")
        contested_before = not all(self.won_outright(h['loss_d']) for h in earlier)
        if contested_before and self.won_outright(last['loss_d']):
            signs.append(f"the discriminator's loss averaged {last['loss_d']:.3f} over the epoch, "
                         f"{last['loss_d'] - self.floor:.3f} above its floor")
        if signs:
            going = "stopping (stop_on_collapse)" if self.stop else "going on"
            kept = f" The best generator stays in {run.best_generator_path()}" if best else ""
            print(f"COLLAPSE at epoch {last['epoch']}: {'; '.join(signs)}; {going}.{kept}", flush=True)
        return from_rank0(bool(signs) and self.stop)  # rank 0's scores decide, so every process stops
