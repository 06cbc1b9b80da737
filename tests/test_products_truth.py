"""Every product, computed by the real pipeline stages, against the simulator's truth.

Each dataset runs scan -> cube -> plan -> tile pass -> products once (module
fixtures). Tolerances follow from the statistical errors of the dataset
sizes, stated next to each assertion.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from simdata import small_dataset

from sitiancal.compute.defects import MaskBit
from sitiancal.compute.linearity import fit_linearity
from sitiancal.compute.tile import CalibrationParams
from sitiancal.service.pipeline import ProductsOutcome, compute_products
from sitiancal.storage.cube import build_cube, open_cube
from sitiancal.storage.scan import scan

#: Mid-size camera: 128 x 160 px (20k pixels), 10 flat levels x 32 frames.
MID = {
    "shape": (128, 160), "seed": 7, "n_bias": 40, "flat_levels": 10, "flat_frames": 32,
    "dark_exptimes": [0.0, 60.0, 300.0, 600.0, 1200.0], "dark_frames": 6,
    "hot_fraction": 2e-3, "warm_fraction": 2e-3, "dead_fraction": 1e-3,
    "low_response_fraction": 2e-3, "rtn_fraction": 2e-3, "noisy_fraction": 2e-3,
}


def _run(tmp_path: Path, **config) -> tuple[ProductsOutcome, object, object]:
    raw, truth = small_dataset(tmp_path, **config)
    inventory = scan(raw)
    # truth.fits sits beside the frames; scan rejects it (float data) and nothing else.
    assert [Path(r.file).name for r in inventory.rejected] == ["truth.fits"]
    store = str(tmp_path / "cube.zarr")
    build_cube(inventory, store)
    ds = open_cube(store)
    outcome = compute_products(ds, store, tmp_path / "work", params=CalibrationParams(seed=3))
    return outcome, truth, ds


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("mid"), **MID)


@pytest.fixture(scope="module")
def bimodal(tmp_path_factory):
    # A second population 18% above the main one; per-pixel errors ~7% (64 frames x 14 levels).
    cfg = {**MID, "shape": (160, 192), "seed": 11, "gain2_fraction": 0.2, "gain2_mean": 0.30,
           "flat_frames": 64, "flat_levels": 14}
    return _run(tmp_path_factory.mktemp("bimodal"), **cfg)


def _array(outcome: ProductsOutcome, kind: str, name: str) -> np.ndarray:
    for arr in outcome.products[kind].arrays:
        if arr.name == name:
            return np.asarray(arr.data)
    raise KeyError(f"{kind} has no array {name}")


def test_every_product_is_built(mid):
    outcome, _, _ = mid
    assert set(outcome.products) == {"bias", "read_noise", "dark", "ptc", "gain", "linearity",
                                     "flat", "mask"}, outcome.missing


def test_per_pixel_gain_median_and_errors(mid):
    outcome, truth, _ = mid
    gain = _array(outcome, "gain", "GAIN")
    err = _array(outcome, "gain", "GAIN_ERR")
    good = np.isfinite(gain) & ~truth.has("DEAD") & ~truth.has("LOW_RESPONSE") & ~truth.has("HOT")
    # 20k pixels x ~7% per-pixel error: the median is known to ~0.1%; require 0.5%.
    assert np.median(gain[good]) == pytest.approx(np.median(truth.gain[good]), rel=5e-3)
    pull = (gain[good] - truth.gain[good]) / err[good]
    # robust width of the pulls: 1 within ~3% sampling error, allow 15% model slack.
    width = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.85 < width < 1.15
    assert abs(np.median(pull)) < 0.1


def test_bimodal_gain_population_found(bimodal):
    outcome, truth, _ = bimodal
    stats = outcome.products["gain"].stats
    assert stats["bimodal"] is True
    pops = stats["populations"]
    means = np.asarray(pops["gain_means"])
    weights = np.asarray(pops["weights"])
    hi = int(np.argmax(means))
    cfg = truth.config
    true_frac = float(np.mean(np.abs(truth.gain - cfg.gain2_mean) < np.abs(truth.gain - cfg.gain_mean)))
    # The deconvolved fraction is as precise as the overlap of the populations
    # allows; the mixture reports that uncertainty (it shrinks as 1/sqrt(pixels):
    # a few tenths of a percent at 61 MP).
    assert len(weights) == 2
    w_err = np.asarray(pops["fit"]["best"]["weights_err"])[hi]
    assert w_err < 0.04
    assert abs(weights[hi] - true_frac) < max(3 * w_err, 0.005)
    assert means[hi] == pytest.approx(cfg.gain2_mean, rel=0.01)
    assert means[int(np.argmin(means))] == pytest.approx(cfg.gain_mean, rel=0.01)


def test_unimodal_camera_is_not_called_bimodal(mid):
    outcome, _, _ = mid
    assert outcome.products["gain"].stats["bimodal"] is False


def test_conventional_ptc_gain_and_read_noise(mid):
    outcome, truth, _ = mid
    ptc = outcome.products["ptc"].stats
    # pair differences over the whole small frame: gain known to a few 0.1%; require 1%.
    assert ptc["gain"] == pytest.approx(np.median(truth.gain), rel=0.01)
    assert ptc["turnoff_adu"] > 0.7 * (65535 - truth.config.bias_level)


def test_read_noise_median(mid):
    outcome, truth, _ = mid
    rn = outcome.products["read_noise"].stats
    # Per-pixel temporal noise also carries temporal row noise (0.5 ADU) and
    # quantisation (1/sqrt(12) ADU): about +1% on 1.03 e-. Require 2%.
    expected = np.median(np.sqrt(truth.read_noise**2
                                 + (truth.gain * truth.config.row_noise_sigma) ** 2
                                 + truth.gain**2 / 12.0))
    assert rn["median_e"] == pytest.approx(expected, rel=0.02)
    assert rn["conventional_e"] == pytest.approx(expected, rel=0.05)


def test_dark_median_within_its_error(mid):
    outcome, truth, _ = mid
    summary = outcome.products["dark"].stats["summary"]
    true_median = float(np.median(truth.dark_rate))
    assert abs(summary["median"] - true_median) < 3 * summary["median_err"] + 1e-5


def test_dark_mean_within_its_error(mid):
    # the mean of the measured rates is not moved by their noise (the median
    # of a skewed population is: compute.dark.dark_summary's notes)
    outcome, truth, _ = mid
    summary = outcome.products["dark"].stats["summary"]
    true_mean = float(np.mean(truth.dark_rate, dtype=np.float64))
    assert abs(summary["mean"] - true_mean) < 3 * summary["mean_err"]


def test_hot_pixels_recall_and_precision(mid):
    outcome, truth, _ = mid
    mask = _array(outcome, "mask", "MASK")
    found = (mask & MaskBit.HOT) != 0
    true = truth.has("HOT")
    recall = (found & true).sum() / true.sum()
    precision = (found & true).sum() / max(found.sum(), 1)
    assert true.sum() >= 20
    assert recall >= 0.95
    assert precision >= 0.90


def test_rtn_pixels_found_and_noisy_pixels_not_rtn(mid):
    outcome, truth, _ = mid
    mask = _array(outcome, "mask", "MASK")
    rtn = (mask & MaskBit.RTN) != 0
    true = truth.has("RTN")
    assert true.sum() >= 20
    # Detectable telegraph pixels: every level step >= 6 sigma of the pixel's
    # read noise and every level visited >= 3 times in the bias series. The
    # stage-2 rule (Delta BIC > 20, chosen for < 5e-6 false alarms per normal
    # pixel at F = 40, i.e. a few hundred on a 61 MP sensor) needs ~5 sigma
    # for a balanced two-level pixel of 40 frames (its log-likelihood gain is
    # ~ (n/2) ln(1 + (d/2 sigma)^2) minus the assignment entropy): steps of
    # 4.5-6 sigma are found about half the time (measured over 6 dither seeds:
    # 100% above 6 sigma, 70-77% above 4.5 sigma).
    r = truth.rtn
    bias_cols = np.flatnonzero(np.asarray(truth.frames["type"]) == "bias")
    step = np.zeros(len(r.y))
    visits_min = np.zeros(len(r.y))
    for i in range(len(r.y)):
        levels = np.sort(np.asarray(r.levels[i])[: int(r.n_levels[i])])
        step[i] = np.min(np.diff(levels)) / truth.read_noise[r.y[i], r.x[i]]
        visits_min[i] = np.bincount(r.states[i, bias_cols], minlength=int(r.n_levels[i])).min()
    detectable = (step >= 6.0) & (visits_min >= 3)
    found = rtn[r.y, r.x]
    assert detectable.sum() >= 10
    assert found[detectable].mean() >= 0.90
    assert found[(step >= 4.5) & (visits_min >= 3)].mean() >= 0.6
    assert found.mean() >= 0.5  # all telegraph pixels, however small their steps
    noisy_only = truth.has("NOISY") & ~true
    assert (rtn & noisy_only).sum() <= max(1, 0.05 * noisy_only.sum())
    normal = truth.defects == 0
    assert (rtn & normal).sum() / normal.sum() < 1e-3


def test_dead_and_low_response_found(mid):
    outcome, truth, _ = mid
    mask = _array(outcome, "mask", "MASK")
    dead = (mask & MaskBit.DEAD) != 0
    low = (mask & MaskBit.LOW_RESPONSE) != 0
    assert (dead & truth.has("DEAD")).sum() == truth.has("DEAD").sum()
    assert ((low | dead) & truth.has("LOW_RESPONSE")).sum() >= 0.9 * truth.has("LOW_RESPONSE").sum()
    normal = truth.defects == 0
    assert ((dead | low) & normal).sum() <= 3


def test_nonlinearity_recovered(mid):
    outcome, truth, _ = mid
    stats = outcome.products["linearity"].stats
    points = outcome.planned.linearity_points
    t = np.array([p["exptime"] for p in points])
    cfg = truth.config
    # The truth's nonlinearity applied to an ideal ladder with the measured slope,
    # analysed the same way: what a perfect measurement would report.
    ideal = stats["slope_adu_s"] * t
    observed = ideal * (1 - cfg.nonlinearity_coeff * (np.abs(ideal) / 65535.0) ** cfg.nonlinearity_power)
    sat = outcome.planned.plan.saturation
    keep = ideal < sat
    ref = fit_linearity(t[keep], observed[keep], np.full(keep.sum(), 1.0), saturation=sat)
    assert stats["max_nonlinearity_pct"] == pytest.approx(ref.max_nonlinearity_pct, abs=0.1)
    assert stats["r2"] > 0.999


def test_bias_products(mid):
    outcome, truth, _ = mid
    master = _array(outcome, "bias", "BIAS")
    n = truth.config.n_bias
    resid = master - truth.bias
    # Clipped mean of n frames: noise ~ rn/g/sqrt(n) (x ~1.03 for 3-sigma clipping).
    expected = np.median(truth.read_noise / truth.gain) / np.sqrt(n)
    assert abs(np.median(resid)) < 0.2
    assert np.std(resid[truth.defects == 0]) == pytest.approx(expected, rel=0.25)
    stab = outcome.products["bias"].stats["stability"]
    # The per-frame level of a small frame carries measurement noise: pixel noise
    # over ny*nx pixels and temporal row noise over ny rows, on top of the drift.
    ny, nx = truth.shape
    drift = np.asarray(truth.frames["drift"])[np.asarray(truth.frames["type"]) == "bias"]
    expected = np.sqrt(np.var(drift, ddof=1) + np.median(truth.read_noise / truth.gain) ** 2
                       / (ny * nx) + truth.config.row_noise_sigma**2 / ny)
    assert stab["std"] == pytest.approx(expected, rel=0.3)
    assert abs(stab["drift"]) < 5 * stab["drift_err"] + abs(truth.config.bias_drift_rate)


def test_flat_prnu(mid):
    outcome, truth, _ = mid
    stats = outcome.products["flat"].stats
    flat = _array(outcome, "flat", "FLAT")
    assert np.nanmedian(flat) == pytest.approx(1.0, abs=1e-6)
    normal = truth.defects == 0
    # The flat is in ADU: per-pixel response and per-pixel gain both spread it.
    adu = truth.response / truth.gain
    true_prnu = 100 * np.std(adu[normal]) / np.mean(adu[normal])
    assert stats["prnu_highpass_pct"] == pytest.approx(true_prnu, rel=0.25)
    assert stats["prnu_pct"] > stats["prnu_highpass_pct"]  # vignetting included


class _Recording(dict):
    """The tile maps, recording which ones the assembly reads."""

    def __init__(self, maps) -> None:
        super().__init__(maps)
        self.read: set[str] = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        if name in self:
            self.read.add(name)
        return super().get(name, default)


def test_every_scratch_map_is_read_by_the_assembly(mid, tmp_path_factory):
    """The tile pass stores only maps the products use (each is 245 MB of scratch at 61 MP).

    ``dark_offset`` and ``flat_var`` were written for every tile and never
    read: 0.5 GB of scratch writes per full-size job.
    """
    import zarr

    from sitiancal.compute.products import assemble_products
    from sitiancal.compute.tile import expected_maps

    outcome, _, ds = mid
    # the mid fixture's folder (pytest also links it as "midcurrent")
    work = sorted({p.resolve() for p in tmp_path_factory.getbasetemp().glob("mid*/work/maps.zarr")})
    assert len(work) == 1
    group = zarr.open_group(str(work[0]), mode="r")
    stored = set(group.array_keys())
    assert stored == set(expected_maps(outcome.planned.plan))
    maps = _Recording({name: group[name] for name in stored})
    assemble_products(maps, outcome.planned, CalibrationParams(seed=3),
                      shape=(ds.sizes["y"], ds.sizes["x"]))
    assert maps.read == stored


class _CountedMap:
    """A scratch map that counts how many times its values are read (in whole maps)."""

    def __init__(self, arr) -> None:
        self.arr = arr
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, len(arr.shape)
        self.values_read = 0

    def __getitem__(self, region):
        out = np.asarray(self.arr[region])
        self.values_read += out.size
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    @property
    def reads(self) -> float:
        return self.values_read / math.prod(self.shape)


def test_assembly_reads_the_most_read_maps_once_each_use(mid, tmp_path_factory, monkeypatch):
    """The gain maps are read once by the conversion gain's helper and once by the gain
    product (which waits for that helper's population mixture instead of fitting it a
    second time); the read-noise map once (the mask's NOISY class comes from the read
    noise product). Each read is 245 MB from the scratch disk at 61 MP."""
    import zarr

    from sitiancal.compute import products

    outcome, _, ds = mid
    work = sorted({p.resolve() for p in tmp_path_factory.getbasetemp().glob("mid*/work/maps.zarr")})
    group = zarr.open_group(str(work[0]), mode="r")
    maps = {name: _CountedMap(group[name]) for name in group.array_keys()}
    fits = []
    real = products.gain_populations
    monkeypatch.setattr(products, "gain_populations",
                        lambda *a, **k: fits.append(1) or real(*a, **k))
    built, _ = products.assemble_products(maps, outcome.planned, CalibrationParams(seed=3),
                                          shape=(ds.sizes["y"], ds.sizes["x"]))
    assert "noisy" in built["mask"].stats["classes_evaluated"]
    assert len(fits) == 1
    reads = {name: m.reads for name, m in maps.items()}
    assert reads["gain"] == reads["gain_err"] == 2, reads
    assert reads["bias_std"] == 1, reads
    assert max(reads.values()) <= 2, reads


class _Inline:
    """A stand-in for ThreadPoolExecutor that runs each task at once on the caller's thread."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the future, as an executor does
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _scratch_maps(tmp_path_factory, fixture: str) -> dict:
    """The tile pass's scratch maps (zarr) of a module fixture's job."""
    import zarr

    work = sorted({p.resolve() for p in
                   tmp_path_factory.getbasetemp().glob(f"{fixture}*/work/maps.zarr")})
    assert len(work) == 1
    group = zarr.open_group(str(work[0]), mode="r")
    return {name: group[name] for name in group.array_keys()}


def _assembled(maps: dict, outcome, ds) -> dict:
    """Every product assembled from ``maps``: type -> (stats as JSON, arrays)."""
    import json

    from sitiancal.compute import products
    from sitiancal.storage.store import to_jsonable

    built, _ = products.assemble_products(maps, outcome.planned, CalibrationParams(seed=3),
                                          shape=(ds.sizes["y"], ds.sizes["x"]))
    return {kind: (json.dumps(to_jsonable(c.stats), sort_keys=True),
                   {a.name: np.asarray(a.data) for a in c.arrays})
            for kind, c in built.items()}


def _assert_same_products(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for kind, (stats, arrays) in one.items():
        assert stats == other[kind][0], kind
        assert arrays.keys() == other[kind][1].keys()
        for name, values in arrays.items():
            np.testing.assert_array_equal(values, other[kind][1][name], err_msg=f"{kind} {name}")


def test_helper_threads_change_no_product(bimodal, tmp_path_factory, monkeypatch):
    """The conversion gain and the dark populations, computed on helper threads while the
    other products are built, give exactly the products of a build on one thread (the
    bimodal set: a per-pixel conversion gain from two gain populations)."""
    import threading

    from sitiancal.compute import products

    outcome, _, ds = bimodal
    maps = _scratch_maps(tmp_path_factory, "bimodal")
    computed_on: list[str] = []
    real = products.Assembler._conversion_gain

    def recording(self):
        if self._gain_conv is None:
            computed_on.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(products.Assembler, "_conversion_gain", recording)
    threaded = _assembled(maps, outcome, ds)
    assert computed_on == ["sitiancal-gain_0"]
    assert len(threaded["gain"][0]) and '"bimodal": true' in threaded["gain"][0]
    monkeypatch.setattr(products, "ThreadPoolExecutor", _Inline)
    inline = _assembled(maps, outcome, ds)
    assert computed_on[-1] == threading.main_thread().name
    _assert_same_products(threaded, inline)


def test_read_ahead_changes_no_product(mid, tmp_path_factory, monkeypatch):
    """The builders' maps read ahead on a thread of their own give exactly the
    products of reading each map when asked (the job's scratch maps, zarr)."""
    from sitiancal.compute import products

    outcome, _, ds = mid
    maps = _scratch_maps(tmp_path_factory, "mid")
    served: list[tuple[str, str]] = []
    take = products._ReadAhead.take

    def recording(self, builder, name):
        value = take(self, builder, name)
        if value is not None:
            served.append((builder, name))
        return value

    monkeypatch.setattr(products._ReadAhead, "take", recording)
    ahead = _assembled(maps, outcome, ds)
    assert served == [(b, n) for b in products._BUILD_ORDER
                      for n in products._BUILDER_READS.get(b, ()) if n in maps]
    monkeypatch.setattr(products, "_BUILDER_READS", {})
    served.clear()
    asked = _assembled(maps, outcome, ds)
    assert not served
    _assert_same_products(ahead, asked)


@pytest.mark.parametrize("limit, expect", [(None, "every"), (1 << 60, "end"), (0, "every+end")])
def test_freed_memory_goes_back_only_over_the_resident_limit(mid, tmp_path_factory, monkeypatch,
                                                            limit, expect):
    """Between emitted products the assembly gives freed memory back only while the
    resident set is over ``resident_limit`` (a kept heap is reused by the next
    product; given back, its pages are zeroed again), before the first product by
    the same rule, and once at the end; without a limit, before and after every
    product. The products are the same either way."""
    import zarr

    from sitiancal.compute import allocator, products

    outcome, _, ds = mid
    work = sorted({p.resolve() for p in tmp_path_factory.getbasetemp().glob("mid*/work/maps.zarr")})
    group = zarr.open_group(str(work[0]), mode="r")
    maps = {name: group[name] for name in group.array_keys()}
    trimmed: list[str] = []
    monkeypatch.setattr(allocator, "_libc_function",
                        lambda name: (lambda pad: trimmed.append("trim")) if name == "malloc_trim"
                        else None)
    emitted: list[str] = []

    def emit(content) -> None:
        emitted.append(content.type)
        trimmed.append(f"after {content.type}")

    products.assemble_products(maps, outcome.planned, CalibrationParams(seed=3),
                               shape=(ds.sizes["y"], ds.sizes["x"]), emit=emit,
                               resident_limit=limit)
    assert len(emitted) == len(products.PRODUCT_TYPES)
    between = [i for i, t in enumerate(trimmed[:-1]) if t == "trim"]
    if expect.startswith("every"):
        # a trim right after each product's emission
        assert all(trimmed[i + 1] == "trim" for i, t in enumerate(trimmed[:-1])
                   if t.startswith("after"))
        assert len(between) >= len(emitted) - 1
    else:
        assert trimmed[-1] == "trim" and trimmed.count("trim") == 1
    assert (trimmed[-1] == "trim" and trimmed[-2] == "trim") == (expect == "every+end")
    # and before the first product, by the same rule (the tile pass's kept heap)
    assert (trimmed[0] == "trim") == (expect != "end")


def test_return_freed_memory_above_a_bound(monkeypatch):
    """``return_freed_memory(above=)`` trims only over the bound, and says whether it did."""
    from sitiancal.compute import allocator

    calls: list[int] = []
    monkeypatch.setattr(allocator, "_libc_function",
                        lambda name: calls.append if name == "malloc_trim" else None)
    resident = allocator.resident_bytes()
    if resident is None:
        pytest.skip("no /proc/self/statm: the resident set is unknown here")
    assert resident > 10 << 20  # an interpreter with numpy holds tens of MB
    assert allocator.return_freed_memory(above=resident * 4) is False and calls == []
    assert allocator.return_freed_memory(above=resident // 4) is True and calls == [0]
    assert allocator.return_freed_memory() is True and calls == [0, 0]
    monkeypatch.setattr(allocator, "_libc_function", lambda name: None)
    assert allocator.return_freed_memory() is False  # no glibc: nothing to give back


def test_build_order_keeps_each_products_inputs_first():
    """The build order may move products for the writer's sake, never past their inputs:
    read noise before the dark (the per-pixel conversion gain is dropped after the
    dark), the dark before the flat (HOT/WARM exclude pixels from the PRNU), the mask
    last (every flag), each type once."""
    from sitiancal.compute.products import _BUILD_ORDER, PRODUCT_TYPES

    order = list(_BUILD_ORDER)
    assert sorted(order) == sorted(PRODUCT_TYPES)
    assert order.index("read_noise") < order.index("dark") < order.index("flat")
    assert order[-1] == "mask"


def test_warm_pixels_found_and_glow_is_not_warm(mid):
    """WARM finds the warm population; the glow corner, steep at the pixel scale, is not WARM.

    The mid camera's glow falls by e in ~6 px (3 % of its diagonal), far
    steeper than the 64 px cells of the dark's local level: the glow pixels
    are excesses over the cells, not over their own neighbourhoods.
    """
    outcome, truth, _ = mid
    mask = _array(outcome, "mask", "MASK")
    warm = (mask & MaskBit.WARM) != 0
    true = truth.has("WARM")
    assert true.sum() >= 20
    # warm rates: median 10x the main population's, lognormal 0.4; ~30 dark
    # frames up to 1200 s measure them to a few per cent.
    assert (warm & true).sum() >= 0.9 * true.sum()
    normal = truth.defects == 0
    ny, nx = truth.shape
    y, x = np.mgrid[0:ny, 0:nx]
    cfg = truth.config
    corner_y = 0 if cfg.glow_corner.startswith("bottom") else ny - 1  # row 0 is the bottom
    corner_x = 0 if cfg.glow_corner.endswith("left") else nx - 1
    distance = np.hypot(y - corner_y, x - corner_x)
    glow_rate = cfg.glow_rate * np.exp(-distance / (cfg.glow_scale * math.hypot(ny, nx)))
    glow = glow_rate > cfg.dark_median  # glow above the main population's median rate
    assert cfg.glow_rate >= 10 * cfg.dark_median and glow.sum() > 100
    # Its peak within 2 px of the corner is a cusp that every neighbour falls
    # from by ~30 %: up to 3 pixels there may stand out of their neighbourhood.
    assert (warm & normal & glow).sum() <= 3
    assert not (warm & normal & glow & (distance > 2)).any()
    # the main population's tail and the rates' errors: a few false WARM in 20k
    assert (warm & normal).sum() <= max(3, 0.2 * true.sum())
