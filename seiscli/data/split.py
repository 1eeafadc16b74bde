"""The train / held-out split of a volume: the last `data.holdout_fraction` of its inlines are held out.

A contiguous slab of inlines, not random traces: a crop drawn next to a held-out trace would see most of
its neighbourhood, so only a region can be held out honestly. The training loader draws crop origins
only where the whole crop lies in [0, train_inlines); evaluation reads only [train_inlines, n).
"""

from __future__ import annotations

import math


def train_inlines(n_inlines: int, holdout_fraction: float) -> int:
    """Inlines [0, result) are the training region; the rest (ceil(fraction * n) inlines) are held out."""
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"data.holdout_fraction={holdout_fraction}: allowed 0 <= fraction < 1")
    return n_inlines - math.ceil(holdout_fraction * n_inlines)
