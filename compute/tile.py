"""All per-pixel work of one frame tile, in one function.

A calibration job is one pass over the frame cube, tile by tile. For each tile
:func:`process_tile` loads the bias stack, then each dark group, then each flat
level (one group at a time, so memory is bounded by one group's stack for one
tile), reduces them to per-pixel sufficient statistics and fits, and returns
per-pixel maps (float32) plus small partial sums. Global quantities that need
the whole frame (per-frame levels, the PTC turnoff, saturation) are computed
before and handed in through the :class:`TilePlan`; global statistics of the
maps (medians, mixtures, masks) are computed after, from the assembled maps.

Pixel I/O is injected: ``load(indices)`` returns the ``(F, ty, tx)`` stack of the
given cube frames for this tile. Nothing here knows where frames are stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numba
import numpy as np
from scipy.stats import f as f_dist

from sitiancal.compute.dark import fit_dark_rate
from sitiancal.compute.defects import DefectConfig, detect_rtn
from sitiancal.compute.gain import LEVEL_OUTLIER_ALPHA, fit_pixel_gain
from sitiancal.compute.linearity import pixel_linearity_residuals
from sitiancal.compute.stats import (
    LinearOffset,
    Moments,
    clipped_stats_and_moments,
    combine_moments,
    group_moments,
    pixel_time_trend,
)

#: ``load(frame_indices) -> (F, ty, tx)`` array of raw counts for one tile.
TileLoader = Callable[[Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class FrameGroup:
    """Frames of one type taken with one exposure time (one dark group or flat level).

    Attributes
    ----------
    kind : str
        ``"bias"``, ``"dark"`` or ``"flat"``.
    exptime : float
        Exposure time (s).
    indices : tuple of int
        Frame indices in the cube.
    scale : tuple of float or None
        Per-frame illumination correction factors (flats): the bias-subtracted
        signal of frame ``f`` is multiplied by ``scale[f]`` so that every frame
        of the level has the level's mean illumination.
    """

    kind: str
    exptime: float
    indices: tuple[int, ...]
    scale: tuple[float, ...] | None = None

    @property
    def n(self) -> int:
        """Number of frames in the group."""
        return len(self.indices)


@dataclass(frozen=True)
class CalibrationParams:
    """Parameters of a calibration job; every field is recorded in provenance.

    Attributes
    ----------
    clip_sigma, clip_maxiters : float, int
        Sigma clipping of the master bias (3 sigma, median centre: the usual
        ccdproc/astropy combine default).
    gain_max_fraction : float
        Flat levels used by the per-pixel gain fit stay below this fraction of
        saturation (DESIGN.md section 4: ~70%).
    min_gain_frames : int
        Frames per flat level needed for per-pixel temporal statistics; below
        it the per-pixel products are skipped with a reason.
    lin_lo, lin_hi : float
        Linearity fit range as fractions of saturation (DESIGN.md: 5-95%).
    lin_levels : int
        Number of flat levels at which per-pixel linearity residual maps are kept.
    ptc_pairs_per_level, ptc_region : int
        Conventional PTC: frame pairs used per level and the side (pixels) of
        the central region (EMVA 1288 and most labs use a central region).
    max_batch_frames : int
        Dark and flat groups larger than this are reduced in sub-batches.
    mixture_samples : int
        Pixels (a seeded random subset) used by the population mixtures; the
        precision of a population's weight scales as 1/sqrt(mixture_samples).
    seed : int
        Seed of every random choice (RTN dithering, mixture subsampling).
    """

    clip_sigma: float = 3.0
    clip_maxiters: int = 5
    gain_max_fraction: float = 0.7
    min_gain_frames: int = 5
    lin_lo: float = 0.05
    lin_hi: float = 0.95
    lin_levels: int = 3
    ptc_pairs_per_level: int = 4
    ptc_region: int = 1024
    max_batch_frames: int = 64
    mixture_samples: int = 1_000_000
    seed: int = 0
    defects: DefectConfig = field(default_factory=DefectConfig)

    def to_dict(self) -> dict:
        """JSON-able form, for provenance and content keys."""
        out = asdict(self)
        out["defects"] = asdict(self.defects)
        return out


@dataclass(frozen=True)
class TilePlan:
    """What every tile task needs to know about the whole dataset.

    Attributes
    ----------
    bias : FrameGroup or None
        The bias frames.
    bias_time_s : tuple of float
        Time of each bias frame (s from the first), for the per-pixel trend.
    bias_frame_level : tuple of float
        Per-frame clipped mean of each bias frame (ADU): removed before RTN
        and trend statistics so a global drift is not a pixel property.
    darks, flats : tuple of FrameGroup
        Dark groups and flat levels, ordered by exposure time.
    flat_dark : tuple of int or None
        For each flat level, the index of the dark group with the same
        exposure time (EMVA 1288 style correction) or None.
    saturation : float
        Bias-subtracted signal (ADU) at which the sensor saturates (PTC turnoff).
    gain_levels : tuple of bool
        Flat levels usable for per-pixel gain (below ``gain_max_fraction`` of
        saturation), or empty when per-pixel gain is not computed.
    lin_used : tuple of bool
        Flat levels inside the linearity fit range.
    lin_at : tuple of int
        Flat levels at which per-pixel linearity residual maps are kept.
    flat_ref : int or None
        Flat level used for the master flat (the brightest unsaturated level
        below ``gain_max_fraction`` of saturation).
    linearizer : tuple of float
        Polynomial (highest power first) mapping observed signal (ADU) to
        linearised signal, from the linearity stage; empty when unknown. The
        per-pixel gain fit uses linearised means and variances, so the
        sensor's nonlinearity near the top of the fit range does not bias g.
    bias_quantum : int
        Step (ADU) of the bias frames' counts (``compute.defects.count_quantum``):
        1 for a 16-bit ADC, 4 or 16 for a 14- or 12-bit one scaled to 16 bits.
    bias_floor : bool
        True when the bias frames reach 0 ADU, the ADC floor (a camera offset
        too low for its read noise): the tile pass then leaves the pixels whose
        bias series reaches the floor out of the RTN test, whose levels and
        Gaussian within-level noise a cut-off series does not have.
    gain : float
        The camera's gain (e-/ADU, the conventional PTC's; NaN without one):
        the shot noise a dark group's variance may hold, for the test that
        leaves a group with a cosmic-ray hit out of a pixel's dark fit.
    flat_offset : float
        Offset (ADU) subtracted from flat levels that have neither a master
        bias nor darks to subtract: the flat ladder's signal extrapolated to
        0 s (:func:`compute.plan.ladder_offset`) in a set of flats alone; 0
        where unknown.
    flat_weights : tuple of float
        Weight of each flat level's mean in the master flat's signal (in the
        reference level's ADU, 0 for a level left out;
        ``compute.plan._flat_weights``); empty: the reference level alone.
    """

    bias: FrameGroup | None
    bias_time_s: tuple[float, ...]
    bias_frame_level: tuple[float, ...]
    darks: tuple[FrameGroup, ...]
    flats: tuple[FrameGroup, ...]
    flat_dark: tuple[int | None, ...]
    saturation: float
    gain_levels: tuple[bool, ...]
    lin_used: tuple[bool, ...]
    lin_at: tuple[int, ...]
    flat_ref: int | None
    linearizer: tuple[float, ...] = ()
    bias_quantum: int = 1
    bias_floor: bool = False
    gain: float = float("nan")
    flat_offset: float = 0.0
    flat_weights: tuple[float, ...] = ()

    @property
    def has_dark_fit(self) -> bool:
        """True when the dark series has at least two distinct exposure times."""
        times = {g.exptime for g in self.darks}
        if self.bias is not None:
            times.add(0.0)
        return len(times) >= 2 and len(self.darks) >= 1

    def master_flat_weights(self) -> tuple[float, ...]:
        """``flat_weights``, or the reference level alone where the plan gives none."""
        if self.flat_weights or self.flat_ref is None:
            return self.flat_weights
        return tuple(float(i == self.flat_ref) for i in range(len(self.flats)))

    def used_frames(self) -> tuple[int, ...]:
        """Cube indices of the frames the tile pass uses (bias, dark and flat groups), ascending.

        Frames the plan left out (a level jump, a failed flat exposure, a
        single bias frame) are not among them.
        """
        groups = [*((self.bias,) if self.bias is not None else ()), *self.darks, *self.flats]
        return tuple(sorted({i for g in groups for i in g.indices}))

    @property
    def has_pixel_gain(self) -> bool:
        """True when per-pixel temporal gain statistics are computed."""
        return sum(self.gain_levels) >= 3


#: Names, units and descriptions of the per-pixel maps a tile produces.
MAP_SPECS: dict[str, tuple[str, str]] = {
    "bias_mean": ("ADU", "sigma-clipped mean of the bias stack (master bias)"),
    "bias_std": ("ADU", "temporal standard deviation of the bias stack (ddof=1)"),
    "bias_trend_z": ("", "significance of the per-pixel bias drift over the series"),
    "rtn": ("", "1 where the bias stack shows multi-level telegraph noise"),
    "dark_rate": ("ADU/s", "dark rate: weighted slope of mean signal vs exposure time"),
    "dark_rate_err": ("ADU/s", "1-sigma uncertainty of dark_rate"),
    "dark_chi2": ("", "reduced chi-square of the dark fit"),
    "flat_signal": ("ADU", "offset-subtracted flat signal: the flat levels' means weighted by "
                           "their electrons, in the reference level's ADU"),
    "gain": ("e-/ADU", "per-pixel gain from the temporal mean-variance fit"),
    "gain_err": ("e-/ADU", "1-sigma uncertainty of gain"),
    "gain_read_var": ("ADU2", "intercept of the per-pixel mean-variance fit"),
    "gain_chi2": ("", "reduced chi-square of the per-pixel gain fit"),
    "gain_n_used": ("", "flat levels used by the per-pixel gain fit"),
}


@dataclass
class TileResult:
    """Per-pixel maps of one tile and small partial sums.

    Attributes
    ----------
    maps : dict of str to ndarray
        2-D float32 maps named as in :data:`MAP_SPECS` (only those computed),
        plus ``lin_resid`` of shape ``(K, ty, tx)`` (% residual) when computed.
    partials : dict of str to float
        Sums that combine across tiles by addition.
    """

    maps: dict[str, np.ndarray]
    partials: dict[str, float]


def _moments(load: TileLoader, group: FrameGroup, *,
             offset: np.ndarray | float | LinearOffset | None,
             max_batch: int, out: tuple[np.ndarray, np.ndarray] | None = None) -> Moments:
    """Per-pixel moments of a group, reduced in sub-batches of at most ``max_batch`` frames.

    ``out``: the mean and variance are stored there (float32 or float64 maps,
    see :func:`compute.stats.group_moments`), straight from the kernel when
    the group is one batch, else after the batches are combined.
    """
    result: Moments | None = None
    scale = np.asarray(group.scale, dtype=np.float64) if group.scale is not None else None
    one_batch = group.n <= max_batch
    for start in range(0, group.n, max_batch):
        idx = group.indices[start:start + max_batch]
        part = group_moments(
            load(idx), offset=offset,
            scale=None if scale is None else scale[start:start + max_batch],
            out=out if one_batch else None,
        )
        result = part if result is None else combine_moments(result, part)
    assert result is not None
    if out is not None and not one_batch:
        out[0][...] = result.mean
        out[1][...] = result.var
        result = Moments(n=result.n, mean=out[0], var=out[1])
    return result


@contextmanager
def _saturated_left_out(means: np.ndarray, times: Sequence[float],
                        limit: float) -> Iterator[None]:
    """Leave each pixel's saturated exposure groups out of the dark fit, for its duration.

    ``means``: ``(K, ...)`` group means (ADU, offset included) at exposure times
    ``times`` (s). A group is saturated for a pixel when its mean exceeds the
    pixel's mean at the shortest exposure by more than ``limit`` (ADU; the
    plan's saturation above the offset times the linearity fit's upper
    fraction): a hot pixel clipped at its full well or the ADC limit in the
    longest darks, whose rate those groups would pull down (by a third at a
    1200 s dark on a 20 000 e- full well, measured). Such groups are set to NaN
    (the fit leaves them out per pixel) where groups of at least two
    exposure times remain, and restored afterwards (the means are also the
    flats' offsets). A pixel saturated at all but one exposure time (the
    bias and a 0 s dark group are one time) keeps them all: its rate is then
    a lower bound, and it is still a hot pixel.
    """
    k_ref = int(np.argmin(times))
    saturated = np.zeros(means.shape, dtype=bool)
    excess = np.empty(means.shape[1:], dtype=means.dtype)
    for k in range(means.shape[0]):  # one group's difference at a time
        np.subtract(means[k], means[k_ref], out=excess)
        np.greater(excess, limit, out=saturated[k])
    del excess
    with _groups_left_out(saturated, times, means):
        yield


@contextmanager
def _groups_left_out(drop: np.ndarray, times: Sequence[float],
                     *arrays: np.ndarray) -> Iterator[None]:
    """Set ``arrays`` to NaN where ``drop`` (K, ...) marks a pixel's group, for its duration.

    A pixel's groups are dropped only where groups of at least two exposure
    times remain for it (groups already NaN in the first array count as
    gone), so every pixel keeps a rate; the values are restored afterwards.
    ``drop`` is consumed.
    """
    t = np.asarray(times, dtype=np.float64)
    left = ~(drop | np.isnan(arrays[0]))  # (K, ...): the pixel's group remains
    kept_times = np.zeros(drop.shape[1:], dtype=np.int16)
    for ti in np.unique(t):  # exposure times with a group left
        kept_times += np.any(left[t == ti], axis=0)
    del left
    drop &= (kept_times >= 2)[None]
    del kept_times
    # the few dropped values by flat index: np.nonzero of the (K, ...) mask took
    # ~22 ms per 2 Mpx tile at six groups with nothing to drop, flatnonzero 0.5 ms
    where = np.unravel_index(np.flatnonzero(drop), drop.shape)
    kept = [a[where] for a in arrays]
    for a in arrays:
        a[where] = np.nan
    try:
        yield
    finally:
        for a, values in zip(arrays, kept, strict=True):
            a[where] = values


#: False-alarm probability per pixel and group of :func:`_hit_groups_left_out`'s test.
HIT_GROUP_ALPHA = 1e-6


@contextmanager
def _hit_groups_left_out(means: np.ndarray, variances: np.ndarray, times: Sequence[float],
                         counts: Sequence[int], gain: float) -> Iterator[None]:
    """Leave each pixel's dark groups with an outlying frame out of its dark fit, for its duration.

    A cosmic ray that hits a pixel during a long dark adds hundreds to
    thousands of ADU to one frame: the group's mean and the pixel's rate
    with it (rates of 0.06-0.9 e-/s for a truth of 0.002 on a simulated set,
    not flagged: the hit inflates the rate's error too). Such a group's
    sample variance exceeds what the pixel's noise allows, ``a + S / g``
    (``a``: the sample variance of the group of the shortest exposure, the
    read noise; ``S``: the group's signal over that group, ADU; ``g``: the
    camera's gain, e-/ADU), by far more than the ratio of two sample
    variances scatters: a one-sided F test (``n - 1`` and ``n_ref - 1``
    degrees of freedom) at :data:`HIT_GROUP_ALPHA`. (A chi-square limit,
    which takes ``a`` as known, left 1.5e-4 of clean pixels' groups out
    where ``a`` came from 20 bias frames; the F limit 1.4e-6; measured.) Such
    groups' means and variances are set to NaN (the fit leaves them out per
    pixel) where at least two exposure times remain, and restored afterwards
    (the means are also the flats' offsets). Nothing is tested without a
    gain or with a single frame per group.
    """
    n = np.asarray(counts, dtype=np.int64)
    t = np.asarray(times, dtype=np.float64)
    if not (np.isfinite(gain) and gain > 0) or means.shape[0] < 3:
        yield
        return
    k_ref = int(np.argmin(t))
    if n[k_ref] < 2:
        yield
        return
    read = np.maximum(variances[k_ref], 1.0 / 12.0)  # ADU^2, at least the rounding's
    hit = np.zeros(means.shape, dtype=bool)
    allowed = np.empty(means.shape[1:], dtype=np.result_type(means, read))
    for k in range(means.shape[0]):
        if k == k_ref or n[k] < 2:
            continue
        q = float(f_dist.isf(HIT_GROUP_ALPHA, n[k] - 1, n[k_ref] - 1))
        # q * (read + max(means[k] - means[k_ref], 0) / gain), in place
        np.subtract(means[k], means[k_ref], out=allowed)
        np.maximum(allowed, 0.0, out=allowed)
        allowed /= gain
        allowed += read
        allowed *= q
        np.greater(variances[k], allowed, out=hit[k])
    del allowed
    with _groups_left_out(hit, times, means, variances):
        yield


def tile_loads(plan: TilePlan, max_batch: int) -> list[tuple[int, ...]]:
    """The frame indices of each ``load`` call of :func:`process_tile`, in call order.

    The bias stack (when it has at least two frames), then each dark group and
    each flat level in batches of at most ``max_batch`` frames (the job's
    ``CalibrationParams.max_batch_frames``).
    A loader may read the next entry ahead while the current one is reduced
    (``compute.graph``); the order is tested against the calls made.
    """
    loads: list[tuple[int, ...]] = []
    if plan.bias is not None and plan.bias.n >= 2:
        loads.append(tuple(plan.bias.indices))
    for group in (*plan.darks, *plan.flats):
        for start in range(0, group.n, max_batch):
            loads.append(tuple(group.indices[start:start + max_batch]))
    return loads


def process_tile(load: TileLoader, plan: TilePlan, params: CalibrationParams, *,
                 threads: int | None = None, origin: tuple[int, int] = (0, 0),
                 frame_width: int | None = None) -> TileResult:
    """Compute every per-pixel quantity of one tile.

    Parameters
    ----------
    load : callable
        ``load(indices) -> ndarray (F, ty, tx)`` of raw counts (ADU).
    plan : TilePlan
        Dataset-wide inputs (groups, per-frame levels, saturation).
    params : CalibrationParams
        Job parameters.
    threads : int, optional
        numba threads of the compiled kernels for this call (numba's setting
        is per calling thread, and restored afterwards). A scheduler running
        T tiles at once on C cores should pass ``max(1, C // T)`` so that
        the tasks do not oversubscribe the cores; None keeps numba's setting
        (all cores, or ``NUMBA_NUM_THREADS``).
    origin : (int, int)
        Sensor position ``(y, x)`` of the tile's first pixel, and
    frame_width : int, optional
        the frame's width (pixels; default: the tile's): the RTN dither of a
        pixel is keyed by its sensor index, so flags do not depend on the tiling.

    Returns
    -------
    TileResult
        float32 maps (see :data:`MAP_SPECS`) and partial sums.

    Notes
    -----
    Every kernel is compiled (numba) and reads each group's stack once; the
    bias stack is sorted once per pixel block for the master bias, its plain
    moments and the RTN test. Measured throughput: ``benchmarks/kernels.py``.
    """
    where = (int(origin[0]), int(origin[1]), frame_width)
    if threads is None:
        return _process_tile(load, plan, params, where)
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        return _process_tile(load, plan, params, where)
    finally:
        numba.set_num_threads(previous)


def _level_major(n_levels: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ``(..., L)`` views of two level-major ``(L, ...)`` arrays (each level's plane contiguous)."""
    return tuple(np.moveaxis(np.empty((n_levels, *shape), np.float32), 0, -1)  # type: ignore[return-value]
                 for _ in range(2))


def _sensor_index(where: tuple[int, int, int | None], shape: tuple[int, ...]) -> np.ndarray:
    """Sensor indices ``y * width + x`` of a tile's pixels, row-major."""
    y0, x0, width = where
    ty, tx = shape[-2], shape[-1]
    w = int(width) if width is not None else tx
    rows = (np.arange(y0, y0 + ty, dtype=np.int64) * w)[:, None]
    return (rows + np.arange(x0, x0 + tx, dtype=np.int64)[None, :]).ravel()


def _process_tile(load: TileLoader, plan: TilePlan, params: CalibrationParams,
                  where: tuple[int, int, int | None] = (0, 0, None)) -> TileResult:
    """:func:`process_tile` with numba's current thread setting."""
    maps: dict[str, np.ndarray] = {}
    partials: dict[str, float] = {}
    f32 = np.float32

    # ---- bias ---------------------------------------------------------------
    master: np.ndarray | None = None
    bias_mom: Moments | None = None
    if plan.bias is not None and plan.bias.n >= 2:
        stack = load(plan.bias.indices)
        # master bias (clipped mean) and temporal noise (plain moments) in one pass
        clipped, bias_mom = clipped_stats_and_moments(
            stack, sigma=params.clip_sigma, maxiters=params.clip_maxiters)
        master = np.asarray(clipped.mean, dtype=np.float64)
        level = np.asarray(plan.bias_frame_level, dtype=np.float64)
        maps["bias_mean"] = master.astype(f32)
        maps["bias_std"] = np.sqrt(bias_mom.var).astype(f32)
        if plan.bias.n >= 3:
            trend = pixel_time_trend(stack, np.asarray(plan.bias_time_s), frame_level=level)
            maps["bias_trend_z"] = np.asarray(trend.z, dtype=f32)
            rtn = detect_rtn(stack, frame_level=level, config=params.defects, seed=params.seed,
                             pixel_index=_sensor_index(where, stack.shape),
                             quantum=plan.bias_quantum)
            if plan.bias_floor:  # series cut off at 0 ADU are not Gaussian: no RTN test
                rtn &= stack.min(axis=0) > 0
            maps["rtn"] = rtn.astype(f32)
        del stack

    # ---- darks --------------------------------------------------------------
    dark_means: list[np.ndarray] = []
    dark_rate: np.ndarray | None = None
    if plan.darks:
        times, counts = [], []
        # (K, ...) float64 means and variances, the zero-exposure point (the bias
        # moments) first: each group's kernel writes its own plane, and the fit
        # takes the (..., K) views (strided input; no stacked copy)
        k0 = int(bias_mom is not None)
        means = variances = np.empty(0)
        sized = bias_mom is not None
        if bias_mom is not None:
            means = np.empty((1 + len(plan.darks), *bias_mom.mean.shape))
            variances = np.empty_like(means)
            times.append(0.0)
            means[0], variances[0] = bias_mom.mean, bias_mom.var
            counts.append(plan.bias.n if plan.bias else 0)
        for k, group in enumerate(plan.darks, start=k0):
            planes = (means[k], variances[k]) if sized else None
            mom = _moments(load, group, offset=None, max_batch=params.max_batch_frames,
                           out=planes)
            if not sized:  # no bias moments: the first group gives the shape
                means = np.empty((len(plan.darks), *mom.mean.shape))
                variances = np.empty_like(means)
                means[0], variances[0] = mom.mean, mom.var
                sized = True
            dark_means.append(means[k])
            times.append(group.exptime)
            counts.append(group.n)
        if plan.has_dark_fit:
            with _saturated_left_out(means, times, params.lin_hi * plan.saturation), \
                    _hit_groups_left_out(means, variances, times, counts, plan.gain):
                fit = fit_dark_rate(np.asarray(times), np.moveaxis(means, 0, -1),
                                    np.moveaxis(variances, 0, -1), np.asarray(counts))
            dark_rate = np.asarray(fit.rate, dtype=np.float64)
            maps["dark_rate"] = dark_rate.astype(f32)
            maps["dark_rate_err"] = np.asarray(fit.rate_err, dtype=f32)
            maps["dark_chi2"] = np.asarray(fit.chi2_red, dtype=f32)
            if master is None:
                # EMVA 1288 style sets have no bias frames: the dark intercept is the bias.
                master = np.asarray(fit.offset, dtype=np.float64)

    # ---- flats --------------------------------------------------------------
    if plan.flats:
        # (ty, tx, L) float32 views of level-major (L, ty, tx) arrays: each level is
        # one contiguous write (into (ty, tx, L) memory it was a scatter with stride
        # L, ~0.4 s per 2 Mpx band at 20 levels); the fits take the strided views
        # and widen per value
        mean = var = np.empty(0, dtype=f32)
        sized = master is not None
        if master is not None:
            mean, var = _level_major(len(plan.flats), master.shape)
        for li, group in enumerate(plan.flats):
            match = plan.flat_dark[li]
            offset: np.ndarray | float | LinearOffset
            if match is not None:
                offset = dark_means[match]
            elif master is not None and dark_rate is not None:
                # master + dark_rate * t, evaluated inside the moments kernel
                offset = LinearOffset(master, dark_rate, group.exptime)
            elif master is not None:
                offset = master
            elif dark_means:  # no bias, no dark fit: the shortest darks' mean, as the plan
                offset = dark_means[0]
            else:
                offset = plan.flat_offset
            # the kernel stores each level's float32 plane (the float64 result rounded once)
            planes = (mean[..., li], var[..., li]) if sized else None
            mom = _moments(load, group, offset=offset, max_batch=params.max_batch_frames,
                           out=planes)
            if not sized:  # no master: the first level gives the shape
                mean, var = _level_major(len(plan.flats), mom.mean.shape)
                sized = True
            if planes is None:
                mean[..., li] = mom.mean
                var[..., li] = mom.var
        weights = plan.master_flat_weights()
        if weights:
            maps["flat_signal"] = _combined_flat(mean, var, plan.flats, weights, partials)
        if plan.has_pixel_gain:
            use = np.asarray(plan.gain_levels, dtype=bool)
            lev = np.flatnonzero(use)
            # a contiguous run of levels is a view (no copy); the fit accepts strided input
            pick = slice(lev[0], lev[-1] + 1) if np.all(np.diff(lev) == 1) else lev
            n = np.asarray([g.n for g in plan.flats], dtype=np.float64)
            # float32 level statistics, widened per value inside the compiled fit; with a
            # linearizer the fit uses m' = P(m), v' = v P'(m)^2 (linearised counts).
            # a level whose variance lies far above the prediction of the pixel's other
            # levels (a cosmic ray in one of its frames) is left out of that pixel's fit;
            # the bias frames' temporal variance pins the prediction's intercept
            gfit = fit_pixel_gain(mean[..., pick], var[..., pick], n[use],
                                  max_mean=params.gain_max_fraction * plan.saturation,
                                  linearizer=np.asarray(plan.linearizer, dtype=np.float64)
                                  if plan.linearizer else None,
                                  reject_alpha=LEVEL_OUTLIER_ALPHA,
                                  read_var=None if bias_mom is None or plan.bias is None
                                  else (bias_mom.var, plan.bias.n))
            if gfit.left_out is not None:
                partials["gain_levels_left_out"] = float(np.count_nonzero(gfit.left_out >= 0))
            maps["gain"] = np.asarray(gfit.gain, dtype=f32)
            maps["gain_err"] = np.asarray(gfit.gain_err, dtype=f32)
            maps["gain_read_var"] = np.asarray(gfit.read_var, dtype=f32)
            maps["gain_chi2"] = np.asarray(gfit.chi2_red, dtype=f32)
            maps["gain_n_used"] = np.asarray(gfit.n_used, dtype=f32)
        if plan.lin_at and sum(plan.lin_used) >= 2:
            resid = pixel_linearity_residuals(
                np.asarray([g.exptime for g in plan.flats]), mean,
                used=np.asarray(plan.lin_used, dtype=bool), at=np.asarray(plan.lin_at),
            )
            maps["lin_resid"] = np.moveaxis(np.asarray(resid, dtype=f32), -1, 0)
    if bias_mom is not None:
        partials["bias_var_sum"] = float(np.nansum(bias_mom.var))
        partials["bias_var_count"] = float(np.isfinite(bias_mom.var).sum())
    return TileResult(maps=maps, partials=partials)


def _combined_flat(mean: np.ndarray, var: np.ndarray, flats: Sequence[FrameGroup],
                   weights: Sequence[float], partials: dict[str, float]) -> np.ndarray:
    """The master flat's signal: the flat levels' means weighted by ``weights``.

    ``mean``, ``var``: ``(..., L)`` per-level means and per-frame temporal
    variances (ADU, ADU^2). The weighted sum is in the reference level's ADU;
    the sum and count of its temporal variance ``sum_l w_l^2 var_l / n_l``
    (float64 sums) go to the partial sums, for the PRNU. float32 (the levels'
    planes are).
    """
    signal = np.zeros(mean.shape[:-1], dtype=np.float32)
    signal_var = np.zeros_like(signal)
    for li, w in enumerate(weights):
        if w > 0:
            signal += np.float32(w) * mean[..., li]
            signal_var += np.float32(w * w / flats[li].n) * var[..., li]
    partials["flat_var_sum"] = float(np.nansum(signal_var, dtype=np.float64))
    partials["flat_var_count"] = float(np.isfinite(signal_var).sum())
    return signal


def expected_maps(plan: TilePlan) -> dict[str, tuple[int, ...]]:
    """Maps that :func:`process_tile` will produce for this plan, with their leading shape.

    A sink can create its arrays up front from this (``()`` for a 2-D map,
    ``(K,)`` for ``lin_resid``).
    """
    names: list[str] = []
    if plan.bias is not None and plan.bias.n >= 2:
        names += ["bias_mean", "bias_std"]
        if plan.bias.n >= 3:
            names += ["bias_trend_z", "rtn"]
    if plan.darks and plan.has_dark_fit:
        names += ["dark_rate", "dark_rate_err", "dark_chi2"]
    out: dict[str, tuple[int, ...]] = {name: () for name in names}
    if plan.flats:
        if plan.flat_ref is not None:
            out["flat_signal"] = ()
        if plan.has_pixel_gain:
            for name in ("gain", "gain_err", "gain_read_var", "gain_chi2", "gain_n_used"):
                out[name] = ()
        if plan.lin_at and sum(plan.lin_used) >= 2:
            out["lin_resid"] = (len(plan.lin_at),)
    return out
