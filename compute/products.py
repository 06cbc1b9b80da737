"""Calibration products from the per-pixel maps of the tile pass.

After the tile pass every per-pixel map exists; what is left needs the whole
map at once: global medians and robust widths, population mixtures (on a
seeded subsample), local medians for the flat, the defect mask, and the
scalar figures of each product. The result is a :class:`ProductContent` per
product type of DESIGN.md section 4, ready to be stored.

``maps`` is any mapping of name to array-like (numpy arrays, or lazily loaded
zarr arrays); each map is materialised only while its product is assembled.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sitiancal.compute.allocator import return_freed_memory
from sitiancal.compute.bias import dsnu_emva, row_column_profiles
from sitiancal.compute.content import ProductArray, ProductContent, ProductTable, ScaledMap
from sitiancal.compute.dark import common_mode_rate_err, dark_populations, dark_summary
from sitiancal.compute.defects import (
    MaskBit,
    dead_low,
    gain_outlier,
    hot_warm,
    local_median,
    log_tail_scale,
    mask_counts,
    neighbour_median,
    noisy,
    nonlinear,
    robust_center_scale,
    unstable_bias,
    upper_tail_scale,
)
from sitiancal.compute.flat import master_flat, prnu_emva
from sitiancal.compute.gain import frames_for_precision, gain_populations
from sitiancal.compute.mixture import MixtureFit
from sitiancal.compute.plan import PlanResult
from sitiancal.compute.ptc import turnoff_is_lower_bound
from sitiancal.compute.readnoise import median_std_factor, read_noise_map, read_noise_summary
from sitiancal.compute.summary import (
    clipped_survivors,
    finite_median,
    row_bands,
    threshold_sample,
)
from sitiancal.compute.tile import CalibrationParams

#: Maps :class:`_ReadAhead` holds read and not yet taken (61 MP: ~0.25 GB each).
READ_AHEAD_MAPS = 2
#: Peak memory of building one product, bytes per frame pixel: up to ~1.5 GB at
#: 61 MP (a product's float32 maps, its flags and temporaries), rounded up, and
#: the float32 maps read ahead for the products after it (:class:`_ReadAhead`).
PRODUCT_BYTES_PER_PIXEL = 25 + 4 * READ_AHEAD_MAPS

#: Product types, in the order they are assembled (the mask needs the others).
PRODUCT_TYPES = ("bias", "read_noise", "dark", "ptc", "gain", "linearity", "flat", "mask")
#: The order :func:`assemble_products` builds (and emits) them in. The flat
#: needs the dark's HOT/WARM flags and the mask every flag; read noise and dark
#: convert with the per-pixel conversion gain (then dropped for its median).
#: Each product is stored on one writer thread while the next ones are built,
#: so the writer should never wait for a product and the last ones should be
#: quick to store: linearity (a residual map per level) and the gain (five
#: maps) first, read noise and the dark (six maps) next, the bias, the flat
#: and the mask (little to store) last. Building and storing take about the
#: same time (~20 s each at 61 MP), so the order decides how soon after the
#: mask the job ends. 300-frame 61 MP job, cold runs on an Intel VM: products
#: stage 20.0 s against 21.4-21.9 s with the bias second and the dark fifth.
_BUILD_ORDER = ("linearity", "gain", "read_noise", "dark", "bias", "flat", "ptc", "mask")
#: The maps each product's builder reads whole (:meth:`Assembler.map`), in the
#: order it reads them: :class:`_ReadAhead` reads them ahead in build order.
_BUILDER_READS = {"linearity": ("flat_signal",), "gain": ("gain", "gain_err"),
                  "read_noise": ("bias_std",), "dark": ("dark_rate", "dark_rate_err"),
                  "bias": ("bias_mean",), "flat": ("flat_signal",),
                  "mask": ("rtn", "bias_trend_z")}


def _f(x: object) -> float | None:
    """A JSON-able float (None for NaN/inf)."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _subsample(mask: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted flat indices of a uniform random set of ``min(limit, n)`` pixels where ``mask`` is True.

    Memory is proportional to ``limit``, not to the map: candidate positions
    are drawn uniformly over the whole map (a little more than ``limit``
    divided by the fraction of selectable pixels), those outside ``mask`` are
    dropped, and ``limit`` of the rest are chosen at random. Every subset of
    the selectable pixels of that size is equally likely (seeded).
    """
    flat = np.asarray(mask).ravel()
    n_ok = int(np.count_nonzero(flat))
    if n_ok <= limit:
        return np.flatnonzero(flat)
    rng = np.random.default_rng(seed)
    total = flat.size
    draw = int(limit * total / n_ok * 1.05) + 1024
    while True:
        cand = np.sort(rng.integers(0, total, size=min(draw, 4 * total)))
        # distinct values of the sorted draw (np.unique's result): numpy 2.4's
        # np.unique of integers takes ~0.9 s for a million, the sort 0.07 s
        cand = cand[np.concatenate(([True], cand[1:] != cand[:-1]))]
        cand = cand[flat[cand]]
        if cand.size >= limit:
            return np.sort(rng.choice(cand, size=limit, replace=False))
        draw *= 2


class _ReadAhead:
    """Reads the maps the builders will read, in build order, on a thread of its own.

    The tile pass's maps are read from its scratch store (past the page cache:
    a 61 MP map is 0.25 GB, ~0.2-1.6 s from a disk that also takes the
    staging's writes); the assembly's main thread waited ~8 s of a 300-frame
    job's ~30 s products stage for them (measured). The schedule is
    :data:`_BUILDER_READS` over the build order; at most ``depth`` maps are
    held read and not yet taken. A builder's :meth:`take` gets its own read
    (each item is handed out once, so an array a builder changes in place is
    its own); an item its builder did not take is dropped when the builder
    ends (:meth:`finish`), so nothing is held for a product that was not
    built. Results are those of reading the map when asked (the same bytes).
    """

    def __init__(self, maps: Mapping[str, object], order: tuple[str, ...], *,
                 depth: int = READ_AHEAD_MAPS) -> None:
        self._maps = maps
        self._schedule = [(builder, name) for builder in order
                          for name in _BUILDER_READS.get(builder, ())
                          if name in maps and not isinstance(maps[name], np.ndarray)]
        self._depth = max(1, int(depth))
        self._cond = threading.Condition()
        self._ready: dict[tuple[str, str], np.ndarray | BaseException] = {}
        # items not to read (their builder ended, or read the map itself)
        self._skip: set[tuple[str, str]] = set()
        self._next = 0  # index of the schedule's next item to read
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sitiancal-read-ahead",
                                        daemon=True)
        if self._schedule:
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._ready) < self._depth)
                if self._closed or self._next >= len(self._schedule):
                    return
                item = self._schedule[self._next]
                if item in self._skip:
                    self._next += 1
                    self._cond.notify_all()
                    continue
            try:
                value: np.ndarray | BaseException = np.asarray(self._maps[item[1]])
            except BaseException as exc:  # handed to the builder that takes it
                value = exc
            with self._cond:
                self._next += 1
                if item not in self._skip and not self._closed:
                    self._ready[item] = value
                self._cond.notify_all()

    def take(self, builder: str | None, name: str) -> np.ndarray | None:
        """``builder``'s read of ``name`` (waiting for it), or None where none is scheduled."""
        item = (builder or "", name)
        with self._cond:
            if item not in self._ready:
                try:
                    pos = self._schedule.index(item, self._next)
                except ValueError:
                    return None  # not scheduled, or taken already: the caller reads it
                # Wait while the thread reads towards it; with the held maps at
                # ``depth`` it cannot go on (a builder asking for its maps out of
                # order): then the caller reads this one itself, and the thread
                # skips it (or drops it, if it is reading it now).
                self._cond.wait_for(lambda: item in self._ready or self._closed
                                    or self._next > pos or len(self._ready) >= self._depth)
                if item not in self._ready:
                    self._skip.add(item)
            value = self._ready.pop(item, None)
            self._cond.notify_all()
        if isinstance(value, BaseException):
            raise value
        return value

    def finish(self, builder: str) -> None:
        """``builder`` ended: drop what it did not take and skip what it would have."""
        with self._cond:
            # from the item being read on: the thread drops that one when it is read
            self._skip.update(k for k in self._schedule[self._next:] if k[0] == builder)
            for item in [k for k in self._ready if k[0] == builder]:
                del self._ready[item]
            self._cond.notify_all()

    def close(self) -> None:
        """Stop reading ahead and drop what is held."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()


def _bands(shape: tuple[int, ...]):
    """Row bands of a 2-D map (~4 MP each) for blockwise work on full-frame maps."""
    return row_bands(shape[-2], shape[-1])


def _t_threshold(z: float, dof: int) -> float:
    """The Student-t value (``dof`` dof) with the same two-sided tail probability as normal ``z``.

    ``|t| > _t_threshold(z, dof)`` is exactly ``|z(t)| > z`` for the normal
    ``z(t)`` of equal tail probability (the map is monotone), without
    evaluating the t and normal quantile functions at every pixel.
    """
    from scipy import special

    if dof <= 0:
        return float("inf")
    return float(-special.stdtrit(dof, special.ndtr(-abs(z))))


#: Upper-side width of the dark population (``upper_tail_scale``) over its
#: MAD width beyond which the population classes do not add WARM pixels: 1.0
#: for Gaussian rates, 1.37 for a log-normal of log-sigma 0.3 measured without
#: error. Simulated ZWO sets: 1.21 at 0 C (the log-normal beside errors twice
#: its width), 1.07 where a 3.5 e- read noise dominates, 1.50 at 20 C. On the
#: 0 C sets of 300 x 400 px the rule alone found 20-23 of 24 warm pixels with
#: 0-1 false, the classes 23-24 with 10-14 false.
_SKEWED = 1.15


def _to_log(gain: np.ndarray, gain_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln g and its error (the relative error of g) from a gain (e-/ADU) and its error."""
    g = np.asarray(gain, dtype=np.float64)
    return np.log(g), np.asarray(gain_err, dtype=np.float64) / g


def _gain_centre(lg: np.ndarray, lg_err: np.ndarray) -> tuple[float, float]:
    """Gain of a one-population camera (e-/ADU) and its error, from ln g and its errors.

    A pixel's gain is ``1 / a`` with the fitted slope ``a`` unbiased, so
    ``E[ln g_hat] = ln g + (sigma_g / g)^2 / 2`` to second order: the centre is
    ``exp`` of the mean of ``ln g_hat - (sigma_g / g)^2 / 2`` over the pixels
    (5-sigma clipped about the median), its error that of the mean. It is not
    weighted by the pixels' errors: a pixel's fit takes its error from its own
    counts (a low intercept gives a steeper slope and a smaller error), and
    the error-weighted centre of a one-component mixture of these corrected
    values came out 0.4-3 % low on simulated sets. Simulated fits (6-14
    levels of 8-40 frames, relative errors of 9-21 %): within 0.2 % of the
    true gain, where the map's median is 0.2-1.1 % high.
    """
    kept = clipped_survivors(lg - 0.5 * lg_err * lg_err, 5.0)
    centre = float(np.exp(kept.mean()))
    return centre, centre * float(kept.std(ddof=1)) / math.sqrt(kept.size)


def _mixture_table(fit: MixtureFit, name: str, units: str) -> ProductTable:
    best = fit.best
    return ProductTable(
        name=name,
        columns={"weight": np.asarray(best.weights), "mean": np.asarray(best.means),
                 "sigma": np.asarray(best.sigmas)},
        units={"weight": "", "mean": units, "sigma": units},
        description=f"population mixture (deconvolved, {len(best.weights)} components by BIC)",
    )


@dataclass
class Assembler:
    """Builds the products of one job from the tile maps and the plan stage.

    Attributes
    ----------
    maps : mapping
        Per-pixel maps of the tile pass (see ``sitiancal.compute.tile.MAP_SPECS``).
    planned : PlanResult
        Output of the plan stage (PTC, linearity, bias series, missing products).
    params : CalibrationParams
        Job parameters.
    temperature : float or None
        Median sensor temperature of the dark frames (deg C).
    partials : dict
        Summed partials of the tile pass.
    flat_filter : str or None
        Filter of the flat frames (the flat product's ``filter``).
    """

    maps: Mapping[str, object]
    planned: PlanResult
    params: CalibrationParams
    temperature: float | None = None
    partials: dict[str, float] = field(default_factory=dict)
    flat_filter: str | None = None
    missing: dict[str, str] = field(default_factory=dict)
    _mask: np.ndarray | None = None
    _evaluated: set[str] = field(default_factory=set)
    _gain_pop: MixtureFit | None = None
    #: unimodal gain centre and its error (e-/ADU), set with _gain_pop
    _gain_centre: tuple[float, float] = (float("nan"), float("nan"))
    _gain_conv: np.ndarray | float | None = None
    _gain_med: float | None = None
    _gain_lock: threading.Lock = field(default_factory=threading.Lock)
    #: the maps read ahead for the builders (:func:`_build`), and the builder running
    _read_ahead: _ReadAhead | None = None
    _building: str | None = None
    _builder_thread: int | None = None

    def __post_init__(self) -> None:
        self.missing = dict(self.planned.missing)

    def flag(self, name: str, pixels: np.ndarray) -> None:
        """Set mask bit ``name`` (a :class:`MaskBit` name, lower case) where ``pixels`` is True.

        The bits go straight into one uint16 mask (2 B per pixel) rather than a
        boolean map per class (1 B per pixel each, nine of them by the end).
        """
        pixels = np.asarray(pixels, dtype=bool)
        if self._mask is None:
            self._mask = np.zeros(pixels.shape, dtype=np.uint16)
        self._mask[pixels] |= np.uint16(MaskBit[name.upper()].value)
        self._evaluated.add(name)

    def flagged(self, *names: str) -> np.ndarray | None:
        """Pixels with any of the given bits set (None before any flag)."""
        if self._mask is None:
            return None
        bits = 0
        for name in names:
            bits |= int(MaskBit[name.upper()].value)
        return (self._mask & np.uint16(bits)) != 0

    def map(self, name: str) -> np.ndarray | None:
        """Materialise one map (None when the tile pass did not produce it).

        The running builder's maps come from the read-ahead where one runs
        (:class:`_ReadAhead`; on the thread that runs the builders only: the
        conversion gain's helper thread reads its own).
        """
        if name not in self.maps:
            return None
        ahead = self._read_ahead
        if ahead is not None and threading.get_ident() == self._builder_thread:
            value = ahead.take(self._building, name)
            if value is not None:
                return value
        return np.asarray(self.maps[name])

    def lazy(self, name: str) -> object | None:
        """One map as the tile pass stored it (a zarr array is read only when written out).

        Product arrays that are maps unchanged are passed this way: the store
        copies them chunk by chunk, so they never sit in memory whole.
        """
        return self.maps.get(name)

    # ------------------------------------------------------------------ gain
    def conversion_gain(self) -> np.ndarray | float | None:
        """Gain (e-/ADU) used to convert ADU maps to electrons.

        Per pixel, the mean of the gain population the pixel belongs to (a
        per-pixel estimate from ~10 levels is noisier than the population
        centre); the one population's mean when it is unimodal (the median
        per-pixel gain where no mixture could be fitted, fewer than 100
        pixels); the conventional PTC gain when there is no per-pixel gain.
        The one population's mean is corrected for the skew of ``1/a``
        (:func:`_gain_centre`), which the map's median is not (+0.2 to +1.1 %).
        """
        with self._gain_lock:  # computed once, possibly on a helper thread
            return self._conversion_gain()

    def _conversion_gain(self) -> np.ndarray | float | None:
        if self._gain_conv is not None:
            return self._gain_conv
        gain = self.map("gain")
        if gain is not None and np.isfinite(gain).any():
            err = self.map("gain_err")
            fit = self.gain_populations(gain, err)
            median = finite_median(gain)
            if fit is not None and len(fit.best.weights) > 1:
                conv = np.full(gain.shape, median, dtype=np.float32)
                centres = np.exp(np.asarray(fit.best.means)).astype(np.float32)
                for rows in _bands(gain.shape):  # blockwise: no full-size float64 temporaries
                    g, e = gain[rows], err[rows]
                    ok = np.isfinite(g) & np.isfinite(e) & (e > 0) & (g > 0)
                    lg, lg_err = _to_log(g[ok], e[ok])
                    conv[rows][ok] = centres[fit.best.classify(lg, lg_err)]
                self._gain_conv = conv
            elif fit is not None:
                self._gain_conv = self._gain_centre[0]
            else:
                self._gain_conv = median
        elif self.planned.ptc is not None:
            self._gain_conv = float(self.planned.ptc.gain)
        return self._gain_conv

    def gain_median(self) -> float | None:
        """Median of the conversion gain (e-/ADU): the scalar gain of frame-level figures."""
        if self._gain_med is None:
            g = self.conversion_gain()
            if g is None:
                return None
            self._gain_med = float(g) if np.ndim(g) == 0 else finite_median(g)
        return self._gain_med

    def gain_populations(self, gain: np.ndarray | None = None,
                         err: np.ndarray | None = None) -> MixtureFit | None:
        """Mixture of per-pixel gain populations in ln g, deconvolving per-pixel errors.

        ``gain`` and ``err``: the ``gain`` and ``gain_err`` maps if the caller
        has them in memory already (else they are read).

        The fit runs on ln g with the relative error as the per-pixel error:
        a per-pixel gain from ~10 levels of ~40 frames has a ~10% error whose
        distribution is skewed in g and in K = 1/g (sample variances are
        chi-square distributed), and a Gaussian deconvolution with millions of
        pixels would model that skew as spurious populations. In ln g the
        pulls are symmetric (tested). Components convert back as g = exp(mean).
        """
        if self._gain_pop is None:
            gain = self.map("gain") if gain is None else gain
            err = self.map("gain_err") if err is None else err
            if gain is None or err is None:
                return None
            ok = np.isfinite(gain) & np.isfinite(err) & (err > 0) & (gain > 0)
            if ok.sum() < 100:
                return None
            idx = _subsample(ok.ravel(), self.params.mixture_samples, self.params.seed)
            lg, lg_err = _to_log(gain.ravel()[idx], err.ravel()[idx])
            self._gain_centre = _gain_centre(lg, lg_err)  # a unimodal camera's gain
            self._gain_pop = gain_populations(lg, lg_err, seed=self.params.seed,
                                              max_samples=self.params.mixture_samples)
        return self._gain_pop

    # -------------------------------------------------------------- products
    def bias(self) -> ProductContent | None:
        master = self.map("bias_mean")
        planned = self.planned
        if master is None:
            return None
        rows, cols = row_column_profiles(master)
        n = planned.plan.bias.n if planned.plan.bias else 0
        temporal_var = (self.partials.get("bias_var_sum", np.nan)
                        / max(self.partials.get("bias_var_count", 0.0), 1.0))
        dsnu = dsnu_emva(master, temporal_var=temporal_var, n_frames=n, gain=self.gain_median())
        stats: dict = {"level_median_adu": _f(finite_median(master)), "n_frames": n,
                       "dsnu": dsnu.to_dict(), "temporal_var_mean_adu2": _f(temporal_var)}
        tables = [ProductTable("ROW_PROFILE", {"row": np.arange(rows.size), "offset": rows},
                               {"offset": "ADU"}, "row offsets from the global level"),
                  ProductTable("COL_PROFILE", {"column": np.arange(cols.size), "offset": cols},
                               {"offset": "ADU"}, "column offsets from the global level")]
        if planned.bias_stability is not None:
            stats["stability"] = planned.bias_stability.to_dict()
            stats["stability"]["series"] = None
            plan = planned.plan
            tables.append(ProductTable(
                "STABILITY", {"time": np.asarray(plan.bias_time_s),
                              "level": np.asarray(plan.bias_frame_level)},
                {"time": "s", "level": "ADU"}, "per-frame clipped mean vs time"))
        if planned.row_noise is not None:
            stats["row_noise"] = planned.row_noise
        arrays = [ProductArray("BIAS", self.lazy("bias_mean"), "ADU",
                               "master bias (sigma-clipped mean)")]
        return ProductContent("bias", "ADU", arrays, tables, stats)

    def read_noise(self) -> ProductContent | None:
        std = self.map("bias_std")
        if std is None:
            return None
        # the mask's NOISY class, while the map is in memory (not read again for the
        # mask); the centre is the map's finite median (finite_median's value)
        center, scale = robust_center_scale(std)
        self.flag("noisy", noisy(std, config=self.params.defects, center=center, scale=scale,
                                 n_frames=self.planned.plan.bias.n))
        stats: dict = {"median_adu": _f(center)}
        arrays = [ProductArray("READ_NOISE", self.lazy("bias_std"), "ADU",
                               "per-pixel temporal std of the bias stack")]
        # The map's median is below the pixels' median read noise by the median
        # of a sample std from n frames (9 % at 5 frames, 2 % at 20): the figure
        # quoted for the sensor is the map's median divided by that factor.
        factor = median_std_factor(self.planned.plan.bias.n)
        stats["median_std_factor"] = factor
        stats["median_adu_map"] = stats["median_adu"]
        stats["median_adu"] = _f(center / factor)
        g = self.conversion_gain()
        if g is not None:
            stats["per_pixel_e"] = read_noise_summary(read_noise_map(std, g))
            raw = stats["per_pixel_e"].get("median")
            raw_err = stats["per_pixel_e"].get("median_err")
            stats["median_e_map"] = raw
            stats["median_e"] = _f(raw / factor) if raw is not None else None
            # the median's sampling error over the pixels (the gain's is not included)
            stats["median_e_err"] = _f(raw_err / factor) if raw_err is not None else None
            # stored band by band from the ADU map: the e- map is not kept in memory
            arrays.append(ProductArray("READ_NOISE_E", ScaledMap(self.lazy("bias_std"), g), "e-",
                                       "per-pixel read noise"))
        conv = self.planned.conventional_rn
        if conv is not None:
            stats["conventional_adu"] = _f(conv.read_noise_adu)
            stats["conventional_adu_err"] = _f(conv.read_noise_adu_err)
            gscalar = self.gain_median()
            stats["conventional_e"] = _f(conv.read_noise_adu * gscalar) if gscalar else None
            stats["conventional_e_err"] = (_f(conv.read_noise_adu_err * gscalar) if gscalar
                                           else None)
        return ProductContent("read_noise", "ADU", arrays, [], stats)

    def dark(self) -> ProductContent | None:
        if "dark_rate" not in self.maps or "dark_rate_err" not in self.maps:
            return None
        rate, err = self.map("dark_rate"), self.map("dark_rate_err")
        g = self.conversion_gain()
        arrays: list[ProductArray] = []
        tables: list[ProductTable] = []
        stats: dict = {"temperature_c": _f(self.temperature)}
        if g is not None:
            # in place, band by band, for the statistics; the stored e-/s maps are
            # converted again from the ADU maps chunk by chunk when written
            for rows in _bands(rate.shape):
                gb = g if np.ndim(g) == 0 else g[rows]  # type: ignore[index]
                rate[rows] *= gb
                err[rows] *= gb
            arrays += [ProductArray("DARK_RATE", ScaledMap(self.lazy("dark_rate"), g), "e-/s",
                                    "dark current per pixel"),
                       ProductArray("DARK_RATE_ERR", ScaledMap(self.lazy("dark_rate_err"), g),
                                    "e-/s", "1-sigma error of DARK_RATE")]
            unit = "e-/s"
        else:
            unit = "ADU/s"
        r, e = rate, err
        arrays += [ProductArray("DARK_RATE_ADU", self.lazy("dark_rate"), "ADU/s",
                                "dark rate in raw counts"),
                   ProductArray("DARK_RATE_ADU_ERR", self.lazy("dark_rate_err"), "ADU/s",
                                "1-sigma error of DARK_RATE_ADU")]
        if "dark_chi2" in self.maps:
            arrays.append(ProductArray("DARK_CHI2", self.lazy("dark_chi2"), "",
                                       "reduced chi-square of the dark fit"))
        ok = np.isfinite(r) & np.isfinite(e) & (e > 0)
        idx = _subsample(ok, self.params.mixture_samples, self.params.seed)
        # The population mixture (a few s, mostly single-threaded) on the seeded
        # subsample runs on a helper thread while the map-wide figures are
        # computed (the summary too: the mixture is this product's longest step).
        with ThreadPoolExecutor(1, thread_name_prefix="sitiancal-mixture") as pool:
            fitting = pool.submit(dark_populations, r.ravel()[idx], e.ravel()[idx],
                                  seed=self.params.seed)
            r_ok = np.where(ok, r, np.float32(np.nan))  # the usable rates, NaN elsewhere
            stats["summary"] = dark_summary(r_ok, np.where(ok, e, np.float32(np.nan)),
                                            temperature=self.temperature,
                                            common_err=self._common_rate_err(g))
            stats["units"] = unit
            sample = threshold_sample(r_ok)
            center, fitted_mad = robust_center_scale(sample)
            # the upper side of the rates the mixture is fitted to (below)
            fitted_scale = max(fitted_mad, upper_tail_scale(sample, center))
            # smooth local level (64 px cells): warm pixels are pixel-scale excesses over it
            background = local_median(r_ok, block=64)
            # The population's width, and its upper side where that is wider
            # (log-normal rates measured well), over the local level as the rules
            # test the pixels: HOT and WARM are excesses beyond its tail. Over the
            # whole map, a glow's rates had widened both (a 0.5 e-/s corner glow:
            # 4.3x; 3 of 24 warm pixels found; a glow over the whole frame: none).
            for rows in _bands(r_ok.shape):  # in place: r_ok is not used after this
                r_ok[rows] -= np.maximum(background[rows], r_ok.dtype.type(center)) - center
            sample = threshold_sample(r_ok)  # of the levelled rates
            mad_scale = robust_center_scale(sample)[1]
            scale = max(mad_scale, upper_tail_scale(sample, center))
            # where the rates are measured well, the population's multiplicative
            # spread is followed to its nsigma point in ln(rate)
            log_scale = log_tail_scale(sample, center, nsigma=self.params.defects.warm_nsigma)
            del sample
            if np.isfinite(log_scale):
                scale = max(scale, log_scale)
            stats["warm_threshold"] = (f"{self.params.defects.warm_nsigma:g} sigma in ln(rate) "
                                       "over the local level"
                                       if np.isfinite(log_scale) and scale == log_scale
                                       else "linear over the local level")
            del r_ok
            pops = fitting.result()
        stats["populations"] = pops.to_dict()
        tables.append(_mixture_table(pops, "POPULATIONS", unit))
        # The mixture's Gaussian components describe rates whose spread is
        # their errors'. Where the fitted rates' upper side is 15 % wider than
        # their core (the population's own log-normal spread, or a glow),
        # components follow that tail, and classifying 3-5 sigma pixels by them
        # flagged the tail as WARM (37 of 30k pixels at 20 C, none by the 5
        # sigma rule alone; 10-14 of 120k at 0 C): the rule alone decides then.
        skewed = bool(fitted_scale > _SKEWED * fitted_mad)
        warm_pops = None if skewed else pops
        stats["warm_rule"] = ("threshold only (skewed population: upper-side width "
                              f"{fitted_scale / fitted_mad:.2f}x the MAD width)" if skewed
                              else "threshold and population classes")
        stats["warm_scale"] = _f(scale)
        cls = np.full(rate.shape, 255, dtype=np.uint8)
        hot = np.zeros(rate.shape, dtype=bool)
        warm = np.zeros(rate.shape, dtype=bool)
        for rows in _bands(rate.shape):  # blockwise with the global centre and width
            rb, eb, okb = r[rows], e[rows], ok[rows]
            cls[rows][okb] = pops.best.classify(rb[okb], eb[okb]).astype(np.uint8)
            hot[rows], warm[rows] = hot_warm(rb, eb, populations=warm_pops,
                                             config=self.params.defects, center=center,
                                             scale=scale, background=background[rows])
        # The 64 px cells cannot follow a level that changes over a few pixels
        # (glow at a corner): the pixels found hot or warm over them are tested
        # again over the median of their own 5 x 5 neighbourhood (a pixel stays
        # flagged while fewer than half of its 24 neighbours are as high: clusters).
        cand = np.flatnonzero(hot | warm)
        if cand.size:
            yy, xx = np.unravel_index(cand, rate.shape)
            near = np.fmax(background[yy, xx], neighbour_median(r, yy, xx))
            hot.ravel()[cand], warm.ravel()[cand] = hot_warm(
                r[yy, xx], e[yy, xx], populations=warm_pops, config=self.params.defects,
                center=center, scale=scale, background=near)
        del ok, background
        arrays.append(ProductArray("DARK_CLASS", cls, "", "population index of each pixel (255: no fit)"))
        self.flag("hot", hot)
        self.flag("warm", warm)
        return ProductContent("dark", unit, arrays, tables, stats)

    def _common_rate_err(self, g: float | np.ndarray | None) -> float | None:
        """Error of the map-wide dark rate from the frames' common level noise (e-/s or ADU/s).

        Each group's frame-level scatter is its own: the bias frames' level
        scatter (:attr:`PlanResult.bias_stability`) for the 0 s group, the
        scatter of each dark group's frame levels
        (:attr:`PlanResult.dark_level_std`: a dark's level also moves with
        the sensor temperature, in proportion to its signal) for the darks; a
        group of one frame takes the groups' pooled scatter. ``None`` without
        two exposure times or any scatter.
        """
        plan, stability = self.planned.plan, self.planned.bias_stability
        times = [grp.exptime for grp in plan.darks]
        counts = [grp.n for grp in plan.darks]
        stds = list(self.planned.dark_level_std) or [float("nan")] * len(times)
        if plan.bias is not None:
            times.insert(0, 0.0)
            counts.insert(0, plan.bias.n)
            stds.insert(0, stability.std if stability is not None else float("nan"))
        s, n = np.asarray(stds, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        known = np.isfinite(s) & (n >= 2)
        if not known.any():
            return None
        pooled = np.sqrt(np.dot(n[known] - 1, s[known] ** 2) / np.sum(n[known] - 1))
        err = common_mode_rate_err(np.array(times), n, np.where(known, s, pooled))
        scale = 1.0 if g is None else float(g) if np.ndim(g) == 0 else self.gain_median()
        return err * scale if np.isfinite(err) else None

    def ptc(self) -> ProductContent | None:
        planned = self.planned
        if planned.ptc is None:
            return None
        pts = planned.ptc_points
        used = np.asarray(planned.ptc.used, dtype=bool)
        cols = {k: np.asarray([p[k] for p in pts]) for k in ("exptime", "mean", "var", "var_err", "n_pairs")}
        cols["used"] = used
        table = ProductTable("PTC", cols, {"exptime": "s", "mean": "ADU", "var": "ADU2",
                                           "var_err": "ADU2"}, "conventional PTC points")
        fit = planned.ptc
        stats = {
            "gain": _f(fit.gain), "gain_err": _f(fit.gain_err),
            "read_noise_e": _f(fit.read_noise_e), "read_noise_e_err": _f(fit.read_noise_e_err),
            "read_noise_adu": _f(fit.read_noise_adu), "turnoff_adu": _f(fit.turnoff_adu),
            "full_well_e": _f(fit.full_well_e), "chi2_red": _f(fit.chi2_red),
            "full_well_lower_bound": turnoff_is_lower_bound(cols["mean"], cols["var"]),
            "gain_convention": "g in e-/ADU (EMVA K = 1/g in DN/e-)",
        }
        if planned.ptc_astier is not None:
            a = planned.ptc_astier
            stats["astier"] = {"gain": _f(a.gain), "gain_err": _f(a.gain_err), "a00": _f(a.a00),
                               "a00_err": _f(a.a00_err), "read_noise_e": _f(a.read_noise_e)}
        return ProductContent("ptc", "e-/ADU", [], [table], stats)

    def gain(self) -> ProductContent | None:
        if "gain" not in self.maps or "gain_err" not in self.maps:
            return None
        arrays = [ProductArray("GAIN", self.lazy("gain"), "e-/ADU",
                               "per-pixel gain (temporal mean-variance fit)"),
                  ProductArray("GAIN_ERR", self.lazy("gain_err"), "e-/ADU", "1-sigma error of GAIN")]
        for name, units, long in (("gain_chi2", "", "reduced chi-square of the fit (fit quality)"),
                                  ("gain_n_used", "", "flat levels used by the fit"),
                                  ("gain_read_var", "ADU2", "fit intercept (read variance)")):
            if name in self.maps:
                arrays.append(ProductArray(name.upper(), self.lazy(name), units, long))
        gain, err = self.map("gain"), self.map("gain_err")
        ok = np.isfinite(gain) & np.isfinite(err) & (err > 0)
        center, scale = robust_center_scale(np.where(ok, gain, np.float32(np.nan)))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = finite_median(np.where(ok, err / gain, np.float32(np.nan)))
        stats: dict = {"median": _f(center), "robust_sigma": _f(scale),
                       "median_rel_err": _f(rel),
                       "n_pixels": int(ok.sum()),
                       "gain_convention": "g in e-/ADU (EMVA K = 1/g in DN/e-)"}
        if "gain_levels_left_out" in self.partials:
            # pixels with one flat level left out of the fit (far above the prediction of
            # the pixel's other levels: a cosmic ray in one of its frames; GAIN_N_USED is
            # one less there)
            stats["levels_left_out"] = int(self.partials["gain_levels_left_out"])
        tables: list[ProductTable] = []
        # The mixture is fitted once, with the conversion gain (on a helper thread
        # since the assembly started): wait for it rather than fit it again.
        self.conversion_gain()
        pops = self.gain_populations(gain, err)
        if pops is not None:
            best = pops.best
            mu, sig = np.asarray(best.means), np.asarray(best.sigmas)
            order = np.argsort(mu)
            # the sensor's gain (what the map's median approximates with a +0.2-1 %
            # skew): the clipped mean of the corrected ln g of a unimodal camera,
            # the largest population's mean otherwise, with its error
            if len(mu) > 1:
                main = int(np.argmax(np.asarray(best.weights)))
                stats["population_gain"] = _f(np.exp(mu[main]))
                stats["population_gain_err"] = (_f(np.exp(mu[main]) * best.means_err[main])
                                                if best.means_err is not None else None)
            else:
                stats["population_gain"], stats["population_gain_err"] = map(_f, self._gain_centre)
            stats["populations"] = {
                "space": "fitted on ln g with relative errors; gain = exp(mean)",
                "n_components": len(mu),
                "weights": [float(w) for w in np.asarray(best.weights)[order]],
                "gain_means": [float(np.exp(m)) for m in mu[order]],
                "gain_sigmas": [float(sg * np.exp(m)) for sg, m in zip(sig[order], mu[order], strict=True)],
                "fit": pops.to_dict(),
            }
            stats["bimodal"] = len(mu) > 1
            tables.append(ProductTable(
                "POPULATIONS",
                {"weight": np.asarray(best.weights)[order], "gain": np.exp(mu[order]),
                 "gain_sigma": sig[order] * np.exp(mu[order]), "ln_gain": mu[order],
                 "ln_gain_sigma": sig[order]},
                {"gain": "e-/ADU", "gain_sigma": "e-/ADU"},
                "per-pixel gain populations (deconvolved mixture on ln g, components by BIC)"))
            outlier = np.zeros(gain.shape, dtype=bool)
            for rows in _bands(gain.shape):
                g, e = gain[rows], err[rows]
                okb = np.isfinite(g) & np.isfinite(e) & (e > 0) & (g > 0)
                lg, lg_err = _to_log(g[okb], e[okb])
                outlier[rows][okb] = gain_outlier(lg, lg_err, populations=pops,
                                                  config=self.params.defects)
            self.flag("gain_outlier", outlier)
        plan = self.planned.plan
        n_levels = int(sum(plan.gain_levels))
        if n_levels:
            stats["frames_per_level_for_1pct"] = int(frames_for_precision(0.01, n_levels))
        if self.planned.ptc is not None:
            stats["conventional"] = _f(self.planned.ptc.gain)
        return ProductContent("gain", "e-/ADU", arrays, tables, stats)

    def linearity(self) -> ProductContent | None:
        fit = self.planned.linearity
        if fit is None:
            return None
        pts = self.planned.linearity_points
        table = ProductTable(
            "LINEARITY",
            {"exptime": np.asarray([p["exptime"] for p in pts]),
             "signal": np.asarray([p["signal"] for p in pts]),
             "signal_err": np.asarray([p["signal_err"] for p in pts]),
             "residual_pct": np.asarray(fit.residual_pct), "used": np.asarray(fit.used)},
            {"exptime": "s", "signal": "ADU", "signal_err": "ADU", "residual_pct": "%"},
            "central-region mean signal per flat level")
        stats = {"slope_adu_s": _f(fit.slope), "slope_err": _f(fit.slope_err), "r2": _f(fit.r2),
                 "max_nonlinearity_pct": _f(fit.max_nonlinearity_pct),
                 "max_nonlinearity_above_3000_pct": _f(fit.max_nonlinearity_above_3000_pct),
                 "linearizer": [float(c) for c in np.asarray(fit.linearizer)],
                 "saturation_adu": _f(self.planned.plan.saturation)}
        arrays: list[ProductArray] = []
        resid = self.lazy("lin_resid")
        if resid is not None:
            at = self.planned.plan.lin_at
            arrays.append(ProductArray("LIN_RESID", resid, "%",
                                       "per-pixel linearity residual at flat levels "
                                       + ",".join(str(i) for i in at), dims=("level", "y", "x")))
            # Each level against its own population: a pixel is NONLINEAR when any
            # level's residual is far from that level's distribution (a threshold
            # on the maximum of |residual| over levels would be a lower effective
            # sigma, because the maximum of folded values has a compressed width).
            # A residual's noise goes as 1/sqrt(the pixel's signal): the pixels of
            # a vignetted corner (30 % of the centre's light) scatter ~1.8x as
            # much, and a map-wide width flagged them (6 of 120 000 pixels, all
            # in such a corner; measured). Deviations are weighted by the square
            # root of each pixel's relative signal (the flat level's) first.
            weight = self._signal_weight()
            flag = np.zeros(tuple(resid.shape[1:]), dtype=bool)  # type: ignore[attr-defined]
            for k in range(int(resid.shape[0])):  # type: ignore[attr-defined]
                level = np.asarray(resid[k])  # type: ignore[index]  # one level in memory
                if np.count_nonzero(np.isfinite(level)) < 10:
                    continue
                center, scale = robust_center_scale(threshold_sample(level))
                # weighted: the width is that of the weighted deviations (nonlinear's)
                flag |= nonlinear(level, config=self.params.defects, center=center,
                                  scale=scale if weight is None else None, weight=weight)
            self.flag("nonlinear", flag)
            stats["pixel_residual_levels"] = list(at)
        return ProductContent("linearity", "%", arrays, [table], stats)

    def _signal_weight(self) -> np.ndarray | None:
        """sqrt of each pixel's flat signal over the map's median (float32), floored at 0.1.

        The weight that evens out shot-noise-limited scatter across a
        vignetted field; None without a flat signal map.
        """
        signal = self.map("flat_signal")
        if signal is None:
            return None
        med = finite_median(signal)
        if not (np.isfinite(med) and med > 0):
            return None
        rel = np.divide(signal, np.float32(med), dtype=np.float32)
        np.clip(rel, np.float32(0.01), None, out=rel)  # NaN stays NaN
        return np.sqrt(rel, out=rel)

    def flat(self) -> ProductContent | None:
        signal = self.map("flat_signal")
        if signal is None:
            return None
        flat = master_flat(signal)
        plan = self.planned.plan
        ref = plan.flat_ref
        levels = [i for i, w in enumerate(plan.master_flat_weights()) if w > 0]
        n = sum(plan.flats[i].n for i in levels)
        var, noise = self._flat_temporal_var()
        med = local_median(flat)
        dead, low = dead_low(flat, med, config=self.params.defects)
        self.flag("dead", dead)
        self.flag("low_response", low)
        del med
        # PRNU of the sensor's normal pixels: defective pixels are reported by the
        # mask, and a handful of dead pixels would otherwise dominate the variance.
        excluded = self.flagged("dead", "low_response", "hot", "warm")
        # Large-scale (vignetting) cells: 64 px on a full frame, smaller on small
        # frames so that a cell still sees an almost flat illumination.
        block = int(np.clip(min(signal.shape) // 16, 8, 64))
        # the map's own temporal variance: one "frame" of it
        prnu = prnu_emva(signal, temporal_var=var, n_frames=1, mask=excluded, block=block)
        stats = {"prnu_pct": _f(prnu.prnu_pct), "prnu_highpass_pct": _f(prnu.prnu_highpass_pct),
                 "mean_signal_adu": _f(prnu.mean_signal), "reference_level": ref, "n_frames": n,
                 "levels": levels,
                 "excluded_pixels": int(excluded.sum()), "large_scale_block_px": block,
                 "definition": "EMVA 1288 release 4.0, defective pixels (mask) excluded",
                 "temporal_var_adu2": _f(var), "temporal_noise": noise,
                 "prnu_upper_bound": noise == "not removed",
                 "filter": self.flat_filter}
        return ProductContent("flat", "", [ProductArray("FLAT", flat, "", "master flat (median 1)")],
                              [], stats)

    def _flat_temporal_var(self) -> tuple[float, str]:
        """Temporal variance (ADU^2) of the flat signal map, and whether it was measured.

        ``"measured"``: the pixels' mean temporal variance of the map (the
        levels' per-frame variances over their frame counts, weighted as the
        map). ``"not removed"`` where the levels are one frame each (the
        plan prefers levels of several): the PRNU then holds the temporal
        noise, an upper bound.
        """
        count = self.partials.get("flat_var_count", 0.0)
        if count > 0:
            return float(self.partials.get("flat_var_sum", np.nan)) / count, "measured"
        return 0.0, "not removed"

    def mask(self, shape: tuple[int, int]) -> ProductContent:
        """The defect mask: the flags the other products set, the RTN and unstable-bias classes.

        The products before it in :data:`_BUILD_ORDER` flag their classes while
        their maps are in memory (NOISY by the read noise, HOT and WARM by the
        dark, ...).
        """
        rtn = self.map("rtn")
        if rtn is not None:
            self.flag("rtn", rtn > 0.5)
            del rtn
        z = self.map("bias_trend_z")
        plan = self.planned.plan
        if z is not None and plan.bias is not None:
            # The slope significance of n bias frames is Student-t with n - 2 dof:
            # convert it to the normal z of the same tail probability, so the 5-sigma
            # rule means the same false-alarm rate (5.7e-7) with 12 frames or 100.
            cfg = self.params.defects
            t_max = _t_threshold(cfg.unstable_bias_z, plan.bias.n - 2)
            # unstable_bias(z) on the rescaled map: |t| / t_max * z_thr > z_thr <=> |t| > t_max
            self.flag("unstable_bias", unstable_bias(z * np.float32(cfg.unstable_bias_z / t_max),
                                                     config=cfg))
        mask = self._mask if self._mask is not None else np.zeros(shape, dtype=np.uint16)
        counts = mask_counts(mask)
        stats = {"counts": counts, "bits": {b.name: int(b.value) for b in MaskBit},
                 "classes_evaluated": sorted(self._evaluated)}
        return ProductContent("mask", "", [ProductArray("MASK", mask, "", "defect bitmask")], [],
                              stats)


def assemble_products(maps: Mapping[str, object], planned: PlanResult, params: CalibrationParams,
                      *, shape: tuple[int, int], temperature: float | None = None,
                      partials: dict[str, float] | None = None,
                      wanted: tuple[str, ...] = PRODUCT_TYPES,
                      emit: Callable[[ProductContent], None] | None = None,
                      resident_limit: int | None = None,
                      flat_filter: str | None = None,
                      ) -> tuple[dict[str, ProductContent], dict[str, str]]:
    """Build every requested product that the data supports.

    Parameters
    ----------
    flat_filter : str, optional
        Filter of the flat frames (one per dataset, ``storage.scan``): the
        flat product's ``filter``.
    emit : callable, optional
        Called with each product as soon as it is built; the product is then
        dropped, so at most one product's maps are in memory at a time (a 61 MP
        product is up to ~1.5 GB). Without it the products are returned.
    resident_limit : int, optional
        With ``emit``: after a product, freed memory goes back to the OS only
        while the resident set exceeds this (bytes; see
        :func:`compute.allocator.return_freed_memory`), before the first (the
        tile pass's), and once at the end; None: before and after every
        product. The next product reuses the memory kept: given back, its pages are faulted and zeroed by the kernel again
        (300-frame 61 MP job, assembly without the store's writes, 2 cores:
        12.4-13.4 s instead of 16.4-17.5 s, 18.6-20.1 instead of 23.1-23.8
        busy core-s; the resident set 2.0-2.3 GB after each product,
        not growing).

    Returns
    -------
    products : dict of str to ProductContent
        One entry per product type computed (only the ``stats`` when ``emit`` is given).
    missing : dict of str to str
        For every requested type not computed, the reason.
    """
    asm = Assembler(maps, planned, params, temperature=temperature, partials=partials or {},
                    flat_filter=flat_filter)
    out: dict[str, ProductContent] = {}
    builders = {"bias": asm.bias, "read_noise": asm.read_noise, "dark": asm.dark, "ptc": asm.ptc,
                "gain": asm.gain, "linearity": asm.linearity, "flat": asm.flat,
                "mask": lambda: asm.mask(shape)}
    # Products feed the mask (their flags), so every product is built; only the
    # wanted ones are kept or emitted. The conversion gain (the gain maps read,
    # their population mixture, each pixel's population) is first needed by the
    # bias; it is computed on a helper thread while the linearity and the bias
    # profiles are built (the same result: it depends on the gain maps alone).
    if emit is not None:
        # the same rule before the first product: the tile pass's freed memory, kept
        # for reuse, goes back while the resident set leaves no room for a product
        # (61 MP job, 69 frames: the assembly had started at 2.8-3.0 GB and peaked
        # at 3.3-3.7 GB while the linearity and the conversion gain overlapped)
        return_freed_memory(above=resident_limit)
    helper = ThreadPoolExecutor(1, thread_name_prefix="sitiancal-gain")
    try:
        if "gain" in maps and "gain_err" in maps:
            helper.submit(asm.conversion_gain)
        _build(asm, builders, wanted, emit, out, resident_limit)
    finally:
        helper.shutdown(wait=True)
    if emit is not None and resident_limit is not None:
        return_freed_memory()
    out = {name: out[name] for name in PRODUCT_TYPES if name in out}
    missing = {k: v for k, v in asm.missing.items() if k in wanted and k not in out}
    for name in wanted:
        if name not in out and name not in missing:
            missing[name] = "the dataset does not support this product"
    return out, missing


def _build(asm: Assembler, builders: dict[str, Callable[[], ProductContent | None]],
           wanted: tuple[str, ...], emit: Callable[[ProductContent], None] | None,
           out: dict[str, ProductContent], resident_limit: int | None = None) -> None:
    """Build the products in :data:`_BUILD_ORDER` into ``out`` (see :func:`assemble_products`)."""
    order = tuple(n for n in _BUILD_ORDER if n != "mask" or "mask" in wanted)
    ahead = asm._read_ahead = _ReadAhead(asm.maps, order)
    asm._builder_thread = threading.get_ident()
    try:
        for name in order:
            asm._building = name
            try:
                content = builders[name]()
            finally:
                ahead.finish(name)
                asm._building = None
            _keep(asm, name, content, wanted, emit, out, resident_limit)
    finally:
        ahead.close()
        asm._read_ahead = None


def _keep(asm: Assembler, name: str, content: ProductContent | None, wanted: tuple[str, ...],
          emit: Callable[[ProductContent], None] | None, out: dict[str, ProductContent],
          resident_limit: int | None) -> None:
    """After product ``name`` is built: emit or keep it (see :func:`_build`)."""
    if name == "dark" and isinstance(asm._gain_conv, np.ndarray):
        # only read noise and dark convert maps to electrons: keep the scalar
        asm._gain_conv = asm.gain_median()
    if content is None or name not in wanted:
        return
    if emit is not None:
        emit(content)
        content = ProductContent(content.type, content.units, stats=content.stats)
        return_freed_memory(above=resident_limit)
    out[name] = content
