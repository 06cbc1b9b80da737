"""Dataset-wide analysis that precedes the per-pixel pass.

Everything here works on per-frame scalars (recorded while the cube was
built) and on small central regions of a few frames: grouping frames by type
and exposure time, lamp-flicker correction factors, the conventional photon
transfer curve and read noise (frame-pair differences), the linearity ladder
and the saturation level. The result is a :class:`~sitiancal.compute.tile.TilePlan`
that every tile task receives, plus the scalar products of this stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import theilslopes

from sitiancal.compute.bias import BiasStability, bias_stability, temporal_row_noise
from sitiancal.compute.defects import count_quantum
from sitiancal.compute.linearity import LinearityFit, fit_linearity
from sitiancal.compute.ptc import PairStats, PTCFit, find_turnoff, fit_ptc, pair_stats
from sitiancal.compute.readnoise import ConventionalReadNoise, conventional_read_noise
from sitiancal.compute.tile import CalibrationParams, FrameGroup, TilePlan

#: ``read_region(indices) -> (F, ry, rx)`` raw counts of the central region of frames.
RegionReader = Callable[[Sequence[int]], np.ndarray]


def central_window(shape: tuple[int, int], side: int) -> tuple[slice, slice]:
    """Rows and columns of the plan stage's central region of a frame.

    Parameters
    ----------
    shape
        Frame shape ``(ny, nx)``, pixels.
    side
        Wanted side of the square (``CalibrationParams.ptc_region``), pixels;
        at most half the frame's height and width (the whole axis for a
        frame of one row or column).

    Returns
    -------
    (slice, slice)
        ``(ys, xs)``, centred.
    """
    ny, nx = shape
    ry, rx = min(side, ny // 2 or ny), min(side, nx // 2 or nx)
    y0, x0 = (ny - ry) // 2, (nx - rx) // 2
    return slice(y0, y0 + ry), slice(x0, x0 + rx)


#: Largest raw count of a 16-bit ADC (ADU).
ADC_MAX = 65535.0
#: Fraction of the bias readings at 0 ADU (the ADC floor) above which the plan
#: notes that the camera offset is too low: a Gaussian bias cut off there is
#: 3.7 sigma above the floor, where the cut changes a pixel's mean and std by
#: less than 1e-3 of sigma; more readings at the floor bias them visibly (5 % at
#: a 1.9 sigma offset: the per-pixel read noise 4 % low on a simulated set).
_FLOOR_NOTE = 1e-4
#: A flat ladder has left the read-noise regime when, at its highest level, the
#: shot-noise variance is at least this many times the read-noise variance
#: (shot noise >= ~3.2x read noise); below it the PTC, per-pixel gain and flat
#: would be dominated by read noise, and are not computed.
SHOT_OVER_READ_VARIANCE = 10.0


def _read_noise_regime(points: Sequence[dict], conv_rn: ConventionalReadNoise | None
                       ) -> str | None:
    """Why the flat ladder is unusable for noise statistics, or None if it is usable.

    Needs the read noise of the bias frames (``conv_rn``); without it, None.
    ``points`` are the conventional PTC points (``mean`` above the offset and
    single-frame temporal ``var``, ADU and ADU^2).
    """
    if conv_rn is None or not points:
        return None
    read_var = float(conv_rn.read_noise_adu) ** 2
    if not np.isfinite(read_var) or read_var <= 0:
        return None
    # a level with less temporal noise than the read noise is clipped (saturated): not
    # a read-noise-regime level; a ladder of such levels fails the PTC fit with its reason
    live = [p for p in points if np.isfinite(p["var"]) and p["var"] >= 0.5 * read_var]
    if not live:
        return None
    top = max(live, key=lambda p: p["var"])
    shot_var = float(top["var"]) - read_var
    if shot_var >= SHOT_OVER_READ_VARIANCE * read_var:
        return None
    return (f"the flat ladder never leaves the read-noise regime: at its noisiest level "
            f"({float(top['mean']):.1f} ADU above the offset, {top['exptime']:g} s) the "
            f"shot-noise variance {shot_var:.3g} ADU^2 is below {SHOT_OVER_READ_VARIANCE:g}x "
            f"the read-noise variance {read_var:.3g} ADU^2 of the bias frames; take brighter "
            f"or longer flats")


def _ladder_turnover(points: Sequence[dict]) -> float | None:
    """Turnoff (ADU above the offset) of the conventional PTC points, if they turn over.

    A ladder whose pixels fill their full well below the ADC limit shows it as
    a PTC whose variance drops past its maximum (clipped pixels have no shot
    noise): :func:`compute.ptc.find_turnoff` of the points, when the point of
    maximum variance is not the brightest one. Saturation lies between that
    point and the next brighter one; where the maximum is the faintest point
    (no fainter neighbour for the parabola), half-way between the two, the
    furthest ``find_turnoff`` moves towards a neighbour. None when the
    variance rises to the brightest point (or there are fewer than two
    points): no turnover seen.
    """
    m = np.array([p["mean"] for p in points], dtype=np.float64)
    v = np.array([p["var"] for p in points], dtype=np.float64)
    ok = np.isfinite(m) & np.isfinite(v)
    if ok.sum() < 2:
        return None
    order = np.argsort(m[ok])
    m, v = m[ok][order], v[ok][order]
    k = int(np.argmax(v))
    if k == m.size - 1:
        return None
    if k == 0:
        return float(0.5 * (m[0] + m[1]))
    return find_turnoff(m, v)


def _ptc_failure(points: Sequence[dict], exc: Exception, turnover: float | None = None) -> str:
    """Reason why the conventional PTC could not be fitted on ``points``.

    ``turnover``: where the points turn over (:func:`_ladder_turnover`), if they do.
    """
    flat = [p for p in points if not (np.isfinite(p["var"]) and p["var"] > 0
                                      and np.isfinite(p["var_err"]) and p["var_err"] > 0)]
    detail = (f"; {len(flat)} of the {len(points)} flat levels have no temporal noise "
              "(saturated or clipped pixels)" if flat else "")
    if turnover is not None:
        below = sum(1 for p in points if p["mean"] < turnover)
        detail += (f"; the points turn over at ~{turnover:.0f} ADU above the offset ({below} "
                   f"of {len(points)} levels below it): the pixels saturate below the ADC "
                   "limit, and the PTC needs more flat levels below that signal")
    return f"the conventional PTC could not be fitted: {exc}{detail}"


@dataclass(frozen=True)
class FrameTable:
    """Per-frame metadata and statistics of a cube, one entry per frame.

    Attributes
    ----------
    frame_type : ndarray of str
        ``bias``, ``dark`` or ``flat``.
    exptime : ndarray
        Exposure time (s).
    time_s : ndarray
        Start time (s from the first frame; NaN when unknown).
    frame_mean, frame_clipped_mean, center_mean : ndarray
        Whole-frame mean, 3-sigma clipped mean and mean of the central box (ADU).
    temperature : ndarray
        Sensor temperature (deg C; NaN when unknown).
    row_mean : ndarray or None
        ``(F, ny)`` per-frame row means (ADU), for temporal row noise.
    file : ndarray of str or None
        Each frame's source file, for notes that name a frame.
    frame_clipped_std : ndarray or None
        Standard deviation of each frame's clipped pixels (ADU): the scale of
        a pixel's noise and fixed pattern, below which a frame's level
        jump is immaterial (:func:`level_outliers`'s floor); None: no frame
        is tested for a jump.
    """

    frame_type: np.ndarray
    exptime: np.ndarray
    time_s: np.ndarray
    frame_mean: np.ndarray
    frame_clipped_mean: np.ndarray
    center_mean: np.ndarray
    temperature: np.ndarray
    row_mean: np.ndarray | None = None
    file: np.ndarray | None = None
    frame_clipped_std: np.ndarray | None = None

    def name(self, i: int) -> str:
        """The frame's file where known, else ``frame <i>``."""
        return str(self.file[i]) if self.file is not None else f"frame {i}"

    def indices(self, kind: str) -> np.ndarray:
        """Indices of the frames of one type, in time order."""
        idx = np.flatnonzero(self.frame_type == kind)
        order = np.argsort(np.nan_to_num(self.time_s[idx], nan=0.0), kind="stable")
        return idx[order]


@dataclass(frozen=True)
class PlanResult:
    """Output of :func:`make_plan`: the tile plan and the scalar products of this stage."""

    plan: TilePlan
    bias_stability: BiasStability | None
    row_noise: dict | None
    conventional_rn: ConventionalReadNoise | None
    ptc_points: list[dict]
    ptc: PTCFit | None
    ptc_astier: PTCFit | None
    linearity: LinearityFit | None
    linearity_points: list[dict]
    bias_level: float | None
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: scatter (std, ddof 1; ADU) of the frame levels (clipped means) within each
    #: dark group of ``plan.darks``, NaN for a group of one frame
    dark_level_std: tuple[float, ...] = ()


def group_by_exptime(table: FrameTable, kind: str, *, rtol: float = 1e-3) -> list[FrameGroup]:
    """Group the frames of one type by exposure time (relative tolerance ``rtol``)."""
    idx = table.indices(kind)
    groups: list[list[int]] = []
    keys: list[float] = []
    for i in sorted(idx, key=lambda j: (table.exptime[j], np.nan_to_num(table.time_s[j]))):
        t = float(table.exptime[i])
        if keys and abs(t - keys[-1]) <= rtol * max(abs(keys[-1]), 1e-6):
            groups[-1].append(int(i))
        else:
            keys.append(t)
            groups.append([int(i)])
    return [FrameGroup(kind=kind, exptime=k, indices=tuple(g)) for k, g in zip(keys, groups, strict=True)]


#: A gap between the sorted signals of one exposure time's flats that starts a
#: new illumination level: this fraction of the lower signal, plus
#: :data:`SIGNAL_STEP_ADU`. Lamp flicker moves a frame's mean by ~0.3 %, a lamp
#: warming up drifts without gaps; illumination ladders step by 10 % or more.
SIGNAL_STEP_FRACTION = 0.05
#: Absolute part of the gap (ADU): frame means of flats near the offset move
#: by the bias drift (+-0.03 ADU in the reference study), not by 5 %.
SIGNAL_STEP_ADU = 2.0


def split_by_signal(table: FrameTable, groups: Sequence[FrameGroup],
                    offset: float) -> tuple[list[FrameGroup], list[int]]:
    """Split each exposure time's flats into illumination levels at gaps in their signal.

    A photon transfer series is taken by varying the exposure time or, at one
    exposure time, the illumination (EMVA 1288 allows both). Frames of one
    exposure time whose mean signals (``frame_mean - offset``, ADU) sorted
    have a gap larger than ``SIGNAL_STEP_FRACTION`` of the lower one plus
    ``SIGNAL_STEP_ADU`` are different levels. In a group of three or more
    frames, a frame alone on its side of a gap is not a level but a failed
    exposure (a shutter or lamp fault): it is left out and returned.

    Parameters
    ----------
    table : FrameTable
        Per-frame statistics.
    groups : sequence of FrameGroup
        Flat groups by exposure time (:func:`group_by_exptime`).
    offset : float
        Offset (bias) level of the frame means (ADU).

    Returns
    -------
    (levels, left_out) : list of FrameGroup, list of int
        The levels ordered by exposure time, then signal, each level's frames
        in time order (one group per exposure time when nothing splits); the
        frame indices left out.
    """
    out: list[FrameGroup] = []
    left_out: list[int] = []
    for g in groups:
        idx = np.asarray(g.indices, dtype=np.int64)
        sig = np.asarray(table.frame_mean, dtype=np.float64)[idx] - offset
        order = np.argsort(sig, kind="stable")
        s = sig[order]
        gaps = np.diff(s) > SIGNAL_STEP_FRACTION * np.abs(s[:-1]) + SIGNAL_STEP_ADU
        for part in np.split(order, np.flatnonzero(gaps) + 1):
            members = idx[part]
            if members.size == 1 and idx.size >= 3:
                left_out.append(int(members[0]))
                continue
            members = members[np.argsort(np.nan_to_num(table.time_s[members]), kind="stable")]
            out.append(FrameGroup(kind=g.kind, exptime=g.exptime,
                                  indices=tuple(int(i) for i in members)))
    return out, left_out


#: Robust sigmas from the series' trend beyond which a bias frame's level is an outlier.
LEVEL_OUTLIER_SIGMA = 10.0
#: Fewest bias frames whose levels are tested for outliers (a MAD needs a few).
LEVEL_OUTLIER_MIN_FRAMES = 5


def level_outliers(time_s: np.ndarray, level: np.ndarray, *,
                   nsigma: float = LEVEL_OUTLIER_SIGMA, floor: float = 0.0) -> np.ndarray:
    """Positions of frames whose level jumps off their series' trend (a light leak, an offset change).

    The trend is the Theil-Sen line of level against time (frame order
    where a time is unknown), which the outliers do not move; a frame lies
    off it when its residual exceeds both ``nsigma`` times the residuals'
    robust sigma (1.4826 MAD) and ``floor``. At most a quarter of the
    frames are outliers: where more lie off the line, the series is not one
    level with a few jumps, and nothing is returned. A frame offset by ``d``
    ADU adds ``~d^2 / N`` to every pixel's temporal variance over ``N``
    frames: a 30 ADU jump in one of 20 bias frames doubled the per-pixel read
    noise (measured). The MAD of a few frames can be tiny by chance (five
    darks of one exposure time: a 0.06 ADU step came out beyond 10 of its
    sigmas), so ``floor`` sets the least jump that matters; the plan takes
    ``0.1 sqrt(N)`` times the frames' pixel scatter (a 1 % variance change).

    Parameters
    ----------
    time_s : numpy.ndarray
        Frame times (s; any origin; NaN where unknown).
    level : numpy.ndarray
        Frame levels (ADU, e.g. the clipped means), same shape.
    nsigma : float
        Threshold in robust sigmas.
    floor : float
        Least residual (ADU) that counts as a jump.

    Returns
    -------
    numpy.ndarray
        Positions (into the inputs) of the outlying frames, ascending; empty
        with fewer than :data:`LEVEL_OUTLIER_MIN_FRAMES` finite levels.
    """
    y = np.asarray(level, dtype=np.float64)
    t = np.asarray(time_s, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        t = np.arange(y.size, dtype=np.float64)
    good = np.isfinite(y)
    if good.sum() < LEVEL_OUTLIER_MIN_FRAMES:
        return np.zeros(0, dtype=np.int64)
    if np.ptp(t[good]) > 0:
        slope, icpt, *_ = theilslopes(y[good], t[good])
    else:
        slope, icpt = 0.0, float(np.median(y[good]))
    resid = y - (icpt + slope * t)
    sigma = 1.4826 * float(np.median(np.abs(resid[good] - np.median(resid[good]))))
    if not sigma > 0:
        return np.zeros(0, dtype=np.int64)
    odd = np.flatnonzero(good & (np.abs(resid) > max(nsigma * sigma, floor)))
    return odd if odd.size <= good.sum() // 4 else np.zeros(0, dtype=np.int64)


#: Flat levels whose mean is below this fraction of the 16-bit range set the
#: offset of a set of flats alone (clear of nonlinearity and saturation).
_LADDER_OFFSET_FRACTION = 0.5
#: Largest deviation of those levels from a straight line in exposure time
#: (fraction of their highest signal) for the line's intercept to be taken.
_LADDER_OFFSET_RESIDUAL = 0.01


def ladder_offset(exptime: Sequence[float], level: Sequence[float],
                  level_err: Sequence[float] | None = None) -> float | None:
    """The offset (ADU) of flats taken without bias or dark frames: their ladder at 0 s.

    A flat ladder at constant illumination reads ``offset + rate * t`` (the
    dark current adds to the rate); the intercept of a straight line through
    the levels below half the 16-bit range is the camera's offset (its bias
    level, and anything else independent of the exposure time).

    Parameters
    ----------
    exptime : sequence of float
        Exposure time of each flat level (s).
    level : sequence of float
        Mean count of each level (ADU, no offset subtracted).
    level_err : sequence of float, optional
        1-sigma error of each level's mean (ADU): the line is weighted by
        them (a lamp's flicker scatters the bright levels most, so the faint
        ones fix the intercept); unweighted where any is not positive.

    Returns
    -------
    float or None
        The intercept (ADU); None with fewer than two exposure times below
        half the range, a slope that is not positive, or levels further than
        1 % of their highest signal from the line (the illumination changed
        with the exposure time: twilight flats).
    """
    t = np.asarray(exptime, dtype=np.float64)
    m = np.asarray(level, dtype=np.float64)
    e = np.ones_like(m) if level_err is None else np.asarray(level_err, dtype=np.float64)
    use = np.isfinite(t) & np.isfinite(m) & (m < _LADDER_OFFSET_FRACTION * 65535.0)
    if np.unique(t[use]).size < 2:
        return None
    if not np.all(np.isfinite(e[use]) & (e[use] > 0)):
        e = np.ones_like(m)
    slope, icpt = np.polyfit(t[use], m[use], 1, w=1.0 / e[use])
    if not slope > 0:
        return None
    resid = m[use] - (slope * t[use] + icpt)
    if np.max(np.abs(resid)) > _LADDER_OFFSET_RESIDUAL * float(np.max(m[use] - icpt)):
        return None
    return float(icpt)


def _flat_weights(flats: Sequence[FrameGroup], points: Sequence[dict], ref: int | None,
                  limit: float) -> tuple[float, ...]:
    """Weights of the flat levels in the master flat, in units of the reference level.

    Every level of positive signal up to ``limit`` (ADU above the offset: the
    linear range the gain fit uses; the reference level always) adds its
    frames, each as much as the electrons it collected: level ``l`` of
    ``n_l`` frames at signal ``S_l`` weighs ``n_l S_ref / sum_k n_k S_k``, so
    the combination of the levels' means is in the reference level's ADU and
    its shot noise is that of all those frames stacked. Levels of one frame
    only where no level has several (their temporal noise is not measured).
    Empty without a reference level.
    """
    if ref is None:
        return ()
    s_ref = float(points[ref]["signal"])
    ok = [i for i, p in enumerate(points) if 0 < p["signal"] <= max(limit, s_ref)]
    use = [i for i in ok if flats[i].n >= 2] or ok
    total = sum(flats[i].n * float(points[i]["signal"]) for i in use)
    return tuple(flats[i].n * s_ref / total if i in use else 0.0 for i in range(len(flats)))


def _pairs(group: FrameGroup, limit: int) -> list[tuple[int, int]]:
    """Consecutive disjoint frame pairs of a group, at most ``limit``."""
    idx = group.indices
    return [(idx[i], idx[i + 1]) for i in range(0, len(idx) - 1, 2)][:limit]


#: Threads of the conventional-PTC pair statistics (numpy's partition releases the GIL).
_PAIR_THREADS = 4


def _level_pair_stats(flats: Sequence[FrameGroup], read_region: RegionReader, limit: int,
                      offset: Callable[[int], np.ndarray | float]
                      ) -> Iterator[tuple[int, list[PairStats]]]:
    """``(level, pair statistics)`` of each flat level with at least one frame pair.

    The regions are read here, one pair at a time, and each pair's clipped
    statistics (:func:`compute.ptc.pair_stats`, ~0.1 s per 1024^2 pair, most
    of it numpy's partition) run on a few threads, at most two pairs per
    thread waiting: the plan stage's time was these statistics run one
    after the other (2x faster on 2 cores, the same numbers).
    """
    threads = max(1, min(_PAIR_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="sitiancal-ptc") as pool:
        pending: list[tuple[int, list[Future[PairStats]]]] = []
        in_flight = 0
        for li, g in enumerate(flats):
            pairs = _pairs(g, limit)
            if not pairs:
                continue
            off = offset(li)
            futures = []
            for a, b in pairs:
                region = read_region([a, b]).astype(np.float64)
                futures.append(pool.submit(pair_stats, region[0], region[1], offset=off))
                in_flight += 1
                while in_flight > 2 * threads and pending:  # bound the regions held
                    done_li, done = pending.pop(0)
                    in_flight -= len(done)
                    yield done_li, [f.result() for f in done]
            pending.append((li, futures))
        for done_li, done in pending:
            yield done_li, [f.result() for f in done]


def make_plan(table: FrameTable, read_region: RegionReader, params: CalibrationParams,
              *, ny: int, nx: int) -> PlanResult:
    """Group frames, run the frame-pair analyses and decide the per-pixel work.

    Parameters
    ----------
    table : FrameTable
        Per-frame metadata and statistics of the cube.
    read_region : callable
        Reads the central region (``params.ptc_region`` square) of given frames.
    params : CalibrationParams
        Job parameters.
    ny, nx : int
        Frame shape (pixels).

    Returns
    -------
    PlanResult
    """
    missing: dict[str, str] = {}
    notes: list[str] = []
    def without_jumps(idx: np.ndarray, what: str) -> np.ndarray:
        """``idx`` less the frames whose whole level jumped off their series', each noted."""
        if table.frame_clipped_std is None or not len(idx):
            return idx
        levels = table.frame_clipped_mean[idx]
        floor = 0.1 * np.sqrt(len(idx)) * float(np.median(table.frame_clipped_std[idx]))
        odd = level_outliers(table.time_s[idx], levels, floor=floor)
        if not odd.size:
            return idx
        keep = np.ones(len(idx), dtype=bool)
        keep[odd] = False
        centre = float(np.median(levels[keep]))
        for k in odd:
            notes.append(f"{what} frame {table.name(int(idx[k]))} (level {levels[k]:.2f} ADU, "
                         f"{levels[k] - centre:+.2f} ADU from the other {what} frames' median) "
                         "is left out: its whole level jumped (a light leak, or the offset "
                         "changed?), which would add to every pixel's temporal variance")
        return idx[keep]

    bias_idx = without_jumps(table.indices("bias"), "bias")
    bias = FrameGroup("bias", 0.0, tuple(int(i) for i in bias_idx)) if len(bias_idx) else None
    darks = [FrameGroup("dark", g.exptime, tuple(int(i) for i in kept))
             for g in group_by_exptime(table, "dark")
             if (kept := without_jumps(np.asarray(g.indices), f"{g.exptime:g} s dark")).size]
    flats = group_by_exptime(table, "flat")

    # ---- bias series ----------------------------------------------------------
    stability = None
    row_noise = None
    quantum = 1
    bias_floor = False
    bias_level: float | None = None
    bias_region: np.ndarray | float = 0.0
    conv_rn = None
    if bias is not None and bias.n >= 2:
        levels = table.frame_clipped_mean[bias_idx]
        t = table.time_s[bias_idx]
        bias_level = float(np.mean(levels))
        if np.all(np.isfinite(t)):
            stability = bias_stability(t - t[0], levels)
        else:
            notes.append("bias frames without DATE-OBS: no bias stability series")
        raw = read_region(bias.indices[: max(2, min(bias.n, 16))])
        quantum = count_quantum(raw[:2])
        floor = float(np.count_nonzero(raw == 0)) / raw.size
        bias_floor = floor > 0.0
        if floor > _FLOOR_NOTE:
            notes.append(f"{floor:.2%} of the bias readings (central region, {len(raw)} frames) "
                         "are 0 ADU, the ADC floor: the camera offset is too low for its read "
                         "noise. The bias level, read noise and dark rate of pixels near the "
                         "floor are biased (their lowest readings are cut off), and pixels "
                         "whose bias series reaches it are left out of the RTN test; raise "
                         "the offset")
        if quantum > 1:
            notes.append(f"bias counts come in steps of {quantum} ADU (an ADC of fewer than 16 "
                         "bits, scaled): the RTN test works in those steps")
        regions = raw.astype(np.float64)
        del raw
        bias_region = regions.mean(axis=0)
        conv_rn = conventional_read_noise(regions[0], regions[1])
        if table.row_mean is not None:
            pixel_var = float(conv_rn.read_noise_adu) ** 2
            row_noise = temporal_row_noise(table.row_mean[bias_idx], pixel_var=pixel_var,
                                           nx=nx).to_dict()
    else:
        missing["bias"] = "the dataset has fewer than two bias frames"
        missing["read_noise"] = "the dataset has fewer than two bias frames"

    # ---- illumination levels at one exposure time -----------------------------
    # a set of flats alone (no bias, no darks): the offset of the flat ladder at 0 s,
    # from the whole frames (the frame statistics, the tile pass) and from the
    # central region (the PTC and linearity points)
    ladder = {"frame": None, "center": None}
    if bias is None and not darks and flats:
        for key, stat in (("frame", table.frame_mean), ("center", table.center_mean)):
            means = [stat[list(g.indices)] for g in flats]
            ladder[key] = ladder_offset(
                [g.exptime for g in flats], [float(np.mean(v)) for v in means],
                [float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
                 for v in means])
        if ladder["frame"] is not None and ladder["center"] is not None:
            bias_region = ladder["center"]
            notes.append(f"no bias or dark frames: the offset is the flat ladder's signal at "
                         f"0 s, {ladder['frame']:.1f} ADU, one value for every pixel (the fixed "
                         "bias pattern stays in the flat field)")
        else:
            ladder = {"frame": None, "center": None}
            notes.append("no bias or dark frames, and the flat ladder gives no offset (fewer "
                         "than two exposure times below half the range, or not linear in "
                         "exposure time): the flats are not offset-corrected, so the flat "
                         "field and PRNU carry the camera's offset")
    if bias is not None:
        base = float(np.mean(table.frame_mean[list(bias.indices)]))
    elif darks:
        base = float(np.mean(table.frame_mean[list(darks[0].indices)]))
    else:
        base = ladder["frame"] or 0.0
    by_time = len({g.exptime for g in flats})
    flats, odd = split_by_signal(table, flats, base)
    for i in odd:
        notes.append(f"flat {table.name(i)} (exposure {table.exptime[i]:g} s, mean signal "
                     f"{table.frame_mean[i] - base:.0f} ADU) is far from the other frames of "
                     "its exposure time: left out (a shutter or lamp fault?)")
    illumination_ladder = len(flats) > by_time
    if illumination_ladder:
        notes.append(f"flats of one exposure time come at several illumination levels: "
                     f"{len(flats)} levels from {by_time} exposure times, grouped by signal")

    # ---- dark matching for flats (EMVA 1288: darks of the same exposure time) --
    dark_times = [g.exptime for g in darks]
    flat_dark: list[int | None] = []
    for g in flats:
        match = [k for k, t in enumerate(dark_times) if abs(t - g.exptime) <= 1e-3 * max(t, 1e-6)]
        flat_dark.append(match[0] if match else None)
    if bias is None and darks and flats and not all(m is not None for m in flat_dark):
        notes.append("no bias frames and not every flat level has darks of its exposure "
                     "time: those levels use the dark-fit intercept as offset" if
                     len({g.exptime for g in darks}) >= 2 else
                     "no bias frames and not every flat level has darks of its exposure "
                     f"time: those levels use the {darks[0].exptime:g} s darks' mean as offset")
        # the region offset of those levels' PTC points (a bias's region otherwise)
        bias_region = read_region(darks[0].indices[:8]).astype(np.float64).mean(axis=0)

    # ---- per-frame signal and lamp-flicker correction -------------------------
    def offset_level(li: int, region: bool) -> float:
        stat = table.center_mean if region else table.frame_mean
        match = flat_dark[li]
        if match is not None:
            return float(np.mean(stat[list(darks[match].indices)]))
        if bias is not None:
            return float(np.mean(stat[list(bias.indices)]))
        if darks:
            return float(np.mean(stat[list(darks[0].indices)]))
        return ladder["center" if region else "frame"] or 0.0

    scaled: list[FrameGroup] = []
    lin_points: list[dict] = []
    for li, g in enumerate(flats):
        sig = table.frame_mean[list(g.indices)] - offset_level(li, region=False)
        ok = sig > 0
        scale = np.where(ok, np.mean(sig[ok]) / np.where(ok, sig, 1.0), 1.0) if ok.any() else np.ones_like(sig)
        scaled.append(FrameGroup("flat", g.exptime, g.indices, tuple(float(s) for s in scale)))
        csig = table.center_mean[list(g.indices)] - offset_level(li, region=True)
        err = float(np.std(csig, ddof=1) / np.sqrt(len(csig))) if len(csig) > 1 else float("nan")
        lin_points.append({"level": li, "exptime": g.exptime, "signal": float(np.mean(csig)),
                           "signal_err": err, "n_frames": g.n})
    flats = scaled

    # ---- conventional PTC ------------------------------------------------------
    points: list[dict] = []
    for li, stats in _level_pair_stats(flats, read_region, params.ptc_pairs_per_level,
                                       lambda li: (bias_region if flat_dark[li] is None else
                                                   read_region(darks[flat_dark[li]].indices[:8])
                                                   .astype(np.float64).mean(axis=0))):
        mean = float(np.mean([s.mean for s in stats]))
        var = float(np.mean([s.var for s in stats]))
        var_err = float(np.sqrt(np.sum([s.var_err ** 2 for s in stats])) / len(stats))
        points.append({"level": li, "exptime": flats[li].exptime, "mean": mean, "var": var,
                       "var_err": var_err, "n_pairs": len(stats)})
    ptc = ptc_astier = None
    read_noise_regime = _read_noise_regime(points, conv_rn)
    # where the points turn over, if they do (a ladder in the read-noise regime
    # has no shot-noise curve to turn over: its maximum is noise)
    turnover = _ladder_turnover(points) if read_noise_regime is None else None
    if read_noise_regime is not None:
        for name in ("ptc", "gain", "flat"):
            missing[name] = read_noise_regime
    elif len(points) >= 3:
        m = np.array([p["mean"] for p in points])
        v = np.array([p["var"] for p in points])
        e = np.array([p["var_err"] for p in points])
        try:
            ptc = fit_ptc(m, v, e, model="linear")
        except (RuntimeError, ValueError) as exc:
            missing["ptc"] = _ptc_failure(points, exc, turnover)
        if ptc is not None:
            try:
                ptc_astier = fit_ptc(m, v, e, model="astier")
            except (RuntimeError, ValueError) as exc:  # curve_fit may not converge
                notes.append(f"Astier+19 PTC fit did not converge: {exc}")
    else:
        missing["ptc"] = ("the conventional PTC needs at least three flat levels with a "
                          f"frame pair each; the dataset has {len(points)}")

    # ---- saturation ------------------------------------------------------------
    level0 = bias_level if bias_level is not None else 0.0
    adc_limit = ADC_MAX - level0
    saturation = adc_limit
    if ptc is not None and np.isfinite(ptc.turnoff_adu) and ptc.turnoff_adu < 0.99 * adc_limit:
        saturation = float(ptc.turnoff_adu)
    elif ptc is None and turnover is not None and turnover < 0.99 * adc_limit:
        # the PTC could not be fitted, but its points turn over: the pixels' full
        # well fills below the ADC limit, and levels past it must not feed the
        # per-pixel gain, the linearity or the flat
        saturation = turnover
        notes.append(f"the conventional PTC could not be fitted, but its points turn over: "
                     f"saturation taken as their turnoff, {turnover:.0f} ADU above the offset")
    elif flats:
        notes.append("the flat ladder does not reach a PTC turnoff below the ADC limit; "
                     "saturation taken as the ADC limit minus the bias level")

    # ---- linearity -------------------------------------------------------------
    lin = None
    lin_used = tuple(params.lin_lo * saturation <= p["signal"] <= params.lin_hi * saturation
                     for p in lin_points)
    if illumination_ladder:
        # signal against exposure time measures linearity only at one illumination
        lin_used = tuple(False for _ in lin_points)
        missing["linearity"] = ("linearity is measured against exposure time at one "
                                "illumination; these flats change illumination at one "
                                "exposure time")
    elif sum(lin_used) >= 3:
        lin = fit_linearity(np.array([p["exptime"] for p in lin_points]),
                            np.array([p["signal"] for p in lin_points]),
                            np.array([p["signal_err"] for p in lin_points]),
                            saturation=saturation, lo=params.lin_lo, hi=params.lin_hi)
    elif flats:
        missing["linearity"] = ("linearity needs at least three flat levels between "
                                f"{params.lin_lo:.0%} and {params.lin_hi:.0%} of saturation; "
                                f"the dataset has {sum(lin_used)}")
    used_idx = [i for i, u in enumerate(lin_used) if u]
    k = min(params.lin_levels, len(used_idx))
    lin_at = tuple(used_idx[round(j)] for j in np.linspace(0, len(used_idx) - 1, k)) if k else ()

    # ---- per-pixel gain levels and reference flat ------------------------------
    gain_levels = tuple(
        0 < p["signal"] <= params.gain_max_fraction * saturation and g.n >= params.min_gain_frames
        for p, g in zip(lin_points, flats, strict=True)
    )
    if not flats:
        for name in ("gain", "flat", "ptc", "linearity"):
            missing.setdefault(name, "the dataset has no flat frames")
    elif read_noise_regime is not None:
        gain_levels = tuple(False for _ in flats)
    elif sum(gain_levels) < 3:
        most = max((g.n for g in flats), default=0)
        missing["gain"] = (
            "per-pixel gain needs at least three flat levels below "
            f"{params.gain_max_fraction:.0%} of saturation with >= {params.min_gain_frames} "
            f"frames each (temporal statistics per pixel); the dataset has {sum(gain_levels)} "
            f"such levels (at most {most} frame{'s' if most != 1 else ''} per level)"
        )
        gain_levels = tuple(False for _ in flats)
    flat_ref = None
    candidates = [i for i, p in enumerate(lin_points) if 0 < p["signal"] < saturation * 0.95]
    if read_noise_regime is not None:
        pass  # a flat of read noise: missing["flat"] says why
    elif candidates:
        # a level of several frames where there is one: its temporal noise is
        # measured and removed from the PRNU, and its mean is less noisy
        pool = [i for i in candidates if flats[i].n >= 2] or candidates
        flat_ref = min(pool, key=lambda i: abs(lin_points[i]["signal"] - 0.5 * saturation))
    elif flats:
        top = max((p["signal"] for p in lin_points), default=float("nan"))
        missing["flat"] = (f"no flat level below saturation: every one of the {len(flats)} "
                           f"levels reaches >= 95% of the saturation level {saturation:.0f} ADU "
                           f"(highest mean signal {top:.0f} ADU above the offset)")
    flat_weights = _flat_weights(flats, lin_points, flat_ref,
                                 params.gain_max_fraction * saturation)
    if not darks:
        missing["dark"] = "the dataset has no dark frames"
    elif len({g.exptime for g in darks} | ({0.0} if bias is not None else set())) < 2:
        missing["dark"] = "the dark rate needs at least two exposure times (bias counts as 0 s)"

    plan = TilePlan(
        bias=bias if bias is not None and bias.n >= 2 else None,
        bias_time_s=tuple(float(x) for x in (table.time_s[bias_idx] - table.time_s[bias_idx][0]))
        if bias is not None and np.all(np.isfinite(table.time_s[bias_idx]))
        else tuple(float(i) for i in range(len(bias_idx))),
        bias_frame_level=tuple(float(x) for x in table.frame_clipped_mean[bias_idx]),
        darks=tuple(darks), flats=tuple(flats), flat_dark=tuple(flat_dark),
        saturation=float(saturation), gain_levels=gain_levels, lin_used=lin_used,
        lin_at=lin_at, flat_ref=flat_ref,
        linearizer=tuple(float(c) for c in np.asarray(lin.linearizer)) if lin is not None else (),
        bias_quantum=quantum, bias_floor=bias_floor,
        gain=float(ptc.gain) if ptc is not None and np.isfinite(ptc.gain) else float("nan"),
        flat_offset=ladder["frame"] or 0.0, flat_weights=flat_weights,
    )
    return PlanResult(plan=plan, bias_stability=stability, row_noise=row_noise,
                      conventional_rn=conv_rn, ptc_points=points, ptc=ptc, ptc_astier=ptc_astier,
                      linearity=lin, linearity_points=lin_points, bias_level=bias_level,
                      missing=missing, notes=notes,
                      dark_level_std=tuple(
                          float(np.std(table.frame_clipped_mean[list(g.indices)], ddof=1))
                          if g.n >= 2 else float("nan") for g in darks))
