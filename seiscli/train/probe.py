"""A frozen-encoder linear probe for fault segmentation: what the encoder's tokens say about faults.

The probe is a 1x1x1 convolution (one weight per feature channel and a bias) on the encoder's patch tokens,
upsampled trilinearly to voxels. Both are linear and the interpolation weights sum to one, so the logits are
computed at token resolution and upsampled: the same probe at a fraction of the cost. It is trained with
class-balanced BCE (full batch, Adam, fixed steps) on crops of the training inlines; its threshold is the one
with the best F1 there; IoU and F1 are then measured on the held-out crops. The same probe on a randomly
initialised encoder is the floor: a number worth reading is the gap to it. The same probe on each patch's raw
voxels (no encoder at all) says how much of the labels a linear read of the amplitudes already gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seiscli.train.model import MaskedAutoencoder3D, patchify

THRESHOLDS = torch.linspace(0.05, 0.95, 19)
FIT_POOL = 2


@torch.no_grad()
def token_features(model: MaskedAutoencoder3D, crops: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Encoder features of whole crops, nothing masked: (n, D, gz, gy, gx) float32 on the model's device."""
    device, p = next(model.parameters()).device, model.patch_size
    out = []
    for first in range(0, crops.shape[0], batch):
        x = crops[first : first + batch]
        f = model.features(patchify(x, p).to(device)).float()
        out.append(f.transpose(1, 2).reshape(x.shape[0], -1, *model.grid))
    return torch.cat(out)


@torch.no_grad()
def voxel_features(crops: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch's raw voxels as its features, (n, C*p^3, gz, gy, gx): the probe's input with no encoder."""
    grid = [s // patch for s in crops.shape[2:]]
    return patchify(crops, patch).float().transpose(1, 2).reshape(crops.shape[0], -1, *grid)


@dataclass(frozen=True)
class ProbeResult:
    iou: float
    f1: float
    threshold: float
    train_f1: float
    probability: torch.Tensor  # (n, cz, cy, cx) on the held-out crops


class LinearProbe:
    def __init__(self, channels: int, seed: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same start on every device
        self.weight = (torch.randn(channels, generator=g) * 0.01).to(device).requires_grad_()
        self.bias = torch.zeros(1, device=device, requires_grad=True)
        self.mean = torch.zeros(channels, device=device)
        self.std = torch.ones(channels, device=device)

    def logits(self, feats: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """(n, D, gz, gy, gx) -> voxel logits (n, cz, cy, cx)."""
        f = (feats - self.mean[:, None, None, None]) / self.std[:, None, None, None]
        tok = torch.einsum("ndzyx,d->nzyx", f, self.weight) + self.bias
        return F.interpolate(tok[:, None], size=size, mode="trilinear", align_corners=False)[:, 0]

    def fit(self, feats: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> None:
        # Standardised features: one learning rate suits every encoder, trained or random.
        self.mean = feats.mean(dim=(0, 2, 3, 4))
        self.std = feats.std(dim=(0, 2, 3, 4)) + 1e-6
        # Fitted at half the voxel resolution against the labels' 2x2x2 means (soft targets): 8x less work
        # per step than full resolution, for a map that is smooth at the token scale anyway.
        y = F.avg_pool3d(labels[:, None].float(), FIT_POOL, ceil_mode=True)[:, 0]
        pos = float(y.mean())
        if pos in (0.0, 1.0):
            raise ValueError("the probe's training crops hold no fault voxels (or only fault voxels); use more crops")
        pos_weight = torch.tensor((1 - pos) / pos, device=feats.device)
        opt = torch.optim.Adam([self.weight, self.bias], lr=lr)
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(self.logits(feats, y.shape[1:]), y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()


def scores(pred: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(IoU, F1) of the positive class."""
    p, y = pred.bool(), labels.bool()
    tp = float((p & y).sum())
    fp, fn = float((p & ~y).sum()), float((~p & y).sum())
    iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return iou, f1


@torch.no_grad()
def _best_threshold(prob: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    best = max((scores(prob >= t, labels)[1], float(t)) for t in THRESHOLDS)
    return best[1], best[0]


def run_probe(
    features: Callable[[torch.Tensor], torch.Tensor],
    train_crops: torch.Tensor,
    train_labels: torch.Tensor,
    test_crops: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 0.05,
    seed: int = 0,
) -> ProbeResult:
    """Fit the probe on the training crops' features (token_features of a frozen encoder, or voxel_features);
    score it on the held-out crops. It runs where the features are (the encoder's device: a pretrain-sized
    probe is voxel-sized work, too slow for a CPU)."""
    size = tuple(train_crops.shape[2:])
    train_f, test_f = features(train_crops), features(test_crops)
    device = train_f.device
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    probe = LinearProbe(train_f.shape[1], seed, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe.fit(train_f, train_labels, steps, lr)
    with torch.no_grad():
        threshold, train_f1 = _best_threshold(torch.sigmoid(probe.logits(train_f, size)), train_labels)
        prob = torch.sigmoid(probe.logits(test_f, size))
    iou, f1 = scores(prob >= threshold, test_labels)
    return ProbeResult(iou, f1, threshold, train_f1, prob.cpu())
