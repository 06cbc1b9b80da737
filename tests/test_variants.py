"""Acquisition variants real labs use, each against the simulator's truth.

- EMVA 1288 style: no bias frames at all, darks taken at every flat exposure time;
- flat pairs only (no stacks): conventional PTC, linearity and flat, but no
  per-pixel gain, with the reason;
- no darks: every other product, and the reason the dark is missing;
- a CCD-like camera whose full well fills far below the ADC limit, with a
  ladder of one unsaturated level: no gain or linearity from clipped levels;
- another seed, shape and header convention (N.I.N.A.) for the core figures;
- a sensor whose temperature jitters between darks: the dark rate's error
  carries the darks' own frame-level scatter;
- flats alone (no bias, no darks): the offset from the flat ladder at 0 s;
- a bias frame whose whole level jumped: left out, named;
- flat levels of one frame: the master flat from a level of several, else a
  PRNU labelled an upper bound;
- the master flat stacks the frames of every level of the linear range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from simdata import read_stack, small_dataset

from sitiancal.compute.tile import CalibrationParams
from sitiancal.service.pipeline import compute_products
from sitiancal.storage.cube import build_cube, open_cube
from sitiancal.storage.scan import scan

LADDER = [0.4, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]


def _products_of(tmp: Path, raw: Path):
    inventory = scan(raw)
    store = str(tmp / "cube.zarr")
    build_cube(inventory, store)
    return compute_products(open_cube(store), store, tmp / "work", params=CalibrationParams())


def _outcome(tmp: Path, **config):
    raw, truth = small_dataset(tmp, **config)
    return _products_of(tmp, raw), truth


def test_emva_style_set_without_bias_frames(tmp_path):
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=31, n_bias=0, flat_exptimes=LADDER,
                              dark_exptimes=LADDER, dark_frames=4, flat_frames=24)
    assert {"dark", "ptc", "gain", "linearity", "flat", "mask"} <= set(outcome.products)
    assert "bias" in outcome.missing and "bias frames" in outcome.missing["bias"]
    assert "read_noise" in outcome.missing
    # every flat level is corrected by the darks of its own exposure time
    assert all(m is not None for m in outcome.planned.plan.flat_dark)
    # the camera's gain (the map's median is ~1 % high here: 4 levels of 24
    # frames give each pixel a ~20 % error, and 1/slope is skewed)
    stats = outcome.products["gain"].stats
    assert stats["population_gain"] == pytest.approx(np.median(truth.gain), rel=0.01)
    assert outcome.products["ptc"].stats["gain"] == pytest.approx(np.median(truth.gain), rel=0.015)


def test_flat_pairs_only_give_conventional_products_and_say_why_not_per_pixel(tmp_path):
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=32, flat_frames=2, n_bias=10)
    assert {"bias", "ptc", "linearity", "flat"} <= set(outcome.products)
    assert "gain" in outcome.missing
    reason = outcome.missing["gain"]
    assert "per-pixel gain" in reason and "frames" in reason and "at most 2" in reason
    # one pair per level over a 32 x 40 central region: a few % per point.
    ptc = outcome.products["ptc"].stats
    assert abs(ptc["gain"] - np.median(truth.gain)) < 3 * ptc["gain_err"]
    assert ptc["gain_err"] < 0.04 * ptc["gain"]


def test_no_darks_gives_the_other_products(tmp_path):
    outcome, _ = _outcome(tmp_path, shape=(48, 64), seed=33, dark_exptimes=[], dark_frames=0)
    assert outcome.missing["dark"] == "the dataset has no dark frames"
    assert {"bias", "read_noise", "ptc", "gain", "linearity", "flat", "mask"} <= set(outcome.products)


def test_another_seed_shape_and_convention(tmp_path):
    outcome, truth = _outcome(tmp_path, shape=(96, 72), seed=34, header_convention="nina",
                              n_bias=30, flat_levels=10, flat_frames=30)
    med = float(np.median(truth.gain))
    gain = next(a for a in outcome.products["gain"].arrays if a.name == "GAIN").data
    assert np.nanmedian(gain) == pytest.approx(med, rel=0.005 + 0.005)  # 7k pixels: ~0.3% noise
    assert outcome.products["ptc"].stats["gain"] == pytest.approx(med, rel=0.01)
    rn = outcome.products["read_noise"].stats["median_e"]
    expected = np.median(np.sqrt(truth.read_noise**2 + (truth.gain * truth.config.row_noise_sigma) ** 2
                                 + truth.gain**2 / 12.0))
    assert rn == pytest.approx(expected, rel=0.02)


def test_full_well_below_the_adc_limit_with_too_few_levels_for_a_ptc(tmp_path):
    # 2 e-/ADU and a 20 000 e- full well: pixels clip at ~10 000 ADU above the
    # 1000 ADU offset, where the ADC reaches 65 535. The default ladder (3-70 % of
    # the ADC range) has one unsaturated level, too few for a PTC fit; the points
    # still turn over, and the clipped levels must not feed the per-pixel gain or
    # the linearity (fitted on them they gave 0.48 e-/ADU for 2.0, and 26 %
    # "nonlinearity").
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=35, gain_mean=2.0, gain_sigma=0.02,
                              full_well=20000.0, read_noise_median=3.5, bias_level=1000.0)
    full_well_adu = truth.config.full_well / float(np.median(truth.gain))
    signals = [p["signal"] for p in outcome.planned.linearity_points]
    saturation = outcome.planned.plan.saturation
    # between the one unsaturated level and the full well
    assert max(s for s in signals if s < 0.5 * full_well_adu) < saturation < full_well_adu
    assert any("points turn over" in n for n in outcome.planned.notes)
    assert "the points turn over at ~" in outcome.missing["ptc"]
    assert "more flat levels below that signal" in outcome.missing["ptc"]
    assert "gain" not in outcome.products and "linearity" not in outcome.products
    assert "below 70% of saturation" in outcome.missing["gain"]
    assert "of saturation" in outcome.missing["linearity"]
    # the products that do not need the ladder's slope are still made
    assert {"bias", "read_noise", "dark", "flat", "mask"} <= set(outcome.products)


def test_ptc_points_carry_their_own_levels_exposure_times(tmp_path):
    # each point of the PTC table is its level's (the last level's time had
    # been written on every point)
    outcome, truth = _outcome(tmp_path, shape=(48, 64), seed=48)
    flats = outcome.planned.plan.flats
    times = [p["exptime"] for p in outcome.planned.ptc_points]
    assert times == [flats[p["level"]].exptime for p in outcome.planned.ptc_points]
    table = next(t for t in outcome.products["ptc"].tables if t.name == "PTC")
    expected = sorted(set(np.round(truth.frames["exptime"][truth.frames["type"] == "flat"], 6)))
    assert np.round(np.asarray(table.columns["exptime"]), 6).tolist() == expected[: len(times)]
    assert len(set(times)) == len(times) > 3
    # the ladder steps from unclipped levels to clipped ones: the full well is
    # the brightest unclipped level's, a lower bound, and the QC table says so
    from sitiancal.service.report import build_report

    stats = outcome.products["ptc"].stats
    mean, var = np.asarray(table.columns["mean"]), np.asarray(table.columns["var"])
    assert stats["full_well_lower_bound"] is True
    assert stats["turnoff_adu"] == mean[np.argmax(var)]
    report = build_report("X", {k: p.stats for k, p in outcome.products.items()})
    assert next(f for f in report.figures if f.key == "full_well").label == "Full well (lower bound)"


def test_qc_figures_quote_their_errors(tmp_path):
    # the bias level (the frame levels' scatter over the series), its
    # stability, and both read noises carry their 1-sigma errors
    from sitiancal.service.report import build_report

    outcome, truth = _outcome(tmp_path, shape=(48, 64), seed=49)
    report = build_report("X", {k: p.stats for k, p in outcome.products.items()})
    fig = {f.key: f for f in report.figures}
    bias = outcome.products["bias"].stats["stability"]
    rn = outcome.products["read_noise"].stats
    assert fig["bias_level"].error == bias["mean_err"] > 0
    dark = outcome.products["dark"].stats["summary"]
    assert fig["dark_current_mean"].value == dark["mean"]
    assert fig["dark_current_mean"].error == dark["mean_err"] > 0
    assert fig["bias_stability_std"].error == bias["std_err"] > 0
    assert fig["read_noise_per_pixel"].error == pytest.approx(
        rn["per_pixel_e"]["median_err"] / rn["median_std_factor"])
    assert fig["read_noise_conventional"].error == pytest.approx(
        rn["conventional_adu_err"] * rn["conventional_e"] / rn["conventional_adu"])
    # the per-pixel median is the truth's within 3 % (row noise and quantisation add ~1 %)
    true = float(np.median(truth.read_noise))
    assert abs(rn["median_e"] - true) < 0.03 * true
    assert all("+-" in fig[k].text() for k in ("bias_level", "bias_stability_std",
                                                "read_noise_conventional", "read_noise_per_pixel"))


def test_ladder_turnover_from_ptc_points():
    from sitiancal.compute.plan import _ladder_turnover
    from sitiancal.compute.ptc import find_turnoff

    def pts(means, variances):
        return [{"mean": m, "var": v} for m, v in zip(means, variances, strict=True)]

    assert _ladder_turnover(pts([1000.0, 4000.0, 8000.0], [500.0, 2000.0, 4000.0])) is None
    assert _ladder_turnover(pts([1000.0], [500.0])) is None
    assert _ladder_turnover(pts([1000.0, float("nan")], [500.0, 3.0])) is None
    # the faintest point is the noisiest: half-way to the next (clipped) one
    assert _ladder_turnover(pts([10000.0, 2000.0], [3.0, 1000.0])) == 6000.0
    # an interior maximum: the parabola of find_turnoff, in any order of the points
    means, variances = [1000.0, 4000.0, 7000.0, 9000.0], [500.0, 2000.0, 3400.0, 40.0]
    assert _ladder_turnover(pts(means[::-1], variances[::-1])) == find_turnoff(means, variances)


def test_hot_pixels_clipped_in_the_longest_darks_keep_their_rate(tmp_path):
    # The ZWO camera (0.254 e-/ADU) clips at the ADC's 65 535 ADU: a hot pixel
    # above ~27 e-/s fills it within the 600 s darks. Its clipped group, in the
    # fit, pulled its rate down by a third; left out per pixel, the rate is the
    # unclipped groups' slope.
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=36, hot_fraction=2e-2)
    dark = {a.name: a.data for a in outcome.products["dark"].arrays}
    rate_adu = np.asarray(dark["DARK_RATE_ADU"][...], dtype=np.float64)
    chi2 = np.asarray(dark["DARK_CHI2"][...], dtype=np.float64)
    truth_adu = truth.dark_rate / truth.gain  # ADU/s
    level = truth.bias + np.max(truth.config.dark_exptimes) * truth_adu
    clipped = level > 65535
    unclipped_hot = (truth.dark_rate > 1.0) & ~clipped
    assert clipped.sum() >= 5
    rel = rate_adu / truth_adu - 1.0
    assert np.max(np.abs(rel[clipped])) < 0.05
    assert np.median(chi2[clipped]) < 3.0  # a straight line through the groups used
    assert np.max(np.abs(rel[unclipped_hot])) < 0.05


def test_a_14_bit_adc_scaled_to_16_bits(tmp_path):
    # The same camera counted in steps of 4 ADU (a 14-bit ADC whose counts are
    # written x4, as many CMOS cameras do): the plan finds the step in the bias
    # frames, and the RTN test works in it (dithered by one ADU, the steps were
    # levels: 4 % of the pixels flagged RTN on a 600 x 800 set).
    import shutil

    from astropy.io import fits

    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=37)
    coarse = tmp_path / "coarse"
    shutil.copytree(raw, coarse)
    for path in coarse.glob("*.fits"):
        if path.name == "truth.fits":
            continue
        with fits.open(path, mode="update") as hdul:
            hdul[0].data = (hdul[0].data.astype(np.int64) // 4 * 4).astype(np.uint16)
    inventory = scan(coarse)
    store = str(tmp_path / "cube.zarr")
    build_cube(inventory, store)
    outcome = compute_products(open_cube(store), store, tmp_path / "work",
                               params=CalibrationParams())
    assert outcome.planned.plan.bias_quantum == 4
    assert any("steps of 4 ADU" in n for n in outcome.planned.notes)
    mask = next(a for a in outcome.products["mask"].arrays if a.name == "MASK").data
    rtn = (np.asarray(mask[...]) >> 5) & 1  # MaskBit.RTN
    assert rtn.sum() <= len(truth.rtn.y) + 0.002 * rtn.size


def test_an_offset_too_low_is_named_and_cut_off_series_are_not_rtn(tmp_path):
    # OFFSET set so low that the bias sits 3 ADU above the ADC floor (read
    # noise ~4 ADU): a quarter of the readings are 0 ADU. The plan says so, and
    # a series cut off at the floor is not tested for RTN (the test took the
    # cut for a second level: 766 of 90 000 Gaussian series flagged at 2 ADU).
    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=45, bias_level=3.0,
                               bias_pixel_sigma=1.0, n_bias=20)
    outcome = _products_of(tmp_path, raw)
    plan = outcome.planned
    assert plan.plan.bias_floor
    assert any("0 ADU, the ADC floor" in n and "offset is too low" in n for n in plan.notes)
    mask = next(a for a in outcome.products["mask"].arrays if a.name == "MASK").data
    rtn = ((np.asarray(mask[...]) >> 5) & 1).astype(bool)  # MaskBit.RTN
    bias, _ = read_stack(raw, truth, "bias")
    floor = bias.min(axis=0) == 0
    assert floor.mean() > 0.5
    assert not (rtn & floor).any()
    assert rtn.sum() <= len(truth.rtn.y)


def test_bias_frames_well_above_the_floor_say_nothing_about_the_offset(tmp_path):
    outcome, _ = _outcome(tmp_path, shape=(48, 64), seed=46)
    assert not outcome.planned.plan.bias_floor
    assert not any("ADC floor" in n for n in outcome.planned.notes)


def test_read_noise_median_from_five_bias_frames(tmp_path):
    """With 5 bias frames the map's median is ~9 % below the pixels' read noise; the figure is not."""
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=35, n_bias=5, flat_levels=8,
                              flat_frames=16)
    stats = outcome.products["read_noise"].stats
    expected = np.median(np.sqrt(truth.read_noise**2 + (truth.gain * truth.config.row_noise_sigma) ** 2
                                 + truth.gain**2 / 12.0))
    # 5120 pixels, each std from 4 degrees of freedom (35 % scatter): the
    # median is known to ~0.7 %, the correction to 0.6 % (compute.readnoise).
    assert stats["median_e"] == pytest.approx(expected, rel=0.025)
    assert stats["median_e_map"] < 0.95 * expected  # the plain median of the map
    assert stats["median_std_factor"] == pytest.approx(0.916, abs=0.001)


def test_gain_from_eight_frames_per_level(tmp_path):
    """8 frames per level: the map's median is ~1 % high (1/a is skewed); the camera's gain is not."""
    from sitiancal.service.report import build_report

    outcome, truth = _outcome(tmp_path, shape=(96, 128), seed=36, n_bias=10, flat_levels=14,
                              flat_frames=8)
    stats = outcome.products["gain"].stats
    true = float(np.median(truth.gain))
    assert stats["bimodal"] is False
    # 12k pixels of ~21 % each: the centre is known to ~0.2 % (its error), and
    # the correction leaves ~0.2 % (tests/test_assembly.py)
    assert stats["population_gain"] == pytest.approx(true, rel=0.006)
    assert 0.001 * true < stats["population_gain_err"] < 0.004 * true
    # the gain that converts the other maps to e-, and the QC figure, are this one
    assert outcome.products["read_noise"].stats["median_e"] == pytest.approx(
        stats["population_gain"] * outcome.products["read_noise"].stats["median_adu"], rel=1e-6)
    report = build_report("X", {k: p.stats for k, p in outcome.products.items()})
    figure = next(f for f in report.figures if f.key == "gain_per_pixel")
    assert figure.value == stats["population_gain"] and figure.error == stats["population_gain_err"]


def test_a_warm_sensor_flags_neither_its_glow_nor_its_population_tail(tmp_path):
    """At 20 C (dark current 10x the 0 C one) the rates are measured well.

    Their log-normal spread (log-sigma 0.3) then shows: 5 robust sigma of a
    MAD put the WARM threshold at 2.5x the median, where 1e-3 of the pixels
    lie (133 false WARM on a 300 x 400 set), and a linear extrapolation from
    the upper side at 3.2x, where 1e-4 lie (9 there); the limit is the main
    population's 5 sigma in ln(rate), ~5x the median. The glow (0.2 e-/s at
    its corner) is above the hot floor (201 false HOT there). Every warm and
    hot pixel of the truth that stands out of the main population (6x its
    median: its 5 sigma with the rates' errors) is flagged (as HOT or WARM:
    at 20 C the warm population's 0.2 e-/s is above the 0.1 e-/s hot floor).
    """
    from sitiancal.compute.defects import MaskBit

    outcome, truth = _outcome(tmp_path, shape=(300, 400), seed=37, temperature=20.0,
                              dark_exptimes=[0.0, 60.0, 300.0, 600.0], dark_frames=6,
                              warm_fraction=1e-3, hot_fraction=5e-4, n_bias=20,
                              flat_levels=8, flat_frames=8)
    mask = next(a for a in outcome.products["mask"].arrays if a.name == "MASK").data
    elevated = (mask & (MaskBit.HOT | MaskBit.WARM)) != 0
    true = truth.has("HOT") | truth.has("WARM")
    assert true.sum() >= 150
    # the warm population (log-normal 0.4 about 0.2 e-/s) reaches down into
    # the main one's tail: ~15 % of it lies below 6x the main median
    normal = truth.defects == 0
    main = np.median(truth.dark_rate[normal])
    assert elevated[true & (truth.dark_rate > 6 * main)].all()
    assert elevated[true].mean() >= 0.9
    assert elevated[truth.has("HOT")].all()
    # 120 000 pixels: the log-normal tail beyond 5 sigma in ln(rate) holds
    # 0.04 (the linear rule's 5 here)
    assert (elevated & normal).sum() <= 2, np.argwhere(elevated & normal)


def test_warm_pixels_beside_a_strong_amplifier_glow(tmp_path):
    # A 0.5 e-/s glow at one corner (250x the dark current): its rates had
    # widened the population's measured width over the whole map (upper side
    # 5x the MAD width), and the HOT/WARM thresholds with it: 16 of 360 warm
    # pixels found. The width is now that of the rates over the local level,
    # as the rules test the pixels.
    outcome, truth = _outcome(tmp_path, shape=(300, 400), seed=47, glow_rate=0.5)
    mask = np.asarray(next(a for a in outcome.products["mask"].arrays if a.name == "MASK").data[...])
    warm = (truth.defects & 2) != 0  # MaskBit.WARM in the truth
    flagged = (mask & 3) != 0  # HOT or WARM
    assert warm.sum() > 300
    assert (flagged & warm).sum() > 0.6 * warm.sum()
    assert (flagged & (truth.defects == 0)).sum() <= 3
    assert outcome.products["dark"].stats["warm_rule"].startswith("threshold only")


def _edited_copy(tmp: Path, src: Path, edit) -> Path:
    """Copy a simulated set's frames, each through ``edit(name, header, data) -> data``."""
    from astropy.io import fits

    dst = tmp / "edited"
    dst.mkdir()
    for path in sorted(src.glob("*.fits")):
        if path.name == "truth.fits":
            continue
        with fits.open(path) as hdul:
            header, data = hdul[0].header.copy(), hdul[0].data
        data = edit(path.name, header, data)
        fits.PrimaryHDU(data, header=header).writeto(dst / path.name)
    return dst



def test_an_illumination_ladder_at_one_exposure_time(tmp_path):
    """Flats that change illumination, not exposure time (EMVA 1288 allows both).

    Grouped by exposure time they were one level (no PTC, no gain, and a
    flat from a mixture of levels); grouped by signal they give the PTC, the
    per-pixel gain and the flat, and the linearity (measured against
    exposure time) says why it is missing.
    """
    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=38, flat_levels=8, flat_frames=12)

    def one_time(name, header, data):
        if header.get("IMAGETYP", "").lower().startswith("flat"):
            header["EXPTIME"] = 1.0
        return data

    outcome = _products_of(tmp_path, _edited_copy(tmp_path, raw, one_time))
    plan = outcome.planned.plan
    assert len(plan.flats) == 8 and {g.n for g in plan.flats} == {12}
    assert any("several illumination levels" in n for n in outcome.planned.notes)
    assert "one illumination" in outcome.missing["linearity"]
    true = float(np.median(truth.gain))
    assert outcome.products["ptc"].stats["gain"] == pytest.approx(true, rel=0.02)
    assert outcome.products["gain"].stats["population_gain"] == pytest.approx(true, rel=0.01)
    assert "flat" in outcome.products


def test_a_failed_flat_exposure_is_left_out_and_named(tmp_path):
    """A flat at half the signal of its level (shutter or lamp fault) is left out, with a note."""
    raw, _ = small_dataset(tmp_path, shape=(64, 80), seed=39, flat_levels=8, flat_frames=12)
    victim: dict[str, str] = {}

    def halve_one(name, header, data):
        if (header.get("IMAGETYP", "").lower().startswith("flat") and not victim
                and 2000 < np.median(data) - 500 < 20000):
            victim["name"] = name
            return np.rint((data - 500.0) * 0.5 + 500.0).astype(np.uint16)
        return data

    outcome = _products_of(tmp_path, _edited_copy(tmp_path, raw, halve_one))
    assert victim
    note = next(n for n in outcome.planned.notes if "left out" in n)
    assert victim["name"] in note and "shutter or lamp fault" in note
    plan = outcome.planned.plan
    assert len(plan.flats) == 8 and sorted(g.n for g in plan.flats) == [11] + [12] * 7
    assert "linearity" in outcome.products  # one odd frame is not an illumination ladder


def test_split_by_signal_rules():
    from sitiancal.compute.plan import FrameGroup, FrameTable, split_by_signal

    def table(means):
        n = len(means)
        z = np.zeros(n)
        return FrameTable(frame_type=np.array(["flat"] * n), exptime=np.ones(n),
                          time_s=np.arange(n, dtype=float), frame_mean=np.asarray(means, float),
                          frame_clipped_mean=z, center_mean=z, temperature=z)

    def split(means):
        t = table(means)
        return split_by_signal(t, [FrameGroup("flat", 1.0, tuple(range(len(means))))], 500.0)

    rng = np.random.default_rng(0)
    flicker = 500 + 20000 * (1 + 0.003 * rng.normal(size=40))  # 0.3 % lamp flicker: one level
    levels, odd = split(flicker)
    assert len(levels) == 1 and levels[0].n == 40 and odd == []
    drift = 500 + 20000 * np.linspace(1.0, 1.2, 40)  # a lamp warming up by 20 %: no gap
    assert len(split(drift)[0]) == 1
    near_zero = [500.5, 501.9, 503.0, 500.2]  # flats in the read-noise regime: 2 ADU floor
    assert len(split(near_zero)[0]) == 1
    ladder = [1500, 2500, 1502, 2497, 4500, 4510, 1498, 2503, 4490]  # three illuminations
    levels, odd = split(ladder)
    assert [lv.indices for lv in levels] == [(0, 2, 6), (1, 3, 7), (4, 5, 8)] and odd == []
    levels, odd = split([20500, 20480, 10500, 20510])  # one failed exposure
    assert [lv.indices for lv in levels] == [(0, 1, 3)] and odd == [2]
    levels, odd = split([20500, 10500])  # a pair: nothing to tell which is wrong
    assert len(levels) == 2 and odd == []


def test_cosmic_rays_in_the_darks_do_not_become_dark_current(tmp_path):
    # Long darks collect cosmic rays: one frame of a group gains 1000-20000
    # ADU in a pixel. The hit group had entered the pixel's fit (rates of
    # 0.06-0.9 e-/s for a truth of 0.002, unflagged: the hit inflates the
    # error too); it is now left out of that pixel's fit.
    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=50)
    rng = np.random.default_rng(51)
    hits: list[tuple[int, int]] = []

    def edit(name, header, data):
        if str(header["IMAGETYP"]).lower().startswith("dark") and header["EXPTIME"] >= 120:
            data = data.astype(np.int64)
            for _ in range(6):
                y, x = int(rng.integers(0, data.shape[0])), int(rng.integers(0, data.shape[1]))
                data[y, x] += int(rng.uniform(1000, 20000))
                hits.append((y, x))
            data = np.clip(data, 0, 65535).astype(np.uint16)
        return data

    outcome = _products_of(tmp_path, _edited_copy(tmp_path, raw, edit))
    dark = {a.name: np.asarray(a.data[...]) for a in outcome.products["dark"].arrays}
    ys, xs = np.array(hits).T
    clean = truth.defects[ys, xs] == 0
    assert clean.sum() >= 20
    err = np.abs(dark["DARK_RATE"] - truth.dark_rate)[ys, xs][clean]
    assert np.max(err) < 0.02  # e-/s; the pixels' own errors are ~0.003
    mask = next(a for a in outcome.products["mask"].arrays if a.name == "MASK").data
    assert not np.any(np.asarray(mask[...])[ys, xs][clean] & 3)  # not HOT or WARM


def test_hit_groups_left_out_of_a_pixels_dark_fit():
    from sitiancal.compute.tile import _hit_groups_left_out

    times, counts, g = [0.0, 60.0, 300.0, 600.0], [20, 5, 5, 5], 0.25
    means = np.array([[500.0, 500.0, 500.0]] * 4)
    means[1:, 2] += np.array([60.0, 300.0, 600.0]) * 10.0  # a hot pixel: 10 ADU/s
    variances = np.full((4, 3), 16.0)
    variances[1:, 2] += (means[1:, 2] - 500.0) / g  # its shot noise, allowed
    variances[3, 1] = 2000.0**2 / 5  # a hit in one 600 s frame
    before = means.copy(), variances.copy()
    with _hit_groups_left_out(means, variances, times, counts, g):
        assert np.isnan(means[3, 1]) and np.isnan(variances[3, 1])
        assert np.isfinite(means).sum() == means.size - 1
    np.testing.assert_array_equal(means, before[0])
    np.testing.assert_array_equal(variances, before[1])
    with _hit_groups_left_out(means, variances, times, counts, float("nan")):
        assert np.isfinite(means).all()  # no gain: nothing tested


def _groups_left_reference(means, variances, times, counts, gain, limit):
    """The dark fit's left-out groups (saturated, then hit), pixel by pixel, as the
    docstrings of ``_saturated_left_out`` and ``_hit_groups_left_out`` state them."""
    from scipy.stats import f as f_dist

    from sitiancal.compute.tile import HIT_GROUP_ALPHA

    m, v = means.copy(), variances.copy()
    t = np.asarray(times)
    k_ref = int(np.argmin(t))

    def leave_out(drop, pixel, arrays):
        gone = drop | np.isnan(arrays[0][(slice(None), *pixel)])
        if len({ti for ti, g in zip(t, gone, strict=True) if not g}) >= 2:
            for a in arrays:
                a[(slice(None), *pixel)][drop] = np.nan

    for pixel in np.ndindex(means.shape[1:]):
        col = m[(slice(None), *pixel)]
        leave_out(col - col[k_ref] > limit, pixel, [m])
    if np.isfinite(gain) and gain > 0 and counts[k_ref] >= 2:
        for pixel in np.ndindex(means.shape[1:]):
            mc, vc = m[(slice(None), *pixel)], v[(slice(None), *pixel)]
            read = max(vc[k_ref], 1.0 / 12.0)
            hit = np.zeros(len(t), dtype=bool)
            for k in range(len(t)):
                if k != k_ref and counts[k] >= 2:
                    q = f_dist.isf(HIT_GROUP_ALPHA, counts[k] - 1, counts[k_ref] - 1)
                    hit[k] = vc[k] > q * (read + max(mc[k] - mc[k_ref], 0.0) / gain)
            leave_out(hit, pixel, [m, v])
    return m, v


@pytest.mark.parametrize("seed", range(6))
def test_dark_groups_left_out_match_the_per_pixel_rules(seed):
    # the vectorised context managers of the tile pass against the rules applied
    # pixel by pixel: the same groups set to NaN (hot pixels saturating, hits,
    # groups already NaN, two groups at one exposure time), restored afterwards
    from sitiancal.compute.tile import _hit_groups_left_out, _saturated_left_out

    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 7))
    times = list(np.sort(rng.choice([0.0, 0.0, 30.0, 60.0, 60.0, 120.0, 300.0], k)))
    counts = [int(c) for c in rng.integers(1, 12, k)]
    shape = (k, 9, 11)
    means = 1000 + rng.normal(0, 30, shape) * rng.choice([1, 100], shape, p=[0.8, 0.2])
    variances = np.abs(rng.normal(10, 5, shape)) * rng.choice([1, 1e4], shape, p=[0.9, 0.1])
    means[rng.random(shape) < 0.05] = np.nan
    gain, limit = [(0.25, 300.0), (1.0, 50.0), (float("nan"), 300.0)][seed % 3]
    want = _groups_left_reference(means, variances, times, counts, gain, limit)
    before = means.copy(), variances.copy()
    with _saturated_left_out(means, times, limit), \
            _hit_groups_left_out(means, variances, times, counts, gain):
        np.testing.assert_array_equal(means, want[0])
        np.testing.assert_array_equal(variances, want[1])
        assert np.isnan(means).sum() > np.isnan(before[0]).sum()
    np.testing.assert_array_equal(means, before[0])
    np.testing.assert_array_equal(variances, before[1])


def test_dark_rate_error_carries_the_darks_own_level_scatter(tmp_path):
    # 0.4 C rms of temperature jitter scales each dark's whole signal by
    # ~4.6 % (doubling 6 C): a 600 s dark's level scatters ~3x more than a
    # bias frame's here (5120 pixels), which no number of pixels averages
    # away. The error of the map's median rate must carry it (the bias
    # frames' scatter alone gave an error ~2.5x too small). Each group's
    # scatter is measured from its 8 frames (7 degrees of freedom: +-27 %).
    from sitiancal.compute.dark import common_mode_rate_err

    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=37, temperature_jitter=0.4,
                              dark_frames=8)
    c = truth.config
    stats = outcome.products["dark"].stats["summary"]
    plan = outcome.planned.plan
    g = float(np.median(truth.gain))
    core = truth.defects == 0
    bias_std = outcome.planned.bias_stability.std
    times = np.array([0.0] + [grp.exptime for grp in plan.darks])
    counts = np.array([plan.bias.n] + [grp.n for grp in plan.darks])
    # each group's scatter: the bias frames' (drift, row noise, read noise over
    # the frame), the dark signal's shot noise over the frame, and the spread
    # of the group's own dark signal from its frames' temperatures
    frames = truth.frames[truth.frames["type"] == "dark"]
    mean_rate = truth.dark_rate[core].mean()  # e-/s
    stds = [bias_std]
    for t in times[1:]:
        temps = np.asarray(frames["temperature"][np.isclose(frames["exptime"], t)])
        level = mean_rate * t * c.dark_factor(temps) / g  # ADU
        shot = np.sqrt(mean_rate * t / core.sum()) / g
        stds.append(float(np.sqrt(bias_std**2 + shot**2 + np.var(level, ddof=1))))
    expected = g * common_mode_rate_err(times, counts, np.array(stds))
    assert expected / 1.6 < stats["median_err_common"] < 1.6 * expected
    assert stats["median_err_common"] > 2 * g * common_mode_rate_err(times, counts, bias_std)
    assert len(outcome.planned.dark_level_std) == len(plan.darks)


def _flat_slope(outcome, truth) -> float:
    """Slope of the master flat against the truth's relative response (1: offset removed)."""
    flat = next(np.asarray(a.data) for a in outcome.products["flat"].arrays if a.name == "FLAT")
    ideal = truth.response * truth.vignetting / truth.gain  # ADU per unit light
    ideal = ideal / np.median(ideal)
    ok = (truth.defects == 0) & np.isfinite(flat)
    return float(np.polyfit(ideal[ok] - 1.0, flat[ok] - 1.0, 1)[0])


def test_flats_with_darks_of_one_other_time_and_no_bias(tmp_path):
    # No bias, darks of one exposure time that no flat level shares: no dark
    # fit (one time), so no per-pixel offset from it; the darks' mean is the
    # offset, as the plan stage takes it (the tile pass had used none).
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=39, n_bias=0,
                              dark_exptimes=[30.0], dark_frames=6)
    assert outcome.planned.plan.bias is None and not outcome.planned.plan.has_dark_fit
    assert _flat_slope(outcome, truth) == pytest.approx(1.0, abs=0.006)  # 0.981 before
    assert any("30 s darks' mean as offset" in n for n in outcome.planned.notes)
    # the PTC points are above that offset too: the lowest level's mean is its signal
    low = min(p["mean"] for p in outcome.planned.ptc_points)
    signal = min(p["signal"] for p in outcome.planned.linearity_points)
    assert low == pytest.approx(signal, rel=0.05)


def test_flats_alone_take_their_offset_from_the_ladder(tmp_path):
    # No bias and no darks: the flats had been used with their ~500 ADU offset
    # in them, so the master flat (signal + offset over its median) flattened
    # every pixel's response by offset / (signal + offset), ~2 % here, and the
    # PRNU with it. The ladder's signal at 0 s is the offset.
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=38, n_bias=0, dark_exptimes=[])
    plan = outcome.planned.plan
    assert plan.bias is None and not plan.darks
    truth_offset = float(np.mean(truth.bias))
    assert plan.flat_offset == pytest.approx(truth_offset, abs=3.0)
    assert any("flat ladder's signal at 0 s" in n for n in outcome.planned.notes)
    assert not any("dark-fit intercept" in n for n in outcome.planned.notes)
    assert _flat_slope(outcome, truth) == pytest.approx(1.0, abs=0.006)  # 0.975 before
    # the conventional points and the linearity are above the offset too
    signals = [p["signal"] for p in outcome.planned.linearity_points]
    assert min(signals) < 0.1 * 65535 and outcome.products["linearity"].stats


def test_ladder_offset_is_the_intercept_of_a_linear_ladder():
    from sitiancal.compute.plan import ladder_offset

    t = np.array([0.5, 1.0, 2.0, 4.0, 6.0, 9.0, 12.0])
    level = 480.0 + 3000.0 * t
    level[-2:] = [40000.0, 65535.0]  # near and at saturation: above half the range
    assert ladder_offset(t, level) == pytest.approx(480.0)
    assert ladder_offset([2.0, 2.0, 2.0], [6000.0, 9000.0, 12000.0]) is None  # one time
    twilight = 480.0 + 3000.0 * t[:5] * np.exp(-t[:5] / 3.0)  # the sky darkens
    assert ladder_offset(t[:5], twilight) is None
    assert ladder_offset([1.0, 2.0], [9000.0, 5000.0]) is None  # falling: not a ladder


def test_a_bias_frame_whose_level_jumped_is_left_out(tmp_path):
    # One bias frame 30 ADU above the others (a light leak, an offset that
    # changed): in every pixel's temporal std it doubled the per-pixel read
    # noise (2.0 e- for 1.03) and pulled the dark rate's zero point.
    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=52)
    jumped = "bias_0007.fits"

    def edit(name, header, data):
        return (data.astype(np.int64) + 30).astype(np.uint16) if name == jumped else data

    outcome = _products_of(tmp_path, _edited_copy(tmp_path, raw, edit))
    plan = outcome.planned.plan
    assert plan.bias.n == truth.config.n_bias - 1
    note = next(n for n in outcome.planned.notes if jumped in n)
    assert "left out" in note
    assert float(note.split(" ADU from the other")[0].rsplit(" ", 1)[1]) == pytest.approx(30, abs=0.2)
    rn = outcome.products["read_noise"].stats["median_e"]
    expected = np.median(np.sqrt(truth.read_noise**2 + (truth.gain * truth.config.row_noise_sigma)
                                 ** 2 + truth.gain**2 / 12.0))
    assert rn == pytest.approx(expected, rel=0.03)
    assert outcome.planned.bias_stability.peak_to_peak < 1.0


def test_a_dark_frame_with_a_light_leak_is_left_out(tmp_path):
    # One 600 s dark with 40 ADU of stray light over it: the group's mean and
    # every pixel's variance had taken it.
    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=54, dark_frames=6)
    names = sorted(p.name for p in raw.glob("dark*.fits"))
    leaky = None

    def edit(name, header, data):
        nonlocal leaky
        if leaky is None and name.startswith("dark") and header["EXPTIME"] == 600.0:
            leaky = name
            return (data.astype(np.int64) + 40).astype(np.uint16)
        return data

    outcome = _products_of(tmp_path, _edited_copy(tmp_path, raw, edit))
    assert leaky in names
    group = next(g for g in outcome.planned.plan.darks if g.exptime == 600.0)
    assert group.n == truth.config.dark_frames - 1
    assert any(leaky in n and "600 s dark frame" in n for n in outcome.planned.notes)
    stats = outcome.products["dark"].stats["summary"]
    truth_median = float(np.median(truth.dark_rate))
    assert abs(stats["median"] - truth_median) < 0.15 * truth_median


def test_level_outliers_leave_a_trend_and_its_noise_alone():
    from sitiancal.compute.plan import level_outliers

    rng = np.random.default_rng(53)
    t = np.arange(30) * 3.0
    level = 500.0 + 0.002 * t + rng.normal(0.0, 0.03, t.size)  # drift and scatter
    assert level_outliers(t, level).size == 0
    jumped = level.copy()
    jumped[[4, 17]] += [2.0, -1.5]
    assert level_outliers(t, jumped).tolist() == [4, 17]
    assert level_outliers(np.full(t.size, np.nan), jumped).tolist() == [4, 17]  # frame order
    assert level_outliers(t[:4], jumped[:4]).size == 0  # too few frames to tell
    half = level.copy()
    half[::2] += 5.0  # two alternating levels: not a series with a few jumps
    assert level_outliers(t, half).size == 0
    # five darks whose MAD is tiny by chance: a 0.06 ADU step is beyond 10 of
    # its sigmas but below the least jump that matters (the floor)
    five = np.array([502.400, 502.401, 502.460, 502.399, 502.402])
    assert level_outliers(np.arange(5.0), five).tolist() == [2]
    assert level_outliers(np.arange(5.0), five, floor=1.0).size == 0
    assert level_outliers(np.arange(5.0), five + np.array([0, 0, 40.0, 0, 0]), floor=1.0).tolist() == [2]


def test_the_flat_reference_level_has_several_frames_where_one_does(tmp_path):
    # The level nearest half of saturation holds one frame (the others were
    # lost): its temporal noise cannot be measured and its mean is one frame's,
    # so the master flat comes from the nearest level of several frames.
    import shutil

    raw, truth = small_dataset(tmp_path, shape=(48, 64), seed=55)
    outcome = _products_of(tmp_path / "full", raw)
    ref = outcome.planned.plan.flat_ref
    ref_time = outcome.planned.plan.flats[ref].exptime
    dst = tmp_path / "thin"
    dst.mkdir()
    kept_one = False
    for path in sorted(raw.glob("*.fits")):
        if path.name == "truth.fits":
            continue
        rows = truth.frames[truth.frames["file"] == path.name]
        if rows["type"][0] == "flat" and abs(rows["exptime"][0] - ref_time) < 1e-6:
            if kept_one:
                continue
            kept_one = True
        shutil.copy(path, dst / path.name)
    (tmp_path / "thin-work").mkdir()
    thin = _products_of(tmp_path / "thin-work", dst)
    plan = thin.planned.plan
    assert plan.flats[plan.flat_ref].exptime != ref_time and plan.flats[plan.flat_ref].n >= 2
    assert thin.products["flat"].stats["temporal_noise"] == "measured"
    assert outcome.products["flat"].stats["prnu_upper_bound"] is False


def test_a_flat_of_one_frame_per_level_gives_an_upper_bound_prnu(tmp_path):
    from sitiancal.service.report import build_report

    outcome, truth = _outcome(tmp_path, shape=(48, 64), seed=56, flat_frames=1)
    stats = outcome.products["flat"].stats
    assert stats["n_frames"] == len(stats["levels"]) > 1  # one-frame levels, stacked
    assert stats["temporal_noise"] == "not removed"
    assert stats["prnu_upper_bound"] is True
    adu = truth.response / truth.gain
    true_prnu = 100 * np.std(adu[truth.defects == 0]) / np.mean(adu[truth.defects == 0])
    assert stats["prnu_highpass_pct"] > true_prnu  # the frame's shot noise is in it
    report = build_report("X", {k: p.stats for k, p in outcome.products.items()})
    labels = {f.key: f.label for f in report.figures}
    assert labels["prnu"] == "PRNU (upper bound)"
    assert labels["prnu_highpass"] == "PRNU (vignetting removed, upper bound)"


def test_the_master_flat_stacks_every_level_of_the_linear_range(tmp_path):
    # The master flat had been one level's mean (12 frames at ~27 000 ADU);
    # each level below 70 % of saturation now adds its frames, each as much as
    # the electrons it collected, so its noise is that of all of them stacked.
    outcome, truth = _outcome(tmp_path, shape=(64, 80), seed=57)
    plan = outcome.planned.plan
    used = [i for i, w in enumerate(plan.flat_weights) if w > 0]
    assert len(used) >= 4 and plan.flat_ref in used
    signals = np.array([outcome.planned.linearity_points[i]["signal"] for i in used])
    assert signals.max() <= 0.7 * plan.saturation
    flat = next(np.asarray(a.data) for a in outcome.products["flat"].arrays if a.name == "FLAT")
    ideal = truth.response * truth.vignetting / truth.gain
    ok = (truth.defects == 0) & np.isfinite(flat)
    ratio = (flat / ideal)[ok]
    resid = float(np.std(ratio / np.median(ratio)))
    ref = plan.flat_ref
    s_ref = outcome.planned.linearity_points[ref]["signal"]
    g, rn = float(np.median(truth.gain)), float(np.median(truth.read_noise))
    one_level = np.sqrt((s_ref / g + (rn / g) ** 2) / plan.flats[ref].n) / s_ref
    assert resid < 0.7 * one_level  # 0.55 here; one level alone is 1
    stats = outcome.products["flat"].stats
    assert stats["levels"] == used and stats["n_frames"] == sum(plan.flats[i].n for i in used)
    adu = truth.response / truth.gain
    true_prnu = 100 * np.std(adu[truth.defects == 0]) / np.mean(adu[truth.defects == 0])
    assert stats["prnu_highpass_pct"] == pytest.approx(true_prnu, rel=0.1)



def test_cosmic_rays_in_the_flats_do_not_make_gain_outliers(tmp_path, monkeypatch):
    # A cosmic ray in one flat frame adds its charge (300-5000 e- here) to one
    # pixel at one level: that level's variance, many times the shot noise's at
    # the faint levels, had pulled the pixel's gain off its population
    # (GAIN_OUTLIER). The level is now left out of that pixel's fit where it
    # stands out from the pixel's other levels (12 frames a level here: a hit
    # of a few times a bright level's variance cannot be told from chance).
    # (One hit per pixel: two hit levels of one pixel, ~1e-9 of them at real
    # rates, leave one level in.)
    import sitiancal.compute.tile as tile_module

    raw, truth = small_dataset(tmp_path, shape=(64, 80), seed=52)
    rng = np.random.default_rng(53)
    hits: list[tuple[int, int]] = []
    pixels = iter(rng.permutation(truth.gain.size))

    def edit(name, header, data):
        if str(header["IMAGETYP"]).lower().startswith("flat") and rng.random() < 0.5:
            data = data.astype(np.int64)
            y, x = np.unravel_index(next(pixels), data.shape)
            data[y, x] += int(rng.uniform(300, 5000) / truth.gain[y, x])
            hits.append((y, x))
            data = np.clip(data, 0, 65535).astype(np.uint16)
        return data

    edited = _edited_copy(tmp_path, raw, edit)
    ys, xs = np.array(hits).T
    clean = truth.defects[ys, xs] == 0
    assert clean.sum() >= 30

    def damage(outcome) -> tuple[int, int]:
        """Clean hit pixels with a gain > 5 sigma off, and flagged GAIN_OUTLIER."""
        gain = {a.name: np.asarray(a.data[...]) for a in outcome.products["gain"].arrays}
        pull = ((gain["GAIN"] - truth.gain) / gain["GAIN_ERR"])[ys, xs][clean]
        mask = np.asarray(next(a for a in outcome.products["mask"].arrays
                               if a.name == "MASK").data[...])
        return (int(np.count_nonzero(~(np.abs(pull) < 5))),
                int(np.count_nonzero(mask[ys, xs][clean] & 128)))

    outcome = _products_of(tmp_path, edited)
    off, flagged = damage(outcome)
    # two hits at the brightest level used (6 and 12 times its variance) stay: the
    # other levels' noise at 12 frames leaves them within 1e-6 of chance
    assert off <= 2 and flagged <= 2
    stats = outcome.products["gain"].stats
    assert clean.sum() // 2 <= stats["levels_left_out"] <= len(hits) + 2
    # the same set without the level test: the damage the test repairs
    monkeypatch.setattr(tile_module, "LEVEL_OUTLIER_ALPHA", None)
    (tmp_path / "plain").mkdir()
    plain = _products_of(tmp_path / "plain", edited)
    assert "levels_left_out" not in plain.products["gain"].stats
    off, flagged = damage(plain)
    assert off >= 20 and flagged >= 20  # 40 and 36 of the 56
