"""Azimuthal integration: exactness, conservation, masks, dtypes, lazy/eager, errors, GPU."""

import dask.array as da
import numpy as np
import pytest

import diffgpu
from diffgpu.geometry import PolarGeometry, integration_matrix


def signal(data, center, scale=1.0, lazy=False):
    s = diffgpu.DiffractionPatterns(np.asarray(data))
    s.calibration.center = center
    s.calibration.scale = scale
    return s.as_lazy() if lazy else s


def supersampled_reference(frame, center, scale, affine, r_edges, a_edges_deg, sub):
    """Independent slow reference: split every pixel into sub x sub points and histogram them."""
    ny, nx = frame.shape
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    y = (np.arange(ny)[:, None] + offs[None, :]).ravel()
    x = (np.arange(nx)[:, None] + offs[None, :]).ravel()
    X, Y = np.meshgrid(x - center[0], y - center[1])
    m = np.diag(scale) @ np.asarray(affine).reshape(2, 2)
    U = m[0, 0] * X + m[0, 1] * Y
    V = m[1, 0] * X + m[1, 1] * Y
    r = np.hypot(U, V)
    phi = np.rad2deg(np.arctan2(V, U))
    w = np.repeat(np.repeat(frame, sub, axis=0), sub, axis=1) / sub**2
    h, _, _ = np.histogram2d(r.ravel(), phi.ravel(), bins=[r_edges, a_edges_deg], weights=w.ravel())
    area, _, _ = np.histogram2d(r.ravel(), phi.ravel(), bins=[r_edges, a_edges_deg],
                                weights=np.full(w.size, 1.0 / sub**2))
    return h, area


@pytest.mark.parametrize("seed", range(4))
def test_matches_supersampled_reference_on_random_geometries(seed):
    rng = np.random.default_rng(seed)
    ny, nx = 32, 40
    center = (rng.uniform(-5, nx + 5), rng.uniform(-5, ny + 5))  # may be off the detector
    scale = (rng.uniform(0.5, 2), rng.uniform(0.5, 2))
    affine = np.eye(2) + rng.uniform(-0.08, 0.08, (2, 2))
    frame = rng.random((ny, nx)) * 100
    s = signal(frame, center, scale)
    s.calibration.scale = scale
    polar = s.get_azimuthal_integral2d(npt=5, npt_azim=6, radial_range=(4.0, 20.0), affine=affine,
                                       dtype="float64")
    # the reference converges to the exact areas as 1/sub**2: within about 3e-3 at sub=64
    ref, area = supersampled_reference(frame, center, scale, affine, np.linspace(4, 20, 6),
                                       np.linspace(-180, 180, 7), sub=64)
    covered = area > 1.0
    assert covered.sum() >= 3
    np.testing.assert_allclose(polar.data[covered], ref[covered], rtol=4e-3, atol=1e-6 * ref.max())


def test_bin_areas_are_exact():
    g = PolarGeometry((128, 128), (63.2, 64.9), (1.0, 1.0), npt=30, npt_azim=72,
                      radial_range=(0.0, 60.0), azimuth_range=(-180.0, 180.0))
    area = np.asarray(integration_matrix(g).sum(axis=1), dtype=float).reshape(30, 72)
    e = np.linspace(0, 60, 31)
    exact = 0.5 * (e[1:] ** 2 - e[:-1] ** 2) * np.deg2rad(5)
    np.testing.assert_allclose(area, np.broadcast_to(exact[:, None], area.shape), rtol=1e-5)


@pytest.mark.parametrize("lazy", [False, True])
def test_conserves_intensity(lazy):
    rng = np.random.default_rng(1)
    frames = rng.random((3, 2, 64, 64)).astype("float32")
    mask = np.zeros((64, 64), bool)
    mask[10:14, 40:50] = True
    s = signal(frames, (30.3, 34.8), lazy=lazy)
    s.calibration.mask = mask
    r_max = 80.0  # beyond every corner: all unmasked pixels are inside
    polar = s.get_azimuthal_integral2d(npt=50, npt_azim=90, radial_range=(0, r_max))
    if lazy:
        polar.compute()
    expected = (frames * ~mask).sum(axis=(-2, -1), dtype=float)
    np.testing.assert_allclose(polar.data.sum(axis=(-2, -1), dtype=float), expected, rtol=1e-5)
    # inside a partial range: the sum equals the area-weighted sum of the pixels
    part = s.get_azimuthal_integral2d(npt=10, npt_azim=36, radial_range=(5, 25), azimuth_range=(-90, 45))
    if lazy:
        part.compute()
    g = PolarGeometry((64, 64), (30.3, 34.8), (1.0, 1.0), 1, 1, (5.0, 25.0), (-90.0, 45.0))
    weights = np.asarray(integration_matrix(g, mask).sum(axis=0)).reshape(64, 64)
    np.testing.assert_allclose(part.data.sum(axis=(-2, -1)), (frames * weights).sum(axis=(-2, -1)),
                               rtol=1e-5)


def test_mean_of_a_constant_image_is_that_constant_everywhere_covered():
    s = signal(np.full((2, 50, 60), 7.5, dtype="float32"), (20.7, 31.1))
    s.calibration.mask = np.eye(50, 60, dtype=bool)
    polar = s.get_azimuthal_integral2d(npt=40, npt_azim=180, mean=True)
    covered = np.isfinite(polar.data)
    assert covered.mean() > 0.3  # corners of the range are outside the detector: NaN there
    np.testing.assert_allclose(polar.data[covered], 7.5, rtol=1e-5)
    profile = s.get_azimuthal_integral1d(npt=40, mean=True)
    assert np.all(np.isfinite(profile.data))
    np.testing.assert_allclose(profile.data, 7.5, rtol=1e-5)


def test_1d_equals_2d_summed_over_azimuth():
    rng = np.random.default_rng(2)
    s = signal(rng.random((5, 64, 64)).astype("float32"), (40.2, 21.9))
    for az in (None, (-120.0, 30.0)):
        p2 = s.get_azimuthal_integral2d(npt=60, npt_azim=45, azimuth_range=az, radial_range=(2, 58))
        p1 = s.get_azimuthal_integral1d(npt=60, azimuth_range=az, radial_range=(2, 58))
        np.testing.assert_allclose(p1.data, p2.data.sum(axis=-1), rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "float64"])
def test_integer_and_other_dtypes(dtype):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    big = info.max if info else 1e6
    frames = np.full((2, 32, 32), big, dtype=dtype)
    s = signal(frames, (15.5, 15.5))
    p = s.get_azimuthal_integral1d(npt=10, radial_range=(0, 40))
    assert p.data.dtype == np.float32
    np.testing.assert_allclose(p.data.sum(axis=-1), float(big) * 32 * 32, rtol=1e-5)
    p64 = s.get_azimuthal_integral1d(npt=10, radial_range=(0, 40), dtype="float64")
    assert p64.data.dtype == np.float64


def test_nan_and_inf_pixels_are_masked_per_frame():
    frames = np.ones((3, 32, 32), dtype="float32")
    frames[1, 5, 7] = np.nan
    frames[2, 20, 3] = np.inf
    s = signal(frames, (15.5, 15.5))
    mean = s.get_azimuthal_integral2d(npt=10, npt_azim=12, mean=True, radial_range=(0, 15))
    assert np.all(np.isfinite(mean.data))
    np.testing.assert_allclose(mean.data, 1.0, rtol=1e-5)
    total = s.get_azimuthal_integral1d(npt=10, radial_range=(0, 30))
    np.testing.assert_allclose(total.data.sum(axis=-1), [1024, 1023, 1023], rtol=1e-5)


def test_mask_argument_combines_with_calibration_mask():
    frames = np.ones((1, 32, 32), dtype="float32")
    s = signal(frames, (15.5, 15.5))
    cal_mask = np.zeros((32, 32), bool)
    cal_mask[0, :] = True
    s.calibration.mask = cal_mask
    call_mask = np.zeros((32, 32), bool)
    call_mask[:, 0] = True
    p = s.get_azimuthal_integral1d(npt=5, radial_range=(0, 30), mask=call_mask)
    assert p.data.sum() == pytest.approx(32 * 32 - 63, rel=1e-5)
    assert p.metadata.Integration.masked_pixels == 63


def test_lazy_equals_eager_and_stays_lazy():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(48, 48), chunks=(2, 3))
    eager = s.deepcopy()
    eager.compute()
    lazy_polar = s.get_azimuthal_integral2d(npt=20, npt_azim=36)
    assert isinstance(lazy_polar, diffgpu.LazyPolarPatterns)
    assert lazy_polar.data.chunks[:2] == ((2, 2), (3, 3))
    lazy_polar.compute()
    np.testing.assert_allclose(lazy_polar.data, eager.get_azimuthal_integral2d(npt=20, npt_azim=36).data,
                               rtol=1e-6)
    lazy_profile = s.get_azimuthal_integral1d(npt=20)
    assert isinstance(lazy_profile, diffgpu.LazyRadialProfiles)
    np.testing.assert_allclose(lazy_profile.data.compute(),
                               eager.get_azimuthal_integral1d(npt=20).data, rtol=1e-6)


def test_signal_chunks_are_merged():
    data = da.ones((4, 16, 16), chunks=(2, 8, 8), dtype="float32")
    s = diffgpu.LazyDiffractionPatterns(data)
    s.calibration.center = None
    p = s.get_azimuthal_integral1d(npt=4, radial_range=(0, 20))
    np.testing.assert_allclose(p.data.compute().sum(axis=-1), 256, rtol=1e-5)


def test_output_axes_and_metadata():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 3), sig_shape=(64, 64), lazy=False)
    s.calibration.scale = 0.02
    s.calibration.units = "1/Å"
    s.axes_manager.navigation_axes[0].units = "nm"
    polar = s.get_azimuthal_integral2d(npt=32, npt_azim=90, radial_range=(0.0, 0.64))
    az, rad = polar.axes_manager.signal_axes
    assert (az.name, az.units, az.size) == ("azimuth", "deg", 90)
    assert az.offset == pytest.approx(-178.0) and az.scale == pytest.approx(4.0)
    assert (rad.name, rad.units, rad.size) == ("radius", "1/Å", 32)
    assert rad.offset == pytest.approx(0.01) and rad.scale == pytest.approx(0.02)
    assert polar.data.shape == (2, 3, 32, 90)
    assert polar.axes_manager.navigation_axes[0].units == "nm"
    assert polar.metadata.Signal.signal_type == "polar_patterns"
    assert polar.metadata.Integration.npt_azim == 90
    assert not polar.metadata.has_item("Diffraction.mask")
    rad_prof = s.get_azimuthal_integral1d(npt=32, radial_unit="q")
    assert rad_prof.axes_manager.signal_axes[0].name == "q"
    polar_rad = s.get_azimuthal_integral2d(npt=8, npt_azim=4, azimuth_unit="rad")
    assert polar_rad.axes_manager.signal_axes[0].units == "rad"
    assert polar_rad.axes_manager.signal_axes[0].offset == pytest.approx(-np.pi + np.pi / 4)


def test_rings_land_at_their_radii():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(1, 1), sig_shape=(128, 128), drift=(0, 0), wobble=0,
                                      noise=False, dtype="float32", lazy=False)
    profile = s.get_azimuthal_integral1d(npt=128, radial_range=(0, 64), mean=True)
    values = profile.data[0, 0]
    for radius in s.metadata.Synthetic.ring_radii:
        idx = int(radius / 0.5)
        window = values[idx - 6: idx + 7]
        peak = profile.axes_manager.signal_axes[0].index2value(idx - 6 + int(window.argmax()))
        assert abs(peak - radius) <= 0.5


def test_curved_ewald_and_two_theta():
    s = signal(np.ones((1, 64, 64), dtype="float32"), (31.5, 31.5), scale=0.05)
    s.calibration.units = "1/Å"
    s.calibration.beam_energy = 200
    lam = s.calibration.wavelength
    flat = s.get_azimuthal_integral1d(npt=10)
    curved = s.get_azimuthal_integral1d(npt=10, curved_ewald=True)
    rho_max = flat.axes_manager.signal_axes[0].high_value + flat.axes_manager.signal_axes[0].scale / 2
    k_curved = 2 * np.sin(np.arctan(lam * rho_max) / 2) / lam
    ax = curved.axes_manager.signal_axes[0]
    assert ax.high_value + ax.scale / 2 == pytest.approx(k_curved, rel=1e-9)
    assert curved.data.sum() == pytest.approx(flat.data.sum(), rel=1e-5)  # same pixels, other bins
    tth = s.get_azimuthal_integral1d(npt=10, radial_unit="2theta_deg")
    ax = tth.axes_manager.signal_axes[0]
    assert ax.units == "deg"
    assert ax.high_value + ax.scale / 2 == pytest.approx(np.rad2deg(np.arctan(lam * rho_max)), rel=1e-9)


def test_inplace():
    s = signal(np.ones((2, 32, 32), dtype="float32"), (15.5, 15.5))
    assert s.get_azimuthal_integral2d(npt=4, npt_azim=8, inplace=True) is None
    assert isinstance(s, diffgpu.PolarPatterns) and s.data.shape == (2, 4, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(npt=0), "npt must be a positive integer"),
    (dict(npt=10, npt_azim=-3), "npt_azim must be a positive integer"),
    (dict(npt=2.5), "npt must be a positive integer"),
    (dict(npt=10, radial_range=(20, 10)), "radial_range must satisfy start < stop"),
    (dict(npt=10, radial_range=(5, 5)), "empty or inverted"),
    (dict(npt=10, radial_range=(-1, 5)), "radial_range must start at 0"),
    (dict(npt=10, azimuth_range=(0, 400)), "azimuth_range may span at most 360"),
    (dict(npt=10, mask=np.zeros((31, 32), bool)), r"mask shape \(31, 32\) does not match"),
    (dict(npt=10, radial_unit="2theta_deg"), "need the detector scale in 1/Å"),
    (dict(npt=10, affine=[[1, 0], [0, 0]]), "invertible 2x2"),
    (dict(npt=10, dtype="int32"), "dtype must be float32 or float64"),
])
def test_bad_input_gets_a_clear_error(kwargs, match):
    s = signal(np.ones((2, 32, 32), dtype="float32"), (15.5, 15.5))
    with pytest.raises(ValueError, match=match):
        s.get_azimuthal_integral2d(**{"npt_azim": 8, **kwargs})


def test_radian_looking_degree_range_warns():
    s = signal(np.ones((1, 32, 32), dtype="float32"), (15.5, 15.5))
    with pytest.warns(UserWarning, match="azimuth_unit='rad'"):
        s.get_azimuthal_integral2d(npt=4, npt_azim=4, azimuth_range=(-np.pi, np.pi))


def test_beam_energy_needed_for_two_theta():
    s = signal(np.ones((1, 32, 32), dtype="float32"), (15.5, 15.5), scale=0.05)
    s.calibration.units = "1/nm"
    with pytest.raises(ValueError, match="beam_energy"):
        s.get_azimuthal_integral1d(npt=4, radial_unit="2theta_rad")


def test_off_detector_center_works():
    s = signal(np.ones((1, 32, 32), dtype="float32"), (-20.0, 50.0))
    p = s.get_azimuthal_integral2d(npt=20, npt_azim=36, mean=True)
    assert np.nanmax(np.abs(p.data - 1)) < 1e-5 and np.isfinite(p.data).sum() > 20


def test_geometry_is_built_once():
    from diffgpu.azimuthal import get_engine

    s = signal(np.ones((1, 32, 32), dtype="float32"), (15.2, 15.5))
    s.get_azimuthal_integral1d(npt=7)
    info_before = len(__import__("diffgpu.azimuthal", fromlist=["_ENGINES"])._ENGINES)
    s.get_azimuthal_integral1d(npt=7)
    assert len(__import__("diffgpu.azimuthal", fromlist=["_ENGINES"])._ENGINES) == info_before
    assert callable(get_engine)


# -- real GPU -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_gpu_matches_cpu(cupy, lazy, dtype):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 8), sig_shape=(96, 96), chunks=(3, 8), dtype=dtype,
                                      lazy=lazy)
    s.calibration.mask = np.eye(96, dtype=bool)
    cpu2 = s.get_azimuthal_integral2d(npt=40, npt_azim=90, mean=True)
    cpu1 = s.get_azimuthal_integral1d(npt=40)
    s.to_device()
    gpu2 = s.get_azimuthal_integral2d(npt=40, npt_azim=90, mean=True)
    gpu1 = s.get_azimuthal_integral1d(npt=40)
    for g, c in ((gpu2, cpu2), (gpu1, cpu1)):
        assert g.device == "gpu" and g._lazy == lazy
        if lazy:
            assert isinstance(g.data._meta, cupy.ndarray)
            g.compute()
            c.compute()
        assert isinstance(g.data, cupy.ndarray)
        g.to_host()
        np.testing.assert_allclose(g.data, c.data, rtol=1e-5, atol=1e-5 * np.nanmax(c.data))


@pytest.mark.gpu
def test_gpu_nan_pixels_masked(cupy):
    frames = np.ones((3, 32, 32), dtype="float32")
    frames[1, 5, 7] = np.nan
    s = signal(frames, (15.5, 15.5))
    s.to_device()
    p = s.get_azimuthal_integral2d(npt=10, npt_azim=12, mean=True, radial_range=(0, 15))
    p.to_host()
    np.testing.assert_allclose(p.data, 1.0, rtol=1e-5)


def test_the_engine_is_one_graph_node_shared_by_all_blocks():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32), chunks=(1, 2))
    p = s.get_azimuthal_integral2d(npt=8, npt_azim=12)
    graph = dict(p.data.__dask_graph__())
    engines = [k for k in graph if "IntegrationEngine" in str(k)]
    assert len(engines) == 1  # sent to each worker once, not with each of the 8 tasks
    assert p.data.npartitions == 8


def test_axes_in_different_reciprocal_units_are_converted_to_the_x_unit():
    rng = np.random.default_rng(7)
    data = rng.random((2, 40, 48)).astype("float32")
    same = signal(data, (23.0, 18.5), scale=(0.1, 0.2))
    same.calibration.units = "1/nm"
    mixed = signal(data, (23.0, 18.5), scale=(0.1, 0.02))
    mixed.calibration.units = ("1/nm", "1/Å")
    for s in (same, mixed):
        s.calibration.beam_energy = 200
    for kwargs in (dict(npt=16), dict(npt=16, npt_azim=12), dict(npt=16, curved_ewald=True),
                   dict(npt=16, radial_unit="2theta_deg")):
        get = "get_azimuthal_integral2d" if "npt_azim" in kwargs else "get_azimuthal_integral1d"
        ref, out = getattr(same, get)(**kwargs), getattr(mixed, get)(**kwargs)
        np.testing.assert_allclose(out.data, ref.data, rtol=1e-5)
        ref_ax, out_ax = ref.axes_manager.signal_axes[0], out.axes_manager.signal_axes[0]
        assert (out_ax.units, out_ax.scale) == (ref_ax.units, pytest.approx(ref_ax.scale))
    assert out.metadata.Integration.scale == pytest.approx([0.1, 0.2])


@pytest.mark.parametrize("units", [("1/nm", "px"), ("px", "mrad"), ("1/Å", None)])
def test_axes_in_units_that_cannot_be_converted_are_refused(units):
    s = signal(np.ones((1, 16, 16), dtype="float32"), (7.5, 7.5), scale=(0.1, 0.02))
    s.calibration.units = units
    with pytest.raises(ValueError, match=f"{units[0]!r}.*{units[1]!r}"):
        s.get_azimuthal_integral1d(npt=4)
