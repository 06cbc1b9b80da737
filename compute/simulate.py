"""Simulator of a ZWO ASI6200MM Pro (Sony IMX455) calibration dataset.

A dataset is a series of bias, dark and flat frames written as 16-bit FITS
files the way acquisition software writes them, plus ``truth.fits``, which
holds every per-pixel map and scalar the frames were drawn from, so that the
calibration code can be scored against known answers.

Signal chain of one pixel in one frame (``k``)::

    lam  = response * vignetting * lamp_flux * t * lamp_scale[k]      (e-, flats)
         + dark_rate * 2**((T[k] - T_set) / doubling) * t              (e-)
    e    = min(Poisson(lam), full_well) + rtn_level[state[k]] + N(0, read_noise)
    x    = e / gain                                                    (ADU above bias)
    adu  = clip(rint(nonlin(x) + bias + drift[k] + row_noise[k][row]), 0, 65535)
    nonlin(x) = x * (1 - nonlinearity_coeff * (|x| / 65535)**nonlinearity_power)

The fixed maps (gain, read noise, bias, dark rate, response, vignetting, RTN
pixels) are drawn once from child seeds of ``config.seed``; only temporal noise
is drawn per frame, from the child seed ``SeedSequence(seed, spawn_key=(1, k))``,
so frame ``k`` does not depend on how many frames follow it. Poisson noise is
drawn exactly for means below ``POISSON_NORMAL_THRESHOLD`` electrons and by its
normal approximation above (skewness 1/sqrt(lam) < 3%; mean and variance exact).
Frames are rendered one at a time in bands of rows, so memory holds the five
fixed maps the rendering needs (float32) and one frame.

``truth.fits``: primary HDU without data; its header carries the scalar truth
(``GAINMED``, ``RNMED``, ``DARKMED``, ``TEMP``, ``SATURATE``, ``FULLWELL``,
``ADCFW``, ``NLCOEFF``/``NLPOWER``/``NLSCALE``, ``BIASLVL``, counts of each
defect class, ``MASKBn`` bit names) and the full configuration as JSON in the
long-string card ``CONFIG``. Image extensions ``GAIN`` (e-/ADU), ``READ_NOISE``
(e-), ``BIAS`` (ADU), ``DARK_RATE`` (e-/s at ``TEMP``), ``RESPONSE``,
``VIGNETTING``, ``RTN_AMPLITUDE`` (e-), ``DEFECTS`` (uint16, DESIGN.md section 5
bits), ``RTN_STATES`` (uint8, RTN pixel x frame); tables ``FRAMES`` and ``RTN``.
At full size it is about 1.9 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from astropy.io import fits
from astropy.table import Table
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from scipy.stats import median_abs_deviation

from sitiancal import __version__

#: Largest value of the 16-bit ADC (ADU).
ADC_MAX = 65535
#: Mean electron count above which Poisson noise is drawn as N(lam, lam).
POISSON_NORMAL_THRESHOLD = 1000.0
#: Defect bits, DESIGN.md section 5 (only the classes the simulator injects).
DEFECT_BITS = {"HOT": 1, "WARM": 2, "DEAD": 4, "LOW_RESPONSE": 8, "NOISY": 16, "RTN": 32}
#: NOISY truth rule: read noise above median + 5 robust sigma (reference study's 5 sigma).
NOISY_SIGMA = 5.0
MAP_NAMES = ("GAIN", "READ_NOISE", "BIAS", "DARK_RATE", "RESPONSE", "VIGNETTING",
             "RTN_AMPLITUDE", "DEFECTS")
_BAND_PIXELS = 1 << 20  # pixels rendered at once; fixes the order of random draws
_IMAGETYP = {"maxim": {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field"},
             "nina": {"bias": "BIAS", "dark": "DARK", "flat": "FLAT"},
             "sharpcap": {"bias": "Bias", "dark": "Dark", "flat": "Flat"}}
_MAP_KEYS = {"gain": 0, "read_noise": 1, "bias": 2, "dark": 3, "response": 4,
             "defects": 5, "rtn": 6}

ProgressCallback = Callable[[int, int], None]


def _f(default: Any, doc: str, **kw: Any) -> Any:
    return Field(default, description=doc, **kw)


class SimulationConfig(BaseModel):
    """Everything that defines a simulated dataset. Sources: "study" is the
    Mini-SiTian CMOS reference study, "ZWO" the ASI6200MM Pro specification,
    "assumed" a typical sCMOS value chosen here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, int] = _f((6388, 9576), "frame shape (rows, columns), px; ZWO")
    seed: int = _f(0, "root seed of every random draw")
    # acquisition
    n_bias: int = _f(20, "number of bias frames; assumed", ge=0)
    dark_exptimes: list[float] = _f([0.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0],
                                    "dark exposure times, s; assumed")
    dark_frames: int = _f(5, "dark frames per exposure time; assumed", ge=0)
    flat_levels: int = _f(14, "number of flat levels (exposure times); assumed", ge=0)
    flat_frames: int = _f(40, "flat frames per level; assumed", ge=0)
    flat_exptimes: list[float] | None = _f(
        None, "explicit flat exposure times, s; default: a ladder at constant lamp flux with "
        "central signals linear from flat_min_fraction to flat_max_fraction of the ADC range "
        "plus the levels flat_top_fractions (one near the top, the rest saturated)")
    flat_min_fraction: float = _f(0.03, "lowest ladder level, fraction of ADC range; assumed")
    flat_max_fraction: float = _f(0.70, "highest unsaturated ladder level below the "
                                  "nonlinear range, fraction of ADC range; DESIGN.md gain fit")
    flat_top_fractions: list[float] = _f([0.9, 1.3, 1.7], "ladder levels above "
                                         "flat_max_fraction; the first (flat_levels-2)//3 are used")
    lamp_flux: float = _f(2000.0, "flat lamp flux at the optical centre, e-/s/px; assumed", gt=0)
    lamp_flicker_rms: float = _f(0.003, "rms of the per-frame lamp scale; assumed", ge=0)
    start_time: AwareDatetime = _f(datetime(2024, 3, 1, 12, 0, tzinfo=UTC),
                                   "DATE-OBS of the first frame, UTC")
    readout_time: float = _f(1.0, "readout + download time per frame, s; ZWO (USB3)", ge=0)
    frame_gap: float = _f(0.5, "mean extra gap between frames (exponential), s; assumed", ge=0)
    header_convention: Literal["maxim", "nina", "sharpcap"] = _f(
        "maxim", "header dialect: maxim (IMAGETYP 'Bias Frame', EXPTIME), nina ('BIAS', "
        "EXPOSURE and EXPTIME), sharpcap ('Bias', EXPTIME, 7-digit DATE-OBS fraction)")
    gain_setting: int = _f(100, "camera GAIN setting written to headers; study")
    offset_setting: int = _f(50, "camera OFFSET setting written to headers; study")
    # gain
    gain_mean: float = _f(0.254, "main gain population mean, e-/ADU; study", gt=0)
    gain_sigma: float = _f(0.002, "intrinsic per-pixel gain spread (each population), "
                           "e-/ADU; assumed", ge=0)
    gain2_fraction: float = _f(0.0, "fraction of pixels in a second gain population "
                               "(bimodal camera of the study)", ge=0, le=1)
    gain2_mean: float = _f(0.272, "second gain population mean, e-/ADU; assumed", gt=0)
    # read noise
    read_noise_median: float = _f(1.03, "median per-pixel read noise, e-; study", gt=0)
    read_noise_sigma_log: float = _f(0.15, "lognormal sigma of the read-noise core; assumed")
    noisy_fraction: float = _f(1.2e-4, "fraction of high-noise (tail) pixels; assumed")
    noisy_factor: tuple[float, float] = _f((3.0, 10.0), "tail read noise range, x median "
                                           "(log-uniform); assumed")
    # bias
    bias_level: float = _f(500.0, "mean bias level, ADU (OFFSET 50); study", gt=0)
    bias_pixel_sigma: float = _f(1.5, "fixed per-pixel bias scatter, ADU; assumed", ge=0)
    bias_row_sigma: float = _f(0.8, "fixed row pattern rms, ADU; assumed", ge=0)
    bias_col_sigma: float = _f(1.2, "fixed column pattern rms, ADU; assumed", ge=0)
    bias_gradient: float = _f(2.0, "linear bias gradient across the diagonal, ADU; assumed")
    bias_corner_amplitude: float = _f(3.0, "bias excess at the corners, ADU; assumed")
    bias_corner_scale: float = _f(0.05, "e-folding of corner excess, fraction of diagonal")
    bias_drift_rms: float = _f(0.01, "per-frame white bias drift, ADU; study (+-0.03)", ge=0)
    bias_drift_rate: float = _f(0.005, "linear bias drift, ADU/h; study (+-0.03)")
    row_noise_sigma: float = _f(0.5, "temporal row noise rms, ADU; assumed", ge=0)
    # dark current and temperature
    temperature: float = _f(0.0, "sensor set point (SET-TEMP), deg C; study")
    temperature_jitter: float = _f(0.05, "rms of CCD-TEMP around the set point, deg C", ge=0)
    dark_reference_temperature: float = _f(0.0, "temperature of the dark_* rates, deg C")
    dark_doubling: float = _f(6.0, "dark current doubling temperature, deg C; assumed", gt=0)
    dark_median: float = _f(0.002, "median dark rate of the main population, e-/s; study")
    dark_sigma_log: float = _f(0.3, "lognormal sigma of the main dark population; assumed")
    warm_fraction: float = _f(2e-4, "fraction of warm pixels; assumed", ge=0)
    warm_median: float = _f(0.02, "median warm dark rate, e-/s; assumed", ge=0)
    warm_sigma_log: float = _f(0.4, "lognormal sigma of warm rates; assumed", ge=0)
    hot_fraction: float = _f(1e-4, "fraction of hot pixels; assumed", ge=0)
    hot_rate: tuple[float, float] = _f((1.0, 50.0), "hot dark rate range (log-uniform), "
                                       "e-/s; brief")
    glow_rate: float = _f(0.02, "amplifier glow at its corner pixel, e-/s; assumed", ge=0)
    glow_scale: float = _f(0.03, "e-folding of glow, fraction of the diagonal; assumed", gt=0)
    glow_corner: Literal["bottom-left", "bottom-right", "top-left", "top-right"] = _f(
        "bottom-right", "glow corner (row 0 is the bottom row)")
    # response
    prnu_rms: float = _f(0.005, "pixel response non-uniformity rms; study-like", ge=0)
    dead_fraction: float = _f(2e-5, "fraction of dead pixels (response < 0.3); assumed", ge=0)
    low_response_fraction: float = _f(8e-5, "fraction with response 0.5-0.8; assumed", ge=0)
    vignetting_corner: float = _f(0.15, "illumination loss at the frame corners; assumed",
                                  ge=0, lt=1)
    vignetting_center: tuple[float, float] = _f((0.52, 0.49), "optical centre (y, x), "
                                                "fraction of the frame; assumed")
    # random telegraph noise
    rtn_fraction: float = _f(1e-4, "fraction of random-telegraph pixels; assumed", ge=0)
    rtn_three_level_fraction: float = _f(0.3, "share of RTN pixels with three levels", ge=0,
                                         le=1)
    rtn_step: tuple[float, float] = _f((3.0, 8.0), "level step range, x read_noise_median")
    rtn_switch: tuple[float, float] = _f((0.1, 0.5), "per-frame switching probability range")
    # saturation and nonlinearity
    full_well: float = _f(51400.0, "full-well capacity, e-; ZWO", gt=0)
    nonlinearity_coeff: float = _f(0.005, "c in x*(1-c*(|x|/65535)**p); 0.33% at 90% of "
                                   "full scale; study (< 0.5%)", ge=0)
    nonlinearity_power: float = _f(4.0, "p in the nonlinearity form; assumed", gt=0)

    @model_validator(mode="before")
    @classmethod
    def _flat_levels_from_exptimes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("flat_exptimes") is not None:
            n = len(data["flat_exptimes"])
            if data.get("flat_levels") not in (None, n):
                raise ValueError(f"flat_levels={data['flat_levels']} but {n} flat_exptimes")
            data = {**data, "flat_levels": n}
        return data

    @model_validator(mode="after")
    def _check(self) -> SimulationConfig:
        if min(self.shape) <= 0:
            raise ValueError(f"shape {self.shape} must be positive")
        times = list(self.dark_exptimes) + list(self.flat_exptimes or [])
        if any(t < 0 for t in times):
            raise ValueError("exposure times must be >= 0 s")
        for name, values in (("dark_exptimes", self.dark_exptimes),
                             ("flat exposure times", self.flat_ladder())):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct (one group per exposure time)")
        anomalous = (self.noisy_fraction + self.warm_fraction + self.hot_fraction
                     + self.dead_fraction + self.low_response_fraction + self.rtn_fraction)
        if anomalous > 0.5:
            raise ValueError(f"anomalous-pixel fractions add up to {anomalous} > 0.5")
        # the farthest corner from the optical centre must keep some light
        # (the radial loss is quadratic, vignetting_corner at a centred corner)
        cy, cx = self.vignetting_center
        ny, nx = self.shape
        far = 4.0 * (max(cy, 1 - cy) ** 2 * ny * ny + max(cx, 1 - cx) ** 2 * nx * nx) / (
            ny * ny + nx * nx)
        if 1.0 - self.vignetting_corner * far <= 0.0:
            raise ValueError(f"vignetting_corner={self.vignetting_corner:g} about the optical "
                             f"centre {tuple(self.vignetting_center)} leaves no light at the "
                             f"farthest corner (loss {self.vignetting_corner * far:.2f} >= 1)")
        c, p = self.nonlinearity_coeff, self.nonlinearity_power
        if c * (p + 1) * 2**p >= 1:  # nonlin(x) must rise up to 2x the ADC range
            raise ValueError("nonlinearity is not monotonic below 2x the ADC range")
        return self

    @property
    def n_frames(self) -> int:
        """Total number of frames in the dataset."""
        return (self.n_bias + len(self.dark_exptimes) * self.dark_frames
                + self.flat_levels * self.flat_frames)

    def dark_factor(self, temperature: float | np.ndarray) -> float | np.ndarray:
        """Dark-rate factor at ``temperature`` (deg C) relative to the set point."""
        return 2.0 ** ((np.asarray(temperature) - self.temperature) / self.dark_doubling)

    def nonlinearity(self, x: np.ndarray | float) -> np.ndarray:
        """Observed signal (ADU above bias) for a linear signal ``x`` (ADU)."""
        x = np.asarray(x, dtype=np.float64)
        p = self.nonlinearity_power
        return x * (1.0 - self.nonlinearity_coeff * (np.abs(x) / ADC_MAX) ** p)

    def flat_ladder(self) -> list[float]:
        """Flat exposure times (s), ascending."""
        if self.flat_exptimes is not None:
            return sorted(self.flat_exptimes)
        n = self.flat_levels  # about a quarter of the levels (at most 3) above the linear range
        top = list(self.flat_top_fractions)[: max(0, (n - 2) // 3)]
        fractions = list(np.linspace(self.flat_min_fraction, self.flat_max_fraction, n - len(top)))
        if n == 1:
            fractions = [self.flat_min_fraction]
        gain = (1 - self.gain2_fraction) * self.gain_mean + self.gain2_fraction * self.gain2_mean
        full_e = (ADC_MAX - self.bias_level) * gain  # e- at the ADC range, centre pixel
        return [max(0.001, round(float(f) * full_e / self.lamp_flux, 3)) for f in fractions + top]


@dataclass(frozen=True)
class RTNPixels:
    """Random-telegraph pixels: positions, level offsets (e-) and per-frame states."""

    y: np.ndarray  #: row, px
    x: np.ndarray  #: column, px
    levels: np.ndarray  #: (n, 3) level offsets, e- (level 0 is 0; NaN where unused)
    n_levels: np.ndarray  #: 2 or 3
    switch_probability: np.ndarray  #: probability of leaving the level between frames
    states: np.ndarray  #: (n, n_frames) uint8 level index of each frame

    def offsets(self, frame: int) -> np.ndarray:
        """Level offset (e-) of each RTN pixel in ``frame``."""
        return self.levels[np.arange(len(self.y)), self.states[:, frame]].astype(np.float32)


@dataclass(frozen=True)
class SensorTruth:
    """The true sensor behind a simulated dataset (maps are (ny, nx) arrays)."""

    gain: np.ndarray  #: e-/ADU
    read_noise: np.ndarray  #: e-
    bias: np.ndarray  #: ADU, fixed per-pixel bias incl. row/column pattern and gradients
    dark_rate: np.ndarray  #: e-/s at config.temperature, incl. glow, warm and hot pixels
    response: np.ndarray  #: relative pixel response (PRNU x defects), no vignetting
    vignetting: np.ndarray  #: relative illumination, 1 at the optical centre
    rtn_amplitude: np.ndarray  #: e-, largest RTN level offset (0 for normal pixels)
    defects: np.ndarray  #: uint16 bitmask, DEFECT_BITS
    rtn: RTNPixels
    frames: Table  #: file, type, level, exptime (s), time, temperature (C), drift (ADU), lamp_scale
    config: SimulationConfig
    scalars: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.gain.shape  # type: ignore[return-value]

    def has(self, name: str) -> np.ndarray:
        """Boolean map of the pixels carrying defect bit ``name`` (e.g. ``"HOT"``)."""
        return (self.defects & DEFECT_BITS[name]) != 0

    @classmethod
    def load(cls, path: str | Path) -> SensorTruth:
        """Read ``truth.fits`` written by :func:`simulate_dataset`."""
        with fits.open(path, memmap=False) as hdul:
            hdr = hdul[0].header
            maps = {name: np.asarray(hdul[name].data, dtype=hdul[name].data.dtype.newbyteorder("="))
                    for name in MAP_NAMES}
            rt = hdul["RTN"].data
            frames = Table.read(hdul["FRAMES"])
            states = np.zeros((len(rt), len(frames)), np.uint8)
            if hdul["RTN_STATES"].data is not None:
                states[...] = hdul["RTN_STATES"].data
            config = SimulationConfig.model_validate_json(hdr["CONFIG"])
            scalars = {k: hdr[k] for k in hdr if k not in ("CONFIG", "COMMENT", "HISTORY", "")
                       and k not in fits.PrimaryHDU().header}
        rtn = RTNPixels(np.asarray(rt["y"], np.int64), np.asarray(rt["x"], np.int64),
                        np.asarray(rt["levels"], np.float32), np.asarray(rt["n_levels"], np.uint8),
                        np.asarray(rt["switch_probability"], np.float32), states)
        return cls(maps["GAIN"], maps["READ_NOISE"], maps["BIAS"], maps["DARK_RATE"],
                   maps["RESPONSE"], maps["VIGNETTING"], maps["RTN_AMPLITUDE"], maps["DEFECTS"],
                   rtn, frames, config, scalars)


@dataclass(frozen=True)
class SimulationSummary:
    """What :func:`simulate_dataset` wrote."""

    out_dir: Path
    n_frames: int
    files: tuple[Path, ...]
    truth_path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "n_frames": self.n_frames,
                "files": [p.name for p in self.files], "truth_path": str(self.truth_path)}


# ----------------------------------------------------------------------------- maps
def _rng(config: SimulationConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=key))


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _corner_distance(shape: tuple[int, int], corner: str) -> np.ndarray:
    """Distance (fraction of the diagonal) of every pixel from a named corner."""
    ny, nx = shape
    diag = math.hypot(ny, nx)
    cy = 0 if corner.startswith("bottom") else ny - 1
    cx = 0 if corner.endswith("left") else nx - 1
    dy = ((np.arange(ny, dtype=np.float32) - cy) / diag)[:, None]
    dx = ((np.arange(nx, dtype=np.float32) - cx) / diag)[None, :]
    return np.sqrt(dy * dy + dx * dx)


def _gain_map(c: SimulationConfig) -> np.ndarray:
    rng = _rng(c, 0, _MAP_KEYS["gain"])
    second = rng.random(c.shape, dtype=np.float32) < c.gain2_fraction
    gain = _normal(rng, c.shape) * np.float32(c.gain_sigma)
    gain += np.where(second, np.float32(c.gain2_mean), np.float32(c.gain_mean))
    return gain


def _bias_map(c: SimulationConfig) -> np.ndarray:
    rng = _rng(c, 0, _MAP_KEYS["bias"])
    ny, nx = c.shape
    bias = _normal(rng, c.shape) * np.float32(c.bias_pixel_sigma)
    bias += (_normal(rng, (ny,)) * c.bias_row_sigma)[:, None]
    bias += (_normal(rng, (nx,)) * c.bias_col_sigma)[None, :]
    ramp_y = np.linspace(-0.5, 0.5, ny, dtype=np.float32)[:, None]
    ramp_x = np.linspace(-0.5, 0.5, nx, dtype=np.float32)[None, :]
    bias += np.float32(c.bias_gradient) * (ramp_y + ramp_x) / 2 + np.float32(c.bias_level)
    for corner, share in zip(("bottom-left", "bottom-right", "top-left", "top-right"),
                             rng.uniform(0.5, 1.0, 4), strict=True):
        bias += np.float32(share * c.bias_corner_amplitude) * np.exp(
            -_corner_distance(c.shape, corner) / np.float32(c.bias_corner_scale))
    return bias


def _vignetting_map(c: SimulationConfig) -> np.ndarray:
    ny, nx = c.shape
    half_diag2 = (ny * ny + nx * nx) / 4.0
    dy = (np.arange(ny, dtype=np.float32) - c.vignetting_center[0] * (ny - 1))[:, None]
    dx = (np.arange(nx, dtype=np.float32) - c.vignetting_center[1] * (nx - 1))[None, :]
    r2 = (dy * dy + dx * dx) / np.float32(half_diag2)
    return 1.0 - np.float32(c.vignetting_corner) * r2


def _defect_pixels(c: SimulationConfig) -> dict[str, np.ndarray]:
    """Disjoint flat indices of the injected classes (exact counts, rounded)."""
    n = c.shape[0] * c.shape[1]
    names = ("hot", "warm", "dead", "low_response", "rtn", "noisy")
    counts = [round(getattr(c, f"{k}_fraction") * n) for k in names]
    picked = _rng(c, 0, _MAP_KEYS["defects"]).choice(n, size=sum(counts), replace=False)
    bounds = np.cumsum([0, *counts])
    return {k: np.sort(picked[a:b]) for k, a, b in zip(names, bounds[:-1], bounds[1:], strict=True)}


def _rtn_pixels(c: SimulationConfig, flat_idx: np.ndarray, n_frames: int) -> RTNPixels:
    rng = _rng(c, 0, _MAP_KEYS["rtn"])
    n = flat_idx.size
    n_levels = np.where(rng.random(n) < c.rtn_three_level_fraction, 3, 2).astype(np.uint8)
    steps = rng.uniform(*c.rtn_step, size=(n, 2)) * c.read_noise_median
    levels = np.column_stack([np.zeros(n), steps[:, 0], steps.sum(axis=1)])
    levels[n_levels == 2, 2] = np.nan
    p_switch = rng.uniform(*c.rtn_switch, size=n)
    states = np.empty((n, n_frames), np.uint8)
    state = (rng.random(n) * n_levels).astype(np.uint8)
    for k in range(n_frames):  # Markov chain: leave with p_switch to another level
        if k:
            switch = rng.random(n) < p_switch
            jump = 1 + (rng.random(n) * (n_levels - 1)).astype(np.uint8)
            state = np.where(switch, (state + jump) % n_levels, state).astype(np.uint8)
        states[:, k] = state
    y, x = np.divmod(flat_idx, c.shape[1])
    return RTNPixels(y, x, levels.astype(np.float32), n_levels, p_switch.astype(np.float32),
                     states)


def draw_truth(config: SimulationConfig, frames: Table) -> SensorTruth:
    """Draw the fixed sensor maps of ``config`` (reproducible from ``config.seed``)."""
    c = config
    idx = _defect_pixels(c)
    rng = _rng(c, 0, _MAP_KEYS["read_noise"])
    read_noise = np.exp(_normal(rng, c.shape) * np.float32(c.read_noise_sigma_log))
    read_noise *= np.float32(c.read_noise_median)
    read_noise.flat[idx["noisy"]] = c.read_noise_median * np.exp(
        rng.uniform(*np.log(c.noisy_factor), size=idx["noisy"].size))

    rng = _rng(c, 0, _MAP_KEYS["dark"])
    dark = np.exp(_normal(rng, c.shape) * np.float32(c.dark_sigma_log))
    dark *= np.float32(c.dark_median)
    dark.flat[idx["warm"]] = c.warm_median * np.exp(c.warm_sigma_log * rng.standard_normal(
        idx["warm"].size))
    dark.flat[idx["hot"]] = np.exp(rng.uniform(*np.log(c.hot_rate), size=idx["hot"].size))
    dark += np.float32(c.glow_rate) * np.exp(-_corner_distance(c.shape, c.glow_corner)
                                             / np.float32(c.glow_scale))
    dark *= np.float32(2.0 ** ((c.temperature - c.dark_reference_temperature) / c.dark_doubling))

    rng = _rng(c, 0, _MAP_KEYS["response"])
    response = 1.0 + _normal(rng, c.shape) * np.float32(c.prnu_rms)
    response.flat[idx["dead"]] = rng.uniform(0.0, 0.3, size=idx["dead"].size)
    response.flat[idx["low_response"]] = rng.uniform(0.5, 0.8, size=idx["low_response"].size)

    rtn = _rtn_pixels(c, idx["rtn"], len(frames))
    rtn_amplitude = np.zeros(c.shape, np.float32)
    rtn_amplitude[rtn.y, rtn.x] = np.nanmax(rtn.levels, axis=1)

    defects = np.zeros(c.shape, np.uint16)
    for name in ("hot", "warm", "dead", "low_response", "rtn"):
        defects.flat[idx[name]] |= DEFECT_BITS[name.upper()]
    threshold = np.median(read_noise) + NOISY_SIGMA * median_abs_deviation(
        read_noise, axis=None, scale="normal")
    defects[read_noise > threshold] |= DEFECT_BITS["NOISY"]
    return SensorTruth(_gain_map(c), read_noise, _bias_map(c), dark, response,
                       _vignetting_map(c), rtn_amplitude, defects, rtn, frames, c)


# ------------------------------------------------------------------- frame schedule
def plan_frames(config: SimulationConfig) -> Table:
    """The acquisition sequence: bias, darks by exposure time, flats by level.

    Columns: ``file``, ``type``, ``level`` (0-based group index within its type,
    by exposure time), ``exptime`` (s), ``time`` (start of exposure, ISO UTC, us),
    ``temperature`` (CCD-TEMP, deg C), ``drift`` (bias drift, ADU),
    ``lamp_scale`` (illumination scale, 1 for bias and darks).
    """
    c = config
    groups: list[tuple[str, int, float, int]] = [("bias", 0, 0.0, c.n_bias)]
    groups += [("dark", i, float(t), c.dark_frames) for i, t in enumerate(sorted(c.dark_exptimes))]
    groups += [("flat", i, t, c.flat_frames) for i, t in enumerate(c.flat_ladder())]
    rows = [(kind, level, t, j) for kind, level, t, n in groups for j in range(n)]
    # (gap, temperature, drift, flicker) of frame k come from its own seed, so they do
    # not depend on how many frames follow
    draws = np.array([_frame_draws(c, k) for k in range(len(rows))]).reshape(-1, 4)
    gaps = c.frame_gap * draws[:, 0]
    temps = np.round(c.temperature + c.temperature_jitter * draws[:, 1], 2)
    white = c.bias_drift_rms * draws[:, 2]
    flicker = 1.0 + c.lamp_flicker_rms * draws[:, 3]
    exptimes = np.array([r[2] for r in rows], dtype=np.float64)
    starts = np.concatenate([[0.0], np.cumsum(exptimes + c.readout_time + gaps)[:-1]])
    table = Table()
    table["file"] = [_file_name(kind, level, t, j) for kind, level, t, j in rows]
    table["type"] = [r[0] for r in rows]
    table["level"] = np.array([r[1] for r in rows], dtype=np.int16)
    table["exptime"] = exptimes
    t0 = c.start_time.astimezone(UTC).replace(tzinfo=None)
    table["time"] = [(t0 + timedelta(seconds=float(s))).isoformat(timespec="microseconds")
                     for s in starts]
    table["temperature"] = temps
    table["drift"] = c.bias_drift_rate * starts / 3600.0 + white
    table["lamp_scale"] = np.where(table["type"] == "flat", flicker, 1.0)
    return table


def _frame_draws(c: SimulationConfig, k: int) -> np.ndarray:
    """Unit exponential gap and three standard normals of frame ``k``'s schedule."""
    rng = _rng(c, 2, k)
    return np.concatenate([[rng.exponential()], rng.standard_normal(3)])


def _file_name(kind: str, level: int, exptime: float, j: int) -> str:
    if kind == "bias":
        return f"bias_{j + 1:04d}.fits"
    if kind == "dark":
        t = f"{exptime:03.0f}" if exptime == int(exptime) else f"{exptime:.3f}".replace(".", "p")
        return f"dark_{t}s_{j + 1:04d}.fits"
    return f"flat_L{level + 1:02d}_{j + 1:04d}.fits"


def _iso(t: datetime, convention: str) -> str:
    """DATE-OBS as the acquisition program writes it (UTC, no zone suffix)."""
    if convention == "maxim":
        return t.strftime("%Y-%m-%dT%H:%M:%S")
    if convention == "nina":
        return t.isoformat(timespec="milliseconds")
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0"  # SharpCap writes 7 digits


def frame_header(config: SimulationConfig, row: Any) -> fits.Header:
    """FITS header of one frame in ``config.header_convention``."""
    hdr = fits.Header()
    hdr["IMAGETYP"] = (_IMAGETYP[config.header_convention][row["type"]], "type of image")
    hdr["EXPTIME"] = (float(row["exptime"]), "[s] exposure time")
    if config.header_convention == "nina":
        hdr["EXPOSURE"] = (float(row["exptime"]), "[s] exposure time")
    date = _iso(datetime.fromisoformat(str(row["time"])), config.header_convention)
    hdr["DATE-OBS"] = (date, "UTC start of exposure")
    hdr["CCD-TEMP"] = (float(row["temperature"]), "[C] sensor temperature")
    hdr["SET-TEMP"] = (config.temperature, "[C] cooler set point")
    hdr["INSTRUME"] = ("ZWO ASI6200MM Pro", "camera model")
    hdr["GAIN"] = (config.gain_setting, "sensor gain setting")
    hdr["OFFSET"] = (config.offset_setting, "sensor offset setting")
    hdr["XBINNING"] = (1, "binning factor in width")
    hdr["YBINNING"] = (1, "binning factor in height")
    hdr["XPIXSZ"] = (3.76, "[um] pixel width")
    hdr["YPIXSZ"] = (3.76, "[um] pixel height")
    hdr["SWCREATE"] = (f"sitiancal.simulate {__version__}", "simulated frame")
    return hdr


# ---------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _RenderMaps:
    """float32 maps used per frame: illumination (response x vignetting), e-/s dark
    rate at the set point, read noise (e-), 1/gain (ADU/e-), bias (ADU)."""

    illumination: np.ndarray
    dark_rate: np.ndarray
    read_noise: np.ndarray
    inv_gain: np.ndarray
    bias: np.ndarray
    rtn_flat: np.ndarray  # sorted flat indices of the RTN pixels
    rtn: RTNPixels

    @classmethod
    def from_truth(cls, truth: SensorTruth) -> _RenderMaps:
        order = np.argsort(truth.rtn.y * truth.shape[1] + truth.rtn.x)
        rtn = RTNPixels(*(np.asarray(a)[order] for a in (
            truth.rtn.y, truth.rtn.x, truth.rtn.levels, truth.rtn.n_levels,
            truth.rtn.switch_probability, truth.rtn.states)))
        return cls(truth.response * truth.vignetting, truth.dark_rate, truth.read_noise,
                   np.float32(1.0) / truth.gain, truth.bias, rtn.y * truth.shape[1] + rtn.x, rtn)


def _shot_electrons(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson(lam) e- (normal approximation above POISSON_NORMAL_THRESHOLD)."""
    small = lam < POISSON_NORMAL_THRESHOLD
    if small.all():
        return rng.poisson(lam).astype(np.float32)
    e = _normal(rng, lam.shape)
    e *= np.sqrt(lam)
    e += lam
    if small.any():
        e[small] = rng.poisson(lam[small])
    return e


def _apply_nonlinearity(x: np.ndarray, c: SimulationConfig) -> None:
    """In place: x -> x * (1 - c * (|x|/65535)**p), x clipped to 2x the ADC range first."""
    np.minimum(x, np.float32(2 * ADC_MAX), out=x)
    t = np.abs(x)
    t *= np.float32(1.0 / ADC_MAX)
    t **= np.float32(c.nonlinearity_power)
    t *= np.float32(-c.nonlinearity_coeff)
    t += np.float32(1.0)
    x *= t


def _render_frame(maps: _RenderMaps, config: SimulationConfig, frames: Table, k: int,
                  ) -> np.ndarray:
    """Frame ``k`` of the dataset as uint16 ADU (depends only on the seed, maps and row k)."""
    c, row = config, frames[k]
    rng = _rng(c, 1, k)
    ny, nx = c.shape
    t = float(row["exptime"])
    flux = c.lamp_flux * t * float(row["lamp_scale"]) if row["type"] == "flat" else 0.0
    dark_t = t * float(c.dark_factor(float(row["temperature"])))
    offset = (float(row["drift"]) + c.row_noise_sigma * rng.standard_normal(ny)).astype(np.float32)
    rtn_e = maps.rtn.offsets(k)
    out = np.empty(c.shape, np.uint16)
    band = max(1, _BAND_PIXELS // nx)
    for r0 in range(0, ny, band):
        rows = slice(r0, min(ny, r0 + band))
        if flux > 0 or dark_t > 0:
            lam = maps.dark_rate[rows] * np.float32(dark_t)
            if flux > 0:
                lam += maps.illumination[rows] * np.float32(flux)
            e = _shot_electrons(rng, lam)
            np.minimum(e, np.float32(c.full_well), out=e)
            e += _normal(rng, lam.shape) * maps.read_noise[rows]
        else:
            e = _normal(rng, (rows.stop - r0, nx)) * maps.read_noise[rows]
        lo, hi = np.searchsorted(maps.rtn_flat, [r0 * nx, rows.stop * nx])
        e.reshape(-1)[maps.rtn_flat[lo:hi] - r0 * nx] += rtn_e[lo:hi]
        e *= maps.inv_gain[rows]
        _apply_nonlinearity(e, c)
        e += maps.bias[rows]
        e += offset[rows, None]
        np.rint(e, out=e)
        np.clip(e, 0, ADC_MAX, out=e)
        out[rows] = e
    return out


# ------------------------------------------------------------------------- writing
def _truth_hdus(truth: SensorTruth) -> fits.HDUList:
    c = truth.config
    primary = fits.PrimaryHDU()
    h = primary.header
    gain_med = float(np.median(truth.gain))
    bias_med = float(np.median(truth.bias))
    adc_signal = ADC_MAX - bias_med  # ADU above bias at the ADC limit; invert nonlin(x)
    x, p, cc = adc_signal, c.nonlinearity_power, c.nonlinearity_coeff
    for _ in range(20):  # Newton on nonlin(x) = adc_signal
        x -= (float(c.nonlinearity(x)) - adc_signal) / (1 - cc * (p + 1) * (x / ADC_MAX) ** p)
    any_defect = truth.defects != 0
    cards = {
        "GAINMED": (gain_med, "[e-/ADU] median gain"),
        "GAIN1": (c.gain_mean, "[e-/ADU] main gain population mean"),
        "GAIN2": (c.gain2_mean, "[e-/ADU] second gain population mean"),
        "GAIN2FR": (c.gain2_fraction, "fraction in the second gain population"),
        "RNMED": (float(np.median(truth.read_noise)), "[e-] median read noise"),
        "DARKMED": (float(np.median(truth.dark_rate)), "[e-/s] median dark rate at TEMP"),
        "TEMP": (c.temperature, "[C] sensor set temperature"),
        "DBLTEMP": (c.dark_doubling, "[C] dark current doubling temperature"),
        "SATURATE": (ADC_MAX, "[ADU] ADC saturation"),
        "FULLWELL": (c.full_well, "[e-] full-well capacity"),
        "ADCFW": (x * gain_med, "[e-] signal at ADC saturation, median pixel"),
        "NLCOEFF": (c.nonlinearity_coeff, "nonlin(x)=x*(1-NLCOEFF*(|x|/NLSCALE)**NLPOWER)"),
        "NLPOWER": (c.nonlinearity_power, "nonlinearity power"),
        "NLSCALE": (ADC_MAX, "[ADU] nonlinearity scale"),
        "BIASLVL": (bias_med, "[ADU] median bias level"),
        "BIASDRFT": (c.bias_drift_rms, "[ADU] rms white bias drift per frame"),
        "ROWNOISE": (c.row_noise_sigma, "[ADU] temporal row noise rms"),
        "PRNU": (c.prnu_rms, "pixel response non-uniformity rms"),
        "FLICKER": (c.lamp_flicker_rms, "lamp flicker rms"),
        "NANOM": (int(any_defect.sum()), "pixels with any defect bit"),
        "FANOM": (float(any_defect.mean()), "fraction of pixels with any defect bit"),
        "SEED": (c.seed, "root seed"),
        "CONVENT": (c.header_convention, "header convention of the frames"),
    }
    for name, bit in DEFECT_BITS.items():
        cards[f"N{name[:7]}"] = (int(((truth.defects & bit) != 0).sum()), f"pixels flagged {name}")
    for i, name in enumerate(DEFECT_BITS):
        cards[f"MASKB{i}"] = (name, f"defect bit {i} (value {1 << i})")
    for key, value in cards.items():
        h[key] = value
    h["CONFIG"] = truth.config.model_dump_json()
    units = {"GAIN": "electron/adu", "READ_NOISE": "electron", "BIAS": "adu",
             "DARK_RATE": "electron/s", "RTN_AMPLITUDE": "electron"}
    arrays = (truth.gain, truth.read_noise, truth.bias, truth.dark_rate, truth.response,
              truth.vignetting, truth.rtn_amplitude, truth.defects)
    hdus: list[Any] = [primary]
    for name, data in zip(MAP_NAMES, arrays, strict=True):
        hdu = fits.ImageHDU(data, name=name)
        hdu.header["BUNIT"] = units.get(name, "")
        hdus.append(hdu)
    rtn = Table({"y": truth.rtn.y.astype(np.int32), "x": truth.rtn.x.astype(np.int32),
                 "n_levels": truth.rtn.n_levels, "levels": truth.rtn.levels,
                 "switch_probability": truth.rtn.switch_probability})
    hdus.append(fits.table_to_hdu(rtn))
    hdus[-1].name = "RTN"
    hdus.append(fits.ImageHDU(truth.rtn.states, name="RTN_STATES"))
    hdus.append(fits.table_to_hdu(truth.frames))
    hdus[-1].name = "FRAMES"
    return fits.HDUList(hdus)


def simulate_dataset(out_dir: str | Path, config: SimulationConfig,
                     progress: ProgressCallback | None = None) -> SimulationSummary:
    """Write the frames of ``config`` and ``truth.fits`` into ``out_dir``.

    Parameters
    ----------
    out_dir
        Directory (created if needed); existing files of the same names are replaced.
    config
        The simulation settings.
    progress
        ``progress(done, total)`` called after each frame (frames, not bytes).

    Returns
    -------
    SimulationSummary
        Number of frames, their paths and the truth file path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = plan_frames(config)
    truth = draw_truth(config, frames)
    truth_path = out / "truth.fits"
    _truth_hdus(truth).writeto(truth_path, overwrite=True)
    maps = _RenderMaps.from_truth(truth)
    del truth  # keep only the float32 maps rendering needs
    n = len(frames)
    files = []
    if progress is not None:
        progress(0, n)
    for k in range(n):
        path = out / str(frames["file"][k])
        data = _render_frame(maps, config, frames, k)
        fits.PrimaryHDU(data, header=frame_header(config, frames[k])).writeto(path, overwrite=True)
        files.append(path)
        if progress is not None:
            progress(k + 1, n)
    return SimulationSummary(out, n, tuple(files), truth_path)
