"""Strain mapping on awkward input: hot pixels, a reference region holding another grain, a
centred (non-primitive) cell, an elliptical detector and ``to_frame("g1")``, vectors in the
wrong units, flat frames, bad detection parameters, reference masks of other types,
hand-made Bragg vectors, line scans and the ring calibration's ellipse angle."""

import os
import warnings

import numpy as np
import pytest

import diffgpu
from diffgpu.kernels.lattice import _fit_xp, fit_lattices
from diffgpu.synthetic_nbed import synthetic_nbed

G = ((17.0, 1.5), (-4.0, 15.0))  # synthetic_nbed's reference lattice, pixels


def _truth(s):
    md = s.metadata.Synthetic
    return np.stack([md.exx, md.eyy, md.exy, md.theta], axis=-1)


@pytest.fixture(scope="module")
def scan():
    """8 x 8 scan, strain up to 1 %, rotation up to 0.3 degrees."""
    return synthetic_nbed(nav_shape=(8, 8), sig_shape=(128, 128), dose=3e6, seed=1)


@pytest.fixture(scope="module")
def vectors(scan):
    return scan.find_bragg_disks(radius=4.0)


# -- 1. hot pixels -----------------------------------------------------------------------

def test_one_hot_pixel_beside_a_disk_is_rejected():
    """A hot pixel 4.5 px from a disk is found as a disk 2 px off its site, 3 x the median
    intensity: the rejection limit (4 x the weighted RMS, which it inflated) kept it, and
    its frame read exx -0.0064 instead of -0.0047 (RMS residual 0.50 px)."""
    truth = [-0.0047, 0.012, 0.0045, -1.2194]
    s = synthetic_nbed(nav_shape=(1, 2), sig_shape=(128, 128), dose=3e6,
                       strain=([[0, truth[0]]], [[0, truth[1]]], [[0, truth[2]]], [[0, truth[3]]]))
    s.data[:, :, 80, 81] = 1e5
    v = s.find_bragg_disks(radius=4.0)
    strain = v.get_strain_map(reference=G)
    np.testing.assert_allclose(strain.data[0, 1, :3], truth[:3], atol=3e-4)
    assert abs(strain.data[0, 1, 3] - truth[3]) < 0.01
    assert np.all(v.fit_lattice(basis=G).data[0, :, 7] < 0.03)  # RMS residual (px): clean


@pytest.mark.parametrize("counts", [1e5, 1e6])
def test_ten_hot_pixels_per_frame_leave_the_strain_at_the_clean_noise(counts):
    """Ten hot pixels in every frame, as bright as the disks (1e5) or 20 x brighter (1e6):
    before, errors of 0.012 and 0.5 degrees (1e5), and every frame NaN (1e6)."""
    rng = np.random.default_rng(5)
    n = 8
    e = rng.uniform(-0.01, 0.01, (3, n))
    theta = rng.uniform(-1.5, 1.5, n)
    e[:, 0], theta[0] = 0, 0
    s = synthetic_nbed(nav_shape=(1, n), sig_shape=(128, 128), dose=3e6, seed=3,
                       strain=(e[0][None], e[1][None], e[2][None], theta[None]))
    truth = np.stack([e[0], e[1], e[2], theta], -1)
    clean = s.find_bragg_disks(radius=4.0).get_strain_map(reference=G)
    ys, xs = rng.integers(10, 118, (2, 10))
    s.data[:, :, ys, xs] = counts
    hot = s.find_bragg_disks(radius=4.0).get_strain_map(reference=G)
    assert hot.metadata.Strain.n_failed == 0
    err_clean = np.abs(clean.data[0] - truth).max(axis=0)
    err_hot = np.abs(hot.data[0] - truth).max(axis=0)
    assert np.all(err_hot[:3] <= max(2e-4, 1.5 * err_clean[:3].max())), (err_hot, err_clean)
    assert err_hot[3] <= max(0.01, 1.5 * err_clean[3]), (err_hot, err_clean)


def _lattice_frames(n=40, seed=2):
    rng = np.random.default_rng(seed)
    h, k = np.meshgrid(np.arange(-3, 4), np.arange(-3, 4))
    hk = np.stack([h.ravel(), k.ravel()], -1).astype(float)
    g = np.array([[12.0, -1.0], [1.0, 12.5]])  # columns g1, g2
    pos = np.broadcast_to(hk @ g.T + [60.0, 60.0], (n, len(hk), 2)).copy()
    pos += rng.normal(0, 0.02, pos.shape)
    w = -np.sort(-rng.uniform(0.8, 1.2, (n, len(hk))), axis=1)  # strongest first
    return g, hk, pos, w


def test_bright_outlier_near_a_site_is_rejected_by_the_kernel():
    """A spot 1.2 px off a site, 5 x as bright as the disks: the fit ignores it (host and
    array paths alike); before it was kept and moved the lattice."""
    g, hk, pos, w = _lattice_frames()
    pos[:, 10] += [1.2, 0.0]
    w[:, 10] = 5.0
    for fits in (fit_lattices(pos, w, g, np.array([60.0, 60.0])),
                 _fit_xp(pos, w, g, np.array([60.0, 60.0]), 6, None, 8, np)):
        assert np.all(fits[:, 6] == len(hk) - 1)  # the outlier left out
        np.testing.assert_allclose(fits[:, 2:6], np.tile(g.T.ravel(), (len(fits), 1)), atol=0.01)
        assert np.all(fits[:, 7] < 0.05)


def test_host_and_array_paths_agree_with_outliers_and_tied_weights():
    g, hk, pos, w = _lattice_frames(n=60, seed=4)
    rng = np.random.default_rng(4)
    out = rng.random(pos.shape[:2]) < 0.15
    pos[out] += rng.uniform(-3, 3, (int(out.sum()), 2))
    w[out] *= rng.uniform(1, 20, int(out.sum()))
    w[::3] = 1.0  # ties (weighted=False)
    host = fit_lattices(pos, w, g, np.array([60.0, 60.0]))
    arrays = _fit_xp(pos, w, g, np.array([60.0, 60.0]), 6, None, 8, np)
    np.testing.assert_array_equal(np.isnan(host), np.isnan(arrays))
    np.testing.assert_allclose(host, arrays, rtol=1e-10, atol=1e-9)


# -- 2. a robust region reference --------------------------------------------------------

def test_one_frame_of_another_grain_does_not_shift_a_region_reference():
    """One of the 4 reference frames turned 10 degrees: the mean turned every frame by
    2.5 degrees; the mean after rejecting outliers does not (the default reference, the
    median of all fits, never did)."""
    z = [[0, 0, 0, 0, 0]]
    s = synthetic_nbed(nav_shape=(1, 5), sig_shape=(128, 128), dose=3e6,
                       strain=(z, z, z, [[0, 0, 0, 10, 0]]))
    v = s.find_bragg_disks(radius=4.0)
    with pytest.warns(UserWarning, match="1 of the reference region's 4 lattice fits"):
        strain = v.get_strain_map(reference=(slice(0, 1), slice(0, 4)))
    np.testing.assert_allclose(strain.data[0, [0, 1, 2, 4]], 0, atol=2e-3)
    assert abs(strain.data[0, 3, 3] - 10) < 0.02
    assert "1 left out" in strain.metadata.Strain.reference


def test_region_reference_of_one_grain_is_its_mean(scan, vectors):
    from diffgpu.strain import _robust_mean

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out, no warning
        strain = vectors.get_strain_map(reference=(slice(0, 2), slice(0, 2)))
    fits = vectors.fit_lattice(reference=(slice(0, 2), slice(0, 2))).data[:2, :2, 2:6]
    ref, kept = _robust_mean(fits.reshape(-1, 4))
    assert kept.all()
    np.testing.assert_allclose(ref, fits.reshape(-1, 4).mean(0))
    assert "0 left out" in strain.metadata.Strain.reference


# -- 3. a centred (non-primitive) cell ---------------------------------------------------

@pytest.mark.parametrize("how", ["reference", "basis"])
def test_conventional_cell_of_a_centred_lattice_is_made_primitive(how):
    """A centred-rectangular lattice close to hexagonal given as its conventional cell:
    indexed 60 degrees off at the strained position (theta -59.6 instead of 0.4), no NaN."""
    truth = [0.015, -0.016, 0.007, 0.4]
    s = synthetic_nbed(nav_shape=(1, 2), sig_shape=(160, 160), g1=(16, 0), g2=(8, 13.5), dose=3e6,
                       strain=([[0, truth[0]]], [[0, truth[1]]], [[0, truth[2]]], [[0, truth[3]]]))
    v = s.find_bragg_disks(radius=4.0)
    kwargs = ({"reference": ((16, 0), (0, 27))} if how == "reference"
              else {"basis": ((16, 0), (0, 27)), "reference": (slice(0, 1), slice(0, 1))})
    with pytest.warns(UserWarning, match="not a primitive cell"):
        strain = v.get_strain_map(**kwargs)
    np.testing.assert_allclose(strain.data[0, 0], 0, atol=5e-4)
    np.testing.assert_allclose(strain.data[0, 1, :3], truth[:3], atol=5e-4)
    assert abs(strain.data[0, 1, 3] - truth[3]) < 0.02
    g1, g2 = strain.metadata.Strain.basis_g1_px, strain.metadata.Strain.basis_g2_px
    area = abs(g1[0] * g2[1] - g1[1] * g2[0])
    assert abs(area - 16 * 27 / 2) < 1  # a primitive cell: half the conventional one


# -- 4. to_frame("g1") in the corrected frame ----------------------------------------------

def test_to_frame_g1_uses_the_affine_corrected_direction():
    """A 10 % elliptical detector (axes at 45 degrees), g1 at 30 degrees: the raw pixels
    put g1 at 31.37 degrees and exy -7e-4 came out of a pure stretch along g1."""
    d = np.array([[1.0, 0.05], [0.05, 1.0]])
    c, s_ = np.cos(np.radians(30)), np.sin(np.radians(30))
    e = 0.03
    sim = synthetic_nbed(nav_shape=(1, 2), sig_shape=(160, 160), g1=(16 * c, 16 * s_),
                         g2=(-17.6 * s_, 17.6 * c), dose=None, distortion=d,
                         strain=([[0, e * c * c]], [[0, e * s_ * s_]], [[0, e * c * s_]], [[0, 0]]))
    sim.calibration.affine = np.linalg.inv(d)
    strain = sim.find_bragg_disks(radius=4.0).get_strain_map(reference=(slice(0, 1), slice(0, 1)))
    along = strain.to_frame("g1")
    assert along.metadata.Strain.frame_angle_deg == pytest.approx(30, abs=0.02)
    np.testing.assert_allclose(along.data[0, 1, :3], [e, 0, 0], atol=2e-4)
    # from a map already turned: to g1 all the same
    again = strain.to_frame(10).to_frame("g1")
    np.testing.assert_allclose(again.data, along.data, atol=1e-12)
    assert again.metadata.Strain.frame_angle_deg == pytest.approx(30, abs=0.02)


# -- 5. vectors in the wrong units -------------------------------------------------------

@pytest.mark.parametrize("vectors_", [((0.17, 0.015), (-0.04, 0.15)), ([0, 1], [1, 0])])
def test_too_short_reference_or_basis_vectors_are_refused(vectors, vectors_):
    """Vectors 100 x too short, or scan indices meant as a region, ran and gave NaN (52 of
    64) or wrong strain (eyy 8e-3, theta 0.8 degrees off)."""
    for kwargs in ({"reference": vectors_}, {"basis": vectors_}):
        with pytest.raises(ValueError, match="detector pixels.*pass a region"):
            vectors.get_strain_map(**kwargs)
    with pytest.raises(ValueError, match="shorter than two disks can be found apart"):
        vectors.fit_lattice(basis=vectors_)


# -- 6. flat frames ------------------------------------------------------------------------

def test_flat_frames_have_no_disks():
    """All pixels equal: 128 "disks" 1 px apart (min_spacing 3), and zero strain."""
    s = diffgpu.DiffractionPatterns(np.full((2, 2, 64, 64), 7.0, "float32"))
    v = s.find_bragg_disks(radius=3.0)
    assert np.all(v.n_disks() == 0)


def test_a_flat_frame_in_a_scan_is_nan_and_counted(scan):
    s = scan.deepcopy()
    s.data[3, 4] = 5.0
    v = s.find_bragg_disks(radius=4.0)
    assert v.n_disks()[3, 4] == 0
    with pytest.warns(RuntimeWarning, match="1 of 64 positions have NaN strain"):
        strain = v.get_strain_map(reference=(slice(0, 2), slice(0, 2)))
    assert np.isnan(strain.data[3, 4]).all() and strain.metadata.Strain.n_failed == 1


def test_one_peak_per_plateau_on_host_and_array_paths():
    from diffgpu.kernels.disks import _host_peaks

    finder = diffgpu.kernels.disks.DiskFinder((32, 32), np.ones((1, 1), np.float32), min_spacing=3)
    corr = np.zeros((1, 32, 32), np.float32)
    corr[0, 10:16, 12:18] = 5.0   # a 6 x 6 plateau
    corr[0, 24, 24] = 3.0
    corr[0, 25, 25] = 1.0         # lower neighbour: not a peak
    out, cut = _host_peaks(corr, finder.allowed, 0.0, 0.01, 3, 16, 0)
    found = out[0][np.isfinite(out[0, :, 0])]
    assert found[:, :2].tolist() == [[12.0, 10.0], [24.0, 24.0]] and cut == 0
    idx, val = finder._device_peaks(corr, np)
    assert idx[0, :3].tolist() == [10 * 32 + 12, 24 * 32 + 24, -1]


def test_array_path_checks_ties_in_bounded_pieces(scan, monkeypatch):
    import diffgpu.kernels.disks as kd

    finder = kd.DiskFinder((128, 128), kd.disk_image(4.0), min_spacing=4, max_disks=64)
    corr = finder.correlate(np.ascontiguousarray(scan.data[:2].reshape(-1, 128, 128)))
    whole = finder._device_peaks(corr, np)
    monkeypatch.setattr(kd, "_TIE_VALUES", 100)  # two candidates at a time
    pieces = finder._device_peaks(corr, np)
    np.testing.assert_array_equal(whole[0], pieces[0])
    host, _ = kd._host_peaks(corr, finder.allowed, 0.0, 0.01, 4, 64, 0)
    for frame, idx in zip(host, whole[0]):  # the same peaks (ranked by other values)
        found = frame[np.isfinite(frame[:, 0])]
        assert sorted((found[:, 1] * 128 + found[:, 0]).astype(int).tolist()) == sorted(
            idx[idx >= 0].tolist())


# -- 7. detection parameters -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"threshold": float("nan")}, "threshold"),
    ({"relative_threshold": float("nan")}, "relative_threshold"),
    ({"relative_threshold": 1.0}, "relative_threshold"),
    ({"relative_threshold": -0.1}, "relative_threshold"),
    ({"sigma": float("nan")}, "sigma"),
    ({"sigma": -1.0}, "sigma"),
    ({"refine_iterations": -1}, "refine_iterations"),
    ({"refine_iterations": 2.5}, "refine_iterations"),
    ({"min_spacing": 0}, "min_spacing"),
    ({"min_spacing": -2.0}, "min_spacing"),
    ({"max_disks": 0}, "max_disks"),
    ({"max_disks": True}, "max_disks"),
])
def test_detection_parameters_are_checked(scan, kwargs, words):
    with pytest.raises(ValueError, match=words):
        scan.find_bragg_disks(radius=4.0, **kwargs)


def test_max_disks_cutting_frames_is_reported(scan):
    with pytest.warns(RuntimeWarning, match="64 of 64 frames have more disks than max_disks=10"):
        v = scan.find_bragg_disks(radius=4.0, max_disks=10)
    assert v.metadata.BraggDisks.truncated_frames == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan.find_bragg_disks(radius=4.0).metadata.BraggDisks.truncated_frames == 0
    lazy = scan.as_lazy().find_bragg_disks(radius=4.0, max_disks=10)
    with pytest.warns(RuntimeWarning, match="more disks than max_disks=10"):
        lazy.compute()


# -- 8. reference regions, hand-made vectors, line scans, ring angle ----------------------

def test_region_reaching_past_the_scan_is_refused(vectors):
    """slice(0, 10) of 8 rows was clipped to rows 0:8 silently."""
    with pytest.raises(ValueError, match=r"rows 0:10 reach past the scan.*scan shape \(8, 8\)"):
        vectors.get_strain_map(reference=(slice(0, 10), slice(0, 2)))
    with pytest.raises(ValueError, match="columns 6:9 reach past"):
        vectors.fit_lattice(reference=(slice(0, 2), slice(6, 9)))


def test_cli_reference_past_the_scan(tmp_path, capsys):
    from diffgpu.cli import main

    src = tmp_path / "nbed.zspy"
    synthetic_nbed(nav_shape=(6, 8), sig_shape=(64, 64), dose=2e6).save(src)
    out = tmp_path / "s.zspy"
    assert main(["strain", str(src), "-o", str(out), "--radius", "4", "--no-progress",
                 "--reference", "0", "8", "0", "2"]) == 3
    assert "scan shape (6, 8)" in capsys.readouterr().err
    assert not out.exists() and [p for p in os.listdir(tmp_path) if "partial" in p] == []


def test_reference_masks_of_other_types(vectors):
    import dask.array as da
    import hyperspy.api as hs

    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True
    want = vectors.get_strain_map(reference=mask).data
    for other in (mask.astype(int), mask.astype(np.uint8), da.from_array(mask),
                  hs.signals.Signal2D(mask)):
        np.testing.assert_array_equal(vectors.get_strain_map(reference=other).data, want)
    lazy = vectors.as_lazy().get_strain_map(reference=da.from_array(mask))
    lazy.compute()
    np.testing.assert_allclose(lazy.data, want, atol=1e-12)
    with pytest.raises(ValueError, match="only 0 and 1"):
        vectors.get_strain_map(reference=mask.astype(int) * 2)


def test_hand_made_vectors_with_bad_fields_say_so(vectors):
    xy = diffgpu.BraggVectors(np.ascontiguousarray(vectors.data[..., :2]))
    with pytest.raises(ValueError, match="3 fields.*intensity"):
        xy.get_strain_map()
    with pytest.raises(ValueError, match="3 fields"):
        xy.fit_lattice()
    bad = vectors.deepcopy()
    bad.data[..., 2] = np.where(np.isfinite(bad.data[..., 2]), -1.0, np.nan)
    with pytest.raises(ValueError, match="intensities .* <= 0 or NaN.*weighted=False"):
        bad.get_strain_map()
    with pytest.raises(ValueError, match="intensities"):  # a basis and origin given too
        bad.fit_lattice(basis=G, origin=(63.5, 63.5))
    bad.get_strain_map(weighted=False, reference=(slice(0, 2), slice(0, 2)))  # usable
    bad.data[..., 2] = np.nan
    with pytest.raises(ValueError, match="intensities .* are NaN"):
        bad.get_strain_map(weighted=False)


def test_line_scan_synthetic_data():
    s = synthetic_nbed(nav_shape=(10,), sig_shape=(96, 96))
    assert s.data.shape == (10, 96, 96) and s.metadata.Synthetic.exx.shape == (10,)
    assert s.metadata.Synthetic.positions.shape[0] == 10
    strain = s.find_bragg_disks(radius=4.0).get_strain_map(reference=slice(0, 2))
    np.testing.assert_allclose(strain.data[..., :3], _truth(s)[..., :3], atol=5e-4)
    with pytest.raises(ValueError, match="nav_shape"):
        synthetic_nbed(nav_shape=(2, 2, 2))


def test_ring_ellipse_angle_is_in_0_180():
    from diffgpu.ring_calibration import _half_turn_angle

    assert _half_turn_angle([-1.0, -1e-17]) == 0.0  # was 180.0
    assert _half_turn_angle([1.0, 0.0]) == 0.0
    assert _half_turn_angle([0.0, -1.0]) == 90.0
    assert 0 <= _half_turn_angle([1.0, -1e-3]) < 180
