"""The simulator against its own truth: every statistical tolerance below is a
multiple (4-5) of the standard error expected for the test's frame and pixel
counts, computed from the truth maps, not tuned to the random draw."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner
from pydantic import ValidationError
from scipy import stats
from simdata import SMALL_DEFAULTS, read_stack, small_dataset

from sitiancal.compute.simulate import (
    ADC_MAX,
    DEFECT_BITS,
    MAP_NAMES,
    SensorTruth,
    SimulationConfig,
    plan_frames,
    simulate_dataset,
)

QUANT = 1.0 / 12.0  # ADU^2, variance of rounding to integer ADU


def _read_var(truth: SensorTruth) -> np.ndarray:
    """Per-pixel temporal variance without signal: read noise and quantisation, ADU^2."""
    return (truth.read_noise / truth.gain).astype(np.float64) ** 2 + QUANT


def _nl_slope(c: SimulationConfig, x: np.ndarray) -> np.ndarray:
    """d nonlin / dx of the documented nonlinearity at linear signal x (ADU)."""
    p = c.nonlinearity_power
    return 1.0 - c.nonlinearity_coeff * (p + 1) * (np.abs(x) / ADC_MAX) ** p


def _linear_signal(truth: SensorTruth, rows) -> np.ndarray:
    """Expected linear signal (ADU above bias) of each frame in ``rows``: (F, ny, nx)."""
    c = truth.config
    illum = (truth.response * truth.vignetting).astype(np.float64)
    out = []
    for row in rows:
        t = float(row["exptime"])
        e = truth.dark_rate * c.dark_factor(float(row["temperature"])) * t
        if row["type"] == "flat":
            e = e + illum * c.lamp_flux * t * float(row["lamp_scale"])
        out.append(e / truth.gain)
    return np.array(out, dtype=np.float64)


# ------------------------------------------------------------------------- gain
@pytest.fixture(scope="module")
def bimodal(tmp_path_factory):
    # one Poisson-drawn level (~500 e-) and one normal-approximation level (~7000 e-)
    return small_dataset(tmp_path_factory.mktemp("bimodal"), shape=(64, 80), gain2_fraction=0.5,
                         n_bias=0, dark_exptimes=[], flat_exptimes=[0.25, 3.5], flat_frames=40)


@pytest.mark.parametrize("level", [0, 1])
def test_flat_variance_gives_each_gain_population(bimodal, level):
    out, truth = bimodal
    c = truth.config
    stack, rows = read_stack(out, truth, "flat", level)
    n = len(rows)
    y = (stack - truth.bias - rows["drift"][:, None, None]) / rows["lamp_scale"][:, None, None]
    m, v = y.mean(0), y.var(0, ddof=1)
    # undo the documented nonlinearity to first order (0.2% in variance at the top level)
    lin = m / (1 - c.nonlinearity_coeff * (m / ADC_MAX) ** c.nonlinearity_power)
    v_lin = (v - c.row_noise_sigma**2 - QUANT) / _nl_slope(c, lin) ** 2
    shot = v_lin - (truth.read_noise / truth.gain) ** 2  # expected: lin / g (ADU^2)
    good = truth.defects == 0
    second = np.abs(truth.gain - c.gain2_mean) < np.abs(truth.gain - c.gain_mean)
    for pop, other in ((good & ~second, c.gain2_mean), (good & second, c.gain_mean)):
        assert pop.sum() > 2000
        g_hat = lin[pop].sum() / shot[pop].sum()
        g_true = lin[pop].sum() / (lin[pop] / truth.gain[pop]).sum()
        rel_err = np.sqrt((2 * v_lin[pop] ** 2 / (n - 1)).sum()) / shot[pop].sum()
        assert rel_err < 0.006  # the test resolves the 7% gap between populations
        assert abs(g_hat / g_true - 1) < 4 * rel_err, (g_hat, g_true, rel_err)
        assert abs(g_hat / other - 1) > 8 * rel_err


def test_lamp_flicker_inflates_uncorrected_variance(bimodal):
    out, truth = bimodal
    stack, rows = read_stack(out, truth, "flat", 1)
    lamp = np.asarray(rows["lamp_scale"], dtype=np.float64)
    x = stack - truth.bias - rows["drift"][:, None, None]
    corrected = x / lamp[:, None, None]
    good = truth.defects == 0
    m, v = corrected.mean(0)[good], corrected.var(0, ddof=1)[good]
    excess = (x.var(0, ddof=1)[good] - v).sum()
    var_l = lamp.var(ddof=1)
    assert var_l > (0.5 * truth.config.lamp_flicker_rms) ** 2
    expected = (m**2).sum() * var_l + v.sum() * (1 - np.mean(lamp**-2))
    sd = np.sqrt((4 * m**2 * var_l * v / (len(lamp) - 1)).sum())  # noise-lamp covariance
    assert abs(excess - expected) < 5 * sd, (excess, expected, sd)
    assert expected > 20 * sd


# ------------------------------------------------------------------------- dark
@pytest.fixture(scope="module")
def default_small(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("small"))


def test_dark_signal_grows_at_truth_rate(default_small):
    out, truth = default_small
    c = truth.config
    stack, rows = read_stack(out, truth, "dark")
    good = truth.defects == 0
    measured = (stack - truth.bias)[:, good].mean(1) - rows["drift"]
    lin = _linear_signal(truth, rows)[:, good]
    expected = lin.mean(1)
    var_pix = (_read_var(truth)[good] + lin / truth.gain[good]).mean(1)
    sd = np.sqrt(var_pix / good.sum() + c.row_noise_sigma**2 / c.shape[0])
    chi2 = (((measured - expected) / sd) ** 2).sum()
    assert stats.chi2.ppf(1e-4, len(rows)) < chi2 < stats.chi2.ppf(1 - 1e-4, len(rows))
    # weighted fit measured = a + b * (t * temperature factor); b in ADU/s at the set point
    tt = np.asarray(rows["exptime"]) * c.dark_factor(np.asarray(rows["temperature"]))
    design = np.column_stack([np.ones_like(tt), tt]) / sd[:, None]
    (_, b), *_ = np.linalg.lstsq(design, measured / sd, rcond=None)
    b_err = np.sqrt(np.linalg.inv(design.T @ design)[1, 1])
    b_true = (truth.dark_rate / truth.gain)[good].mean()
    assert abs(b - b_true) < 4 * b_err, (b, b_true, b_err)
    assert b_true > 20 * b_err
    # temporal variance of each exposure time: read noise + dark shot noise
    y = stack - truth.bias - rows["drift"][:, None, None]
    for level in np.unique(rows["level"]):
        k = np.asarray(rows["level"] == level)
        expected = (_read_var(truth) + c.row_noise_sigma**2)[good] + lin[k].mean(0) / truth.gain[good]
        ratio = y[k].var(0, ddof=1)[good].sum() / expected.sum()
        err = np.sqrt(2 / (k.sum() - 1) * (expected**2).sum()) / expected.sum()
        assert abs(ratio - 1) < 4 * err, (level, ratio, err)
    assert abs(np.median(truth.dark_rate) / c.dark_median - 1) < 0.1


def test_hot_pixels_follow_their_rate_and_saturate(default_small):
    out, truth = default_small
    c = truth.config
    stack, rows = read_stack(out, truth, "dark")
    hot = np.flatnonzero(truth.defects.ravel() == DEFECT_BITS["HOT"])
    assert hot.size >= 5
    y = (stack - truth.bias - rows["drift"][:, None, None]).reshape(len(rows), -1)[:, hot]
    lin = _linear_signal(truth, rows).reshape(len(rows), -1)[:, hot]
    g = truth.gain.ravel()[hot]
    bias = truth.bias.ravel()[hot]
    var = (_nl_slope(c, lin) ** 2 * (lin / g + (truth.read_noise.ravel()[hot] / g) ** 2)
           + c.row_noise_sigma**2 + QUANT)
    pred = c.nonlinearity(lin)
    chi2, dof, n_saturated = 0.0, 0, 0
    for level in np.unique(rows["level"]):
        k = np.asarray(rows["level"] == level)
        for j in range(hot.size):
            top = pred[k, j].max() + bias[j] + 6 * np.sqrt(var[k, j].max())
            if pred[k, j].min() + bias[j] - 6 * np.sqrt(var[k, j].max()) > ADC_MAX:
                assert np.all(stack.reshape(len(rows), -1)[k, hot[j]] == ADC_MAX)
                n_saturated += 1
            elif top < ADC_MAX:
                resid = (y[k, j] - pred[k, j]).mean() / np.sqrt(var[k, j].mean() / k.sum())
                chi2, dof = chi2 + resid**2, dof + 1
    assert dof >= 15 and dof + n_saturated >= 3 * hot.size
    assert chi2 < stats.chi2.ppf(1 - 1e-4, dof)


# --------------------------------------------------------------- RTN and bias
@pytest.fixture(scope="module")
def rtn_bias(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("rtn"), n_bias=64, dark_exptimes=[],
                         flat_levels=0, rtn_fraction=0.02, bias_drift_rms=1.0)


def test_rtn_pixels_sit_on_their_truth_levels(rtn_bias):
    out, truth = rtn_bias
    c = truth.config
    stack, rows = read_stack(out, truth, "bias")
    rtn = truth.rtn
    assert len(rtn.y) == round(0.02 * stack[0].size) and set(rtn.n_levels) == {2, 3}
    g = truth.gain[rtn.y, rtn.x]
    v = stack[:, rtn.y, rtn.x] - truth.bias[rtn.y, rtn.x] - rows["drift"][:, None]  # (F, n)
    offsets = np.array([rtn.offsets(k) for k in range(len(rows))]) / g
    sigma = np.sqrt(_read_var(truth)[rtn.y, rtn.x] + c.row_noise_sigma**2)
    z = ((v - offsets) / sigma).ravel()
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / z.size)
    # without looking at the states: two-level pixels split into two clusters whose
    # separation is the truth amplitude (only well separated ones: misclassification < 0.2%)
    checked = 0
    for j in np.flatnonzero(rtn.n_levels == 2):
        amp = truth.rtn_amplitude[rtn.y[j], rtn.x[j]] / g[j]
        values = np.sort(v[:, j])
        if amp < 6 * sigma[j]:
            continue
        cost = [values[:i].var() * i + values[i:].var() * (len(values) - i)
                for i in range(4, len(values) - 4)]
        i = 4 + int(np.argmin(cost))
        sep = values[i:].mean() - values[:i].mean()
        err = sigma[j] * np.sqrt(1 / i + 1 / (len(values) - i))
        assert abs(sep - amp) < 5 * err, (j, sep, amp, err)
        checked += 1
    assert checked >= 5
    # Markov switching: observed level changes match the truth probabilities
    changes = (np.diff(rtn.states.astype(int), axis=1) != 0).sum()
    mean_p = rtn.switch_probability.astype(float) * (rtn.states.shape[1] - 1)
    assert abs(changes - mean_p.sum()) < 4 * np.sqrt((mean_p * (1 - rtn.switch_probability)).sum())


def test_bias_variance_follows_read_noise_map(rtn_bias):
    out, truth = rtn_bias
    stack, rows = read_stack(out, truth, "bias")
    n = len(rows)
    v = (stack - truth.bias - rows["drift"][:, None, None]).var(0, ddof=1)
    expected = _read_var(truth) + truth.config.row_noise_sigma**2
    good = truth.defects == 0
    ratio = v[good].sum() / expected[good].sum()
    err = np.sqrt(2 / (n - 1) * (expected[good] ** 2).sum()) / expected[good].sum()
    assert abs(ratio - 1) < 4 * err and err < 0.005
    # each high-noise pixel on its own: (n-1) v / expected ~ chi2(n-1)
    noisy = truth.has("NOISY") & ~truth.has("RTN")
    q = (n - 1) * v[noisy] / expected[noisy]
    assert noisy.sum() >= 3
    assert np.all((q > stats.chi2.ppf(1e-4, n - 1)) & (q < stats.chi2.ppf(1 - 1e-4, n - 1)))


def test_bias_drift_is_injected_as_recorded(rtn_bias):
    out, truth = rtn_bias
    c = truth.config
    stack, rows = read_stack(out, truth, "bias")
    good = truth.defects == 0
    measured = (stack - truth.bias)[:, good].mean(1)
    drift = np.asarray(rows["drift"])
    sd = np.sqrt(_read_var(truth)[good].mean() / good.sum() + c.row_noise_sigma**2 / c.shape[0])
    chi2 = (((measured - drift) / sd) ** 2).sum()
    assert stats.chi2.ppf(1e-4, len(rows)) < chi2 < stats.chi2.ppf(1 - 1e-4, len(rows))
    slope, _, _, _, slope_err = stats.linregress(drift, measured)
    assert abs(slope - 1) < 4 * slope_err and slope_err < 0.03


def test_temporal_row_noise(rtn_bias):
    out, truth = rtn_bias
    c = truth.config
    stack, rows = read_stack(out, truth, "bias")
    good = truth.defects == 0
    resid = np.where(good, stack - truth.bias - rows["drift"][:, None, None], np.nan)
    row_means = np.nanmean(resid, axis=2)  # (F, ny)
    expected = c.row_noise_sigma**2 + np.mean(
        [_read_var(truth)[r][good[r]].mean() / good[r].sum() for r in range(c.shape[0])])
    ratio = row_means.var() / expected
    assert abs(ratio - 1) < 4 * np.sqrt(2 / row_means.size)
    assert c.row_noise_sigma**2 / expected > 12 * np.sqrt(2 / row_means.size)


def test_default_bias_is_stable(default_small):
    drift = np.asarray(plan_frames(SimulationConfig())["drift"])
    assert drift.size == 615 and drift.std() <= 0.03
    out, truth = default_small
    stack, rows = read_stack(out, truth, "bias")
    good = truth.defects == 0
    measured = (stack - truth.bias)[:, good].mean(1) - rows["drift"]
    sd = np.sqrt(_read_var(truth)[good].mean() / good.sum()
                 + truth.config.row_noise_sigma**2 / truth.shape[0])
    assert ((measured / sd) ** 2).sum() < stats.chi2.ppf(1 - 1e-4, len(rows))


# ------------------------------------------------------ ladder, saturation, nonlinearity
@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("ladder"), shape=(32, 40), n_bias=0,
                         dark_exptimes=[], flat_levels=14, flat_frames=3)


def test_flat_ladder_saturation_and_nonlinearity(ladder):
    out, truth = ladder
    c = truth.config
    good = truth.defects == 0
    medians, n_unsat = [], 0
    for level in range(c.flat_levels):
        stack, rows = read_stack(out, truth, "flat", level)
        lin = _linear_signal(truth, rows)
        pred = c.nonlinearity(lin) + truth.bias + rows["drift"][:, None, None]
        sd = np.sqrt(_nl_slope(c, lin) ** 2 * (lin / truth.gain + _read_var(truth) - QUANT)
                     + c.row_noise_sigma**2 + QUANT)
        assert np.all(stack[pred - 6 * sd > ADC_MAX] == ADC_MAX)
        unsat = (pred + 6 * sd < ADC_MAX) & good
        assert np.all(stack[unsat] < ADC_MAX)
        medians.append(np.median(stack - truth.bias) / (ADC_MAX - c.bias_level))
        if unsat.sum() < 0.5 * stack.size:
            continue
        n_unsat += 1
        resid = (stack - pred)[unsat]  # residual from the documented nonlinear form
        err = np.sqrt((sd[unsat] ** 2).mean() / unsat.sum() + c.row_noise_sigma**2 / c.shape[0]
                      / len(rows))
        assert abs(resid.mean()) < 4 * err, (level, resid.mean(), err)
        deficit = (c.nonlinearity(lin) - lin)[unsat].mean()
        if level == 11:  # the ~90% level: the nonlinearity itself is measured
            measured = (stack - truth.bias - rows["drift"][:, None, None] - lin)[unsat].mean()
            assert abs(measured / deficit - 1) < 4 * err / abs(deficit) < 0.4
    medians = np.array(medians)
    assert n_unsat == 12 and np.all(np.diff(medians[:13]) > 0)
    assert medians[0] < 0.05 and (medians < 0.72).sum() >= 10
    assert (medians >= 0.999).sum() == 2  # two levels for the turnoff


# ------------------------------------------------------- files, headers, truth
def _tiny(**kw) -> SimulationConfig:
    base = {"shape": (16, 20), "seed": 7, "n_bias": 2, "dark_exptimes": [10.0],
            "dark_frames": 2, "flat_exptimes": [1.0], "flat_frames": 2}
    return SimulationConfig(**{**base, **kw})


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = simulate_dataset(tmp_path / "a", _tiny())
    b = simulate_dataset(tmp_path / "b", _tiny())
    longer = simulate_dataset(tmp_path / "c", _tiny(flat_frames=3))
    other = simulate_dataset(tmp_path / "d", _tiny(seed=8))
    assert a.n_frames == 6 and longer.n_frames == 7
    assert a.truth_path.read_bytes() == b.truth_path.read_bytes()
    for pa, pb, pc in zip(a.files, b.files, longer.files[:6], strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() == pc.read_bytes()  # frame k does not depend on later frames
    for pa, pd in zip(a.files, other.files, strict=True):
        assert not np.array_equal(fits.getdata(pa), fits.getdata(pd))
    assert not np.array_equal(SensorTruth.load(a.truth_path).gain,
                              SensorTruth.load(other.truth_path).gain)


@pytest.mark.parametrize(("convention", "names", "fraction_digits"), [
    ("maxim", ("Bias Frame", "Dark Frame", "Flat Field"), 0),
    ("nina", ("BIAS", "DARK", "FLAT"), 3),
    ("sharpcap", ("Bias", "Dark", "Flat"), 7),
])
def test_headers_follow_convention(tmp_path, convention, names, fraction_digits):
    config = _tiny(header_convention=convention, n_bias=1, dark_frames=1, flat_frames=1)
    summary = simulate_dataset(tmp_path, config)
    starts = []
    for path, imagetyp, exptime in zip(summary.files, names, (0.0, 10.0, 1.0), strict=True):
        with fits.open(path, do_not_scale_image_data=True) as hdul:
            h, raw = hdul[0].header, hdul[0].data
            assert (h["BITPIX"], h["BZERO"], h["BSCALE"]) == (16, 32768, 1)
            assert raw.dtype.kind == "i" and raw.dtype.itemsize == 2
        assert h["IMAGETYP"] == imagetyp and h["EXPTIME"] == exptime
        assert ("EXPOSURE" in h) == (convention == "nina")
        assert h["INSTRUME"] == "ZWO ASI6200MM Pro" and h["SWCREATE"].startswith("sitiancal")
        assert (h["GAIN"], h["OFFSET"], h["XBINNING"], h["YBINNING"]) == (100, 50, 1, 1)
        assert h["XPIXSZ"] == h["YPIXSZ"] == 3.76 and h["SET-TEMP"] == 0.0
        assert abs(h["CCD-TEMP"]) < 1.0
        date = h["DATE-OBS"]
        assert len(date.partition(".")[2]) == fraction_digits
        starts.append((datetime.fromisoformat(date[:26]), exptime))
        assert fits.getdata(path).dtype == np.uint16
    for (t0, e0), (t1, _) in itertools.pairwise(starts):
        assert t1 - t0 >= timedelta(seconds=e0 + config.readout_time - 1)


def test_truth_file_round_trip(default_small):
    out, _ = default_small
    again = SensorTruth.load(out / "truth.fits")
    assert again.config == SimulationConfig(**SMALL_DEFAULTS)
    for name in MAP_NAMES:
        arr = getattr(again, name.lower())
        assert arr.shape == (48, 64) and arr.dtype.isnative
        assert arr.dtype == (np.uint16 if name == "DEFECTS" else np.float32)
    files = sorted(p.name for p in out.glob("*.fits") if p.name != "truth.fits")
    assert sorted(again.frames["file"]) == files and again.config.n_frames == len(files)
    is_rtn = again.has("RTN")
    assert np.array_equal(is_rtn, again.rtn_amplitude > 0)
    assert np.array_equal(np.flatnonzero(is_rtn), np.sort(again.rtn.y * 64 + again.rtn.x))
    assert again.rtn.states.shape == (is_rtn.sum(), len(files))
    assert again.scalars["GAINMED"] == pytest.approx(float(np.median(again.gain)))
    assert again.scalars["NANOM"] == (again.defects != 0).sum()
    assert again.scalars["SATURATE"] == ADC_MAX and again.scalars["MASKB5"] == "RTN"


def test_truth_maps_match_configured_populations(tmp_path):
    config = SimulationConfig(shape=(512, 512), seed=11, n_bias=0, dark_exptimes=[],
                              flat_levels=0, gain2_fraction=0.3, temperature=6.0)
    truth = SensorTruth.load(simulate_dataset(tmp_path, config).truth_path)
    n = truth.gain.size
    good = truth.defects == 0
    second = np.abs(truth.gain - 0.272) < np.abs(truth.gain - 0.254)
    assert abs(second.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    main = truth.gain[~second]
    assert abs(np.median(main) - 0.254) < 4 * 1.25 * 0.002 / np.sqrt(main.size)
    rn_med = np.median(truth.read_noise)
    assert abs(rn_med - 1.03) < 4 * 1.25 * 0.15 * 1.03 / np.sqrt(n)
    centre = truth.dark_rate[128:384, 128:384]  # away from the glow corner
    assert abs(np.median(centre) / 0.004 - 1) < 4 * 1.25 * 0.3 / np.sqrt(centre.size)
    assert truth.scalars["DARKMED"] == pytest.approx(float(np.median(truth.dark_rate)))
    hot = truth.dark_rate[truth.has("HOT")]
    assert hot.min() >= 2.0 * 0.999 and hot.max() <= 100.0 * 1.001  # 1-50 e-/s at 0 C, x2
    prnu = truth.response[good].std()
    assert abs(prnu / 0.005 - 1) < 4 * np.sqrt(0.5 / good.sum())
    assert truth.response[truth.has("DEAD")].max() < 0.3
    low = truth.response[truth.has("LOW_RESPONSE")]
    assert low.min() >= 0.5 and low.max() <= 0.8
    corners = truth.vignetting[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all((corners > 0.8) & (corners < 0.9)) and truth.vignetting.max() > 0.999
    for name, fraction in (("HOT", 1e-4), ("WARM", 2e-4), ("DEAD", 2e-5), ("RTN", 1e-4)):
        assert truth.has(name).sum() == round(fraction * n)
    noisy = truth.read_noise > np.median(truth.read_noise) + 5 * stats.median_abs_deviation(
        truth.read_noise, axis=None, scale="normal")
    assert np.array_equal(noisy, truth.has("NOISY")) and noisy.sum() >= round(1.2e-4 * n)
    assert 0.0006 < (truth.defects != 0).mean() < 0.0008  # reference study: 0.06-0.08%


def test_config_validation():
    with pytest.raises(ValidationError):
        SimulationConfig(header_convention="ascom")
    with pytest.raises(ValidationError):
        SimulationConfig(flat_levels=3, flat_exptimes=[1.0, 2.0])
    with pytest.raises(ValidationError):
        SimulationConfig(no_such_field=1)
    with pytest.raises(ValidationError):
        SimulationConfig(dark_exptimes=[10.0, 10.0])
    with pytest.raises(ValidationError):
        SimulationConfig(nonlinearity_coeff=0.05)  # not monotonic below 2x the ADC range
    # an optical centre near one corner: the far corner would get negative light
    # (the simulation had failed in numpy's Poisson draw)
    with pytest.raises(ValidationError, match="leaves no light at the farthest corner"):
        SimulationConfig(vignetting_center=(0.2, 0.8), vignetting_corner=0.4)
    assert SimulationConfig(vignetting_center=(0.2, 0.8), vignetting_corner=0.3)
    assert SimulationConfig(flat_exptimes=[2.0, 1.0]).flat_levels == 2
    assert SimulationConfig().n_frames == 20 + 7 * 5 + 14 * 40


def test_progress_and_cli(tmp_path):
    from sitiancal.service.cli import main

    calls: list[tuple[int, int]] = []
    summary = simulate_dataset(tmp_path / "p", _tiny(), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(k, 6) for k in range(7)] and summary.to_dict()["n_frames"] == 6
    result = CliRunner().invoke(main, [
        "simulate", str(tmp_path / "cli"), "--shape", "16x20", "--seed", "3", "--bias", "2",
        "--darks", "0,5", "--dark-frames", "1", "--flat-levels", "2", "--flat-frames", "1",
        "--set", "gain2_fraction=0.5", "--set", 'header_convention="nina"', "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 6 frames" in result.output
    truth = SensorTruth.load(tmp_path / "cli" / "truth.fits")
    assert truth.config.gain2_fraction == 0.5 and truth.config.header_convention == "nina"
    assert len(list((tmp_path / "cli").glob("*.fits"))) == 7
