"""Reference per-frame statistics (numpy and astropy) for the frame-statistics kernel's tests."""

from __future__ import annotations

import numpy as np
from astropy.stats import sigma_clipped_stats

from sitiancal.storage.cube import center_box


def reference_stats(frame: np.ndarray) -> dict[str, float]:
    """Mean, median, clipped mean and std (astropy: one pass, 3 sigma of the MAD about
    the median) and central-box mean of one frame (ADU), as ``FrameStats`` defines them."""
    x = frame.astype(np.float64)
    r0, r1, c0, c1 = center_box(*frame.shape)
    mean, _, std = sigma_clipped_stats(x, sigma=3.0, maxiters=1, cenfunc="median",
                                       stdfunc="mad_std")
    return {"mean": x.mean(), "median": np.median(x), "clipped_mean": mean,
            "clipped_std": std, "center_mean": x[r0:r1, c0:c1].mean()}
