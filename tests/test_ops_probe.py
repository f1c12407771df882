"""Operations on diffraction patterns probed as a new user would: edge cases found wrong once."""

import numpy as np
import pytest

import diffgpu


def _beam(shape=(32, 32), x=12.3, y=17.6, sigma=2.0, peak=100.0, background=1.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) * peak + background


@pytest.mark.parametrize("dtype", ["float32", "uint32", ">u2"])
@pytest.mark.parametrize("lazy", [False, True])
def test_center_of_mass_threshold_leaves_a_masked_hot_pixel_out_of_the_mean(dtype, lazy):
    """A hot pixel in calibration.mask counts as 0, also in the frame's mean that the
    threshold is a multiple of: it must not raise the cut above the beam."""
    frame = np.round(_beam())
    mask = np.zeros(frame.shape, bool)
    mask[3, 28] = True
    hot, zeroed = frame.copy(), frame.copy()
    hot[3, 28] = 60000
    zeroed[3, 28] = 0
    signals = []
    for data in (hot, zeroed):
        s = diffgpu.DiffractionPatterns(np.stack([data, data]).astype(dtype))
        s.calibration.center = (0, 0)
        s.calibration.mask = mask
        signals.append(s.as_lazy() if lazy else s)
    for threshold in (0.5, 2.0):
        got = signals[0].center_of_mass(threshold=threshold).data
        ref = signals[1].center_of_mass(threshold=threshold).data
        got, ref = (np.asarray(a.compute() if lazy else a) for a in (got, ref))
        assert np.isfinite(ref).all()
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("hot", [
    [(0, 0), (0, 1)],              # a corner pixel and its neighbour along the edge
    [(0, 0), (1, 1)],              # a corner pixel and its diagonal neighbour
    [(0, 5), (0, 6), (0, 7)],      # three along the top edge
    [(15, 3), (15, 4), (15, 5)],   # three along the bottom edge
    [(6, 0), (7, 0), (8, 0)],      # three along the left edge
    [(15, 15), (14, 15)],          # the opposite corner
])
@pytest.mark.parametrize("nan", [False, True])
def test_hot_pixels_on_the_detector_edge_are_found_as_inside_it(hot, nan):
    """A pixel off the detector is no neighbour: an edge or corner pixel must not stand in
    for its own missing neighbours, so hot clusters on the edge are found as inside."""
    rng = np.random.default_rng(7)
    data = rng.uniform(50, 100, (3, 16, 16)).astype("float32")
    for y, x in hot:
        data[:, y, x] = 5000.0
    if nan:  # the path that ranks finite neighbours only
        data[0, 9, 9] = np.nan
    bad = diffgpu.DiffractionPatterns(data).find_bad_pixels()
    expected = sorted(hot + ([(9, 9)] if nan else []))
    assert sorted(map(tuple, np.argwhere(bad).tolist())) == expected


@pytest.mark.parametrize("shape", [(9, 11), (1, 5), (2, 2), (3, 1)])
@pytest.mark.parametrize("nan", [False, True])
def test_neighbour_median_on_the_detector_only_ranks_as_a_reference(shape, nan):
    import scipy.ndimage as ndi

    from diffgpu.cleanup import _neighbour_median

    rng = np.random.default_rng(8)
    pattern = rng.random(shape)
    if nan:
        pattern[0, 0] = np.nan
    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False

    def upper_median_of_finite(values):  # NaN stands for the pixels off the detector too
        values = np.sort(values[np.isfinite(values)])
        return values[values.size // 2] if values.size else np.nan

    ref = ndi.generic_filter(pattern, upper_median_of_finite, footprint=footprint,
                             mode="constant", cval=np.nan)
    np.testing.assert_array_equal(_neighbour_median(pattern, edges="leave_out"), ref)
    with pytest.raises(ValueError, match="edges must be"):
        _neighbour_median(pattern, edges="wrap")


def test_integration_records_the_calibrations_affine_it_applied():
    """metadata.Integration says which affine was applied, also when it came from
    calibration.affine (a ring-standard calibration) rather than the affine= argument."""
    s = diffgpu.DiffractionPatterns(np.ones((2, 16, 16), "float32"))
    s.calibration.center = (7.5, 7.5)
    matrix = [[1.1, 0.05], [0.0, 0.9]]
    s.calibration.affine = matrix
    for polar in (s.get_azimuthal_integral1d(5), s.get_azimuthal_integral2d(5, 4),
                  s.get_azimuthal_integral1d(5, affine=matrix)):
        np.testing.assert_allclose(polar.metadata.Integration.affine, np.ravel(matrix))
    s.calibration.affine = None
    assert s.get_azimuthal_integral1d(5).metadata.Integration.affine is None


@pytest.mark.parametrize("kwargs", [
    dict(method="blur", window=np.inf), dict(method="blur", sigma=np.inf),
    dict(method="blur", window=np.nan), dict(method="blur", window=0),
    dict(method="cross_correlate", radius=3, window=np.inf),
    dict(method="cross_correlate", radius=3, window=0),
    dict(method="cross_correlate", radius=3, window=-1),
    dict(method="cross_correlate", radius=3, window=np.nan),
    dict(method="cross_correlate", radius=np.nan),
])
def test_beam_finding_refuses_a_non_finite_or_non_positive_size(kwargs):
    """sigma, window and radius are sizes in pixels: a finite positive number, or a
    ValueError that names the option (not an OverflowError, nor a window of 0 silently
    leaving the beam on whole pixels)."""
    s = diffgpu.DiffractionPatterns(np.random.default_rng(0).random((2, 16, 16)).astype("float32"))
    bad = next(k for k in ("window", "sigma", "radius") if k in kwargs
               and not (np.isfinite(kwargs[k]) and kwargs[k] > 0))
    with pytest.raises(ValueError, match=f"{bad} must be positive and finite"):
        s.get_direct_beam_position(**kwargs)


@pytest.mark.parametrize("lazy", [False, True])
def test_center_of_mass_threshold_with_a_mask_on_a_device(standin_gpu, lazy):
    """The masked-pixel mean runs on the device too (on the strict CuPy stand-in): the
    masked hot pixel counts as 0, as if it held 0."""
    frame = np.round(_beam())
    mask = np.zeros(frame.shape, bool)
    mask[3, 28] = True
    signals = []
    for value in (60000, 0):
        frame[3, 28] = value
        s = diffgpu.DiffractionPatterns(np.stack([frame] * 4).astype("uint16"))
        s.calibration.center = (0, 0)
        s.calibration.mask = mask
        signals.append(s.as_lazy() if lazy else s)
    ref = signals[1].center_of_mass(threshold=2.0).data
    ref = np.asarray(ref.compute() if lazy else ref)
    dev = signals[0].deepcopy()
    dev.to_device()
    got = dev.center_of_mass(threshold=2.0)
    assert isinstance(got.data if not lazy else got.data.compute(), standin_gpu.ndarray)
    got.to_host()
    got = np.asarray(got.data.compute() if lazy else got.data)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("value", [np.nan, 60000.0, 0.0])
def test_correct_bad_pixels_fills_the_middle_of_a_cluster(lazy, value):
    """A bad pixel whose 8 neighbours are all bad too (the middle of a 3 x 3 or larger
    cluster) is filled from its corrected neighbours, not left at 0 (a hole that looks like
    a dead pixel, in integration and virtual images alike)."""
    rng = np.random.default_rng(9)
    data = rng.uniform(90, 110, (2, 16, 16)).astype("float32")
    bad = np.zeros((16, 16), bool)
    bad[5:10, 4:9] = True  # 5 x 5: two rings around the middle pixel
    bad[0:3, 13:16] = True  # 3 x 3 in a corner
    data[:, bad] = value
    s = diffgpu.DiffractionPatterns(data)
    s = s.as_lazy() if lazy else s
    out = s.correct_bad_pixels(mask=bad)
    fixed = np.asarray(out.data.compute() if lazy else out.data)
    assert np.isfinite(fixed).all()
    assert (fixed[:, bad] > 85).all() and (fixed[:, bad] < 115).all()
    np.testing.assert_array_equal(fixed[:, ~bad], data[:, ~bad])
    # a pixel with a good neighbour: the mean of its good neighbours, as before
    y, x = 5, 6
    ring = data[0, y - 1:y + 2, x - 1:x + 2][~bad[y - 1:y + 2, x - 1:x + 2]]
    np.testing.assert_allclose(fixed[0, y, x], ring.mean(), rtol=1e-6)
    # a detector with every pixel bad has nothing to fill from: 0, as before
    everything = diffgpu.DiffractionPatterns(data[:, :4, :4]).correct_bad_pixels(
        mask=np.ones((4, 4), bool))
    np.testing.assert_array_equal(everything.data, 0)


@pytest.mark.parametrize("lazy", [False, True])
def test_correct_bad_pixels_cluster_on_a_device(standin_gpu, lazy):
    rng = np.random.default_rng(10)
    data = rng.uniform(90, 110, (3, 12, 12)).astype("float32")
    bad = np.zeros((12, 12), bool)
    bad[3:8, 3:8] = True
    data[:, bad] = np.nan
    s = diffgpu.DiffractionPatterns(data)
    s = s.as_lazy() if lazy else s
    ref = s.correct_bad_pixels(mask=bad).data
    ref = np.asarray(ref.compute() if lazy else ref)
    dev = s.deepcopy()
    dev.to_device()
    out = dev.correct_bad_pixels(mask=bad)
    assert out.device == "gpu"
    out.to_host()
    got = np.asarray(out.data.compute() if lazy else out.data)
    assert np.isfinite(ref).all() and (ref[:, bad] > 85).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_shift_diffraction_with_lazy_x_and_y_stays_lazy():
    """shift_x and shift_y given apart as dask arrays or lazy signals (e.g. the two
    components of lazy beam shifts) are not computed at the call: on a scan larger than
    memory that read the whole file once more before anything was asked for."""
    import dask.array as da

    calls = []

    def counted(block):
        if block.size:
            calls.append(block.shape)
        return block

    rng = np.random.default_rng(2)
    data = rng.random((4, 5, 16, 12)).astype("float32")
    shifts = rng.uniform(-3, 3, (4, 5, 2)).astype("float32")
    lazy = diffgpu.LazyDiffractionPatterns(da.from_array(data, chunks=(2, 5, 16, 12)))
    eager = diffgpu.DiffractionPatterns(data)
    ref = eager.shift_diffraction(shifts[..., 0], shifts[..., 1]).data
    sx, sy = (da.from_array(shifts[..., i], chunks=(2, 5)).map_blocks(counted) for i in (0, 1))
    calls.clear()
    moved = lazy.shift_diffraction(sx, sy)
    assert calls == [] and moved._lazy
    np.testing.assert_allclose(moved.data.compute(), ref, atol=1e-6)
    # an eager signal's result is computed at once, from the same shifts
    np.testing.assert_allclose(eager.shift_diffraction(sx, sy).data, ref, atol=1e-6)
    # a lazy signal of one component and a scalar for the other
    beam = diffgpu.DirectBeamShifts(shifts).as_lazy()
    beam.data = beam.data.map_blocks(counted)
    component = beam.isig[0]
    calls.clear()
    moved = lazy.shift_diffraction(component, 1.5)
    assert calls == [] and moved._lazy
    np.testing.assert_allclose(moved.data.compute(),
                               eager.shift_diffraction(shifts[..., 0], 1.5).data, atol=1e-6)
    with pytest.raises(ValueError, match=r"shift_y of shape \(3,\) does not fit the scan shape"):
        lazy.shift_diffraction(sx, da.zeros(3))
