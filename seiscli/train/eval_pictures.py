"""PNGs of one held-out crop: slices through its centre along inline, crossline and time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

AXES = ("inline", "crossline", "time")


def _slices(v: np.ndarray) -> list[np.ndarray]:
    """Centre slices of a (z, y, x) crop, each drawn with time downwards where time is an axis."""
    z, y, x = (s // 2 for s in v.shape)
    return [v[z].T, v[:, y].T, v[:, :, x]]


def _grid(columns: list[tuple[str, np.ndarray, dict]], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(columns), figsize=(2.4 * len(columns), 7.0), squeeze=False)
    for c, (name, vol, style) in enumerate(columns):
        for r, img in enumerate(_slices(vol)):
            ax = axes[r][c]
            ax.imshow(img, aspect="auto", interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{AXES[r]} slice", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def reconstruction_png(path: Path, crop: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, title: str) -> Path:
    """input | mask | reconstruction (visible patches as given, masked ones predicted) | error."""
    x, m, r = crop.numpy(), mask.numpy().astype(np.float32), recon.numpy()
    lim = float(np.percentile(np.abs(x), 99)) or 1.0
    seis = {"cmap": "gray", "vmin": -lim, "vmax": lim}
    cols = [
        ("input", x, seis),
        ("mask (white: hidden)", m, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        ("reconstruction", r, seis),
        ("error", r - x, {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}),
    ]
    return _grid(cols, title, path)


def probe_png(
    path: Path, crop: torch.Tensor, labels: torch.Tensor, trained: torch.Tensor, floor: torch.Tensor, title: str
) -> Path:
    """input | fault labels | probe probability on the trained encoder | on the random encoder."""
    x = crop.numpy()
    lim = float(np.percentile(np.abs(x), 99)) or 1.0
    prob = {"cmap": "magma", "vmin": 0, "vmax": 1}
    cols = [
        ("input", x, {"cmap": "gray", "vmin": -lim, "vmax": lim}),
        ("fault labels", labels.numpy().astype(np.float32), prob),
        ("probe: trained encoder", trained.numpy(), prob),
        ("probe: random encoder", floor.numpy(), prob),
    ]
    return _grid(cols, title, path)
