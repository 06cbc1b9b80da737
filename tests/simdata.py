"""Small seeded simulated datasets for tests.

Import from a test module as ``from simdata import small_dataset, read_stack``
(pytest puts ``tests/`` on ``sys.path`` because it has no ``__init__.py``).

Datasets are cached per configuration for the whole test session: a second
call with the same overrides returns the same directory and the same
:class:`SensorTruth` object (treat its arrays as read-only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from sitiancal.compute.simulate import SensorTruth, SimulationConfig, simulate_dataset

#: Defaults of :func:`small_dataset`: 48 x 64 px, 24 bias, 4 x 4 darks up to 600 s,
#: 8 flat levels x 12 frames (2 levels above the linear range), and about 1.4%
#: anomalous pixels (20x the camera's rate) so that each class has a few members.
SMALL_DEFAULTS: dict[str, Any] = {
    "shape": (48, 64),
    "seed": 20240301,
    "n_bias": 24,
    "dark_exptimes": [0.0, 30.0, 120.0, 600.0],
    "dark_frames": 4,
    "flat_levels": 8,
    "flat_frames": 12,
    "hot_fraction": 3e-3,
    "warm_fraction": 3e-3,
    "dead_fraction": 1e-3,
    "low_response_fraction": 2e-3,
    "rtn_fraction": 3e-3,
    "noisy_fraction": 2e-3,
}

_CACHE: dict[str, tuple[Path, SensorTruth]] = {}


def small_dataset(tmp_path: str | Path, **config_overrides: Any) -> tuple[Path, SensorTruth]:
    """Simulate (or reuse) a small dataset; returns ``(out_dir, truth)``.

    ``config_overrides`` are :class:`SimulationConfig` fields replacing
    :data:`SMALL_DEFAULTS`. The data go to ``tmp_path/sim_<hash>`` of the first
    caller and are reused by later callers with the same configuration.
    """
    fields = {**SMALL_DEFAULTS, **config_overrides}
    if config_overrides.get("flat_exptimes") is not None and "flat_levels" not in config_overrides:
        del fields["flat_levels"]  # the explicit ladder sets the number of levels
    config = SimulationConfig(**fields)
    key = config.model_dump_json()
    hit = _CACHE.get(key)
    if hit is not None and (hit[0] / "truth.fits").exists():
        return hit
    out = Path(tmp_path) / f"sim_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    simulate_dataset(out, config)
    _CACHE[key] = (out, SensorTruth.load(out / "truth.fits"))
    return _CACHE[key]


def read_stack(out_dir: str | Path, truth: SensorTruth, kind: str,
               level: int | None = None) -> tuple[np.ndarray, Table]:
    """Frames of one type (and optionally one level) as a float64 ``(F, ny, nx)``
    stack in ADU, with the matching rows of ``truth.frames``."""
    rows = truth.frames[truth.frames["type"] == kind]
    if level is not None:
        rows = rows[rows["level"] == level]
    stack = np.stack([fits.getdata(Path(out_dir) / str(name)).astype(np.float64)
                      for name in rows["file"]]) if len(rows) else np.empty((0, *truth.shape))
    return stack, rows
