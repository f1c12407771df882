"""Virtual imaging: exact detector weights, equality with a direct NumPy reference, errors."""

import numpy as np
import pytest
import hyperspy.api as hs

import diffgpu
from diffgpu.detectors import disc_weights, rectangle_weights


@pytest.fixture
def scan():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(5, 6), sig_shape=(48, 48), lazy=False)
    return s


def test_disc_and_annulus_weights_are_exact_areas():
    w = disc_weights((64, 64), (30.3, 33.9), 12.5)
    assert w.sum() == pytest.approx(np.pi * 12.5**2, rel=1e-9)
    ring = disc_weights((64, 64), (30.3, 33.9), 20.0, inner_radius=7.0)
    assert ring.sum() == pytest.approx(np.pi * (20.0**2 - 7.0**2), rel=1e-9)
    assert w.min() >= 0 and w.max() <= 1
    ellipse = disc_weights((64, 64), (31.5, 31.5), 10.0, scale=(0.5, 1.0))  # calibrated radius
    assert ellipse.sum() == pytest.approx(np.pi * 10.0**2 / 0.5, rel=1e-9)


def test_rectangle_weights():
    w = rectangle_weights((10, 10), 1.25, 2.0, 4.75, 3.5)
    assert w.sum() == pytest.approx(3.5 * 1.5)
    assert w[2, 1] == pytest.approx(0.25 * 0.5)


def test_virtual_images_equal_direct_numpy_reference(scan):
    cx, cy = scan.calibration.center
    bf = hs.roi.CircleROI(cx=0, cy=0, r=4)
    adf = hs.roi.CircleROI(cx=0, cy=0, r=20, r_inner=8)
    box = hs.roi.RectangularROI(left=-10, top=2, right=-3, bottom=9)
    mask = np.zeros((48, 48), bool)
    mask[::7, ::5] = True
    images = scan.get_virtual_image([bf, adf, box, mask])
    assert isinstance(images, diffgpu.VirtualImages)
    assert images.data.shape == (4, 5, 6)
    assert images.axes_manager.navigation_axes[0].name == "detector"
    weights = [disc_weights((48, 48), (cx, cy), 4), disc_weights((48, 48), (cx, cy), 20, inner_radius=8),
               rectangle_weights((48, 48), cx - 10, cy + 2, cx - 3, cy + 9), mask.astype(float)]
    for img, w in zip(images.data, weights):
        ref = (scan.data.astype(float) * w).sum(axis=(-2, -1))
        np.testing.assert_allclose(img, ref, rtol=1e-5)


def test_lazy_equals_eager_and_single_detector(scan):
    roi = hs.roi.CircleROI(cx=0, cy=0, r=6)
    eager = scan.get_virtual_image(roi)
    assert type(eager) is diffgpu.VirtualImages and eager.data.shape == (5, 6)
    lazy = scan.as_lazy().get_virtual_image(roi)
    assert type(lazy) is diffgpu.LazyVirtualImages
    lazy.compute()
    np.testing.assert_allclose(lazy.data, eager.data, rtol=1e-6)
    integrated = scan.get_integrated_intensity(roi)
    np.testing.assert_allclose(integrated.data, eager.data)
    assert scan.get_virtual_image([roi], normalize=True).data[0].max() < eager.data.max()


def test_scan_axes_are_kept(scan):
    scan.axes_manager.navigation_axes[0].scale = 2.5
    scan.axes_manager.navigation_axes[0].units = "nm"
    img = scan.get_virtual_image(hs.roi.CircleROI(cx=0, cy=0, r=6))
    assert img.axes_manager.signal_axes[0].scale == 2.5 and img.axes_manager.signal_axes[0].units == "nm"


def test_line_scan_gives_virtual_profiles():
    s = diffgpu.DiffractionPatterns(np.ones((7, 16, 16), dtype="uint16"))
    img = s.get_virtual_image([np.ones((16, 16)), np.eye(16)])
    assert type(img) is diffgpu.VirtualProfiles
    assert img.data.shape == (2, 7) and img.axes_manager.navigation_axes[0].name == "detector"
    np.testing.assert_allclose(img.data[0], 256)


@pytest.mark.parametrize("rois", [hs.roi.CircleROI(cx=8, cy=8, r=4),
                                  [hs.roi.CircleROI(cx=8, cy=8, r=4), np.eye(16)]])
def test_line_scan_is_the_same_kind_of_signal_eager_and_lazy(rois):
    """A line scan's virtual image is diffgpu's VirtualProfiles, eagerly and lazily (was
    HyperSpy's Signal1D, whose to_host() refuses lazy data: `diffgpu virtual` crashed)."""
    s = diffgpu.DiffractionPatterns(np.ones((6, 16, 16), dtype="uint16"))
    eager = s.get_virtual_image(rois)
    lazy = s.as_lazy().get_virtual_image(rois)
    assert type(eager) is diffgpu.VirtualProfiles
    assert type(lazy) is diffgpu.LazyVirtualProfiles
    assert eager.axes_manager.signal_shape == lazy.axes_manager.signal_shape == (6,)
    assert lazy.metadata.Signal.signal_type == "virtual_images"
    lazy.to_host()  # diffgpu's: a graph step, lazy or not
    lazy.compute()
    np.testing.assert_allclose(lazy.data, eager.data)


def test_line_scan_virtual_profiles_save_and_load_back(tmp_path):
    s = diffgpu.DiffractionPatterns(np.ones((5, 16, 16), dtype="uint16"))
    s.get_virtual_image([hs.roi.CircleROI(cx=8, cy=8, r=4), np.eye(16)]).save(
        tmp_path / "v.zspy", show_progressbar=False)
    back = diffgpu.load(tmp_path / "v.zspy", lazy=False)
    assert type(back) is diffgpu.VirtualProfiles and back.data.shape == (2, 5)
    assert type(diffgpu.load(tmp_path / "v.zspy")) is diffgpu.LazyVirtualProfiles


@pytest.mark.parametrize("bad, err, match", [
    (hs.roi.Point1DROI(3), TypeError, "not a supported virtual detector"),
    (np.ones((10, 48)), ValueError, r"detector mask shape \(10, 48\) does not match"),
    (hs.roi.CircleROI(cx=500, cy=500, r=3), ValueError, "covers no pixel"),
    ([], ValueError, "no virtual detector"),
    (np.full((48, 48), np.nan), ValueError, "NaN"),
])
def test_bad_detectors(scan, bad, err, match):
    with pytest.raises(err, match=match):
        scan.get_virtual_image(bad)


def test_standin_device_in_device_out(standin_gpu, scan):
    from conftest import StandInDeviceArray

    roi = hs.roi.CircleROI(cx=0, cy=0, r=6)
    ref = scan.get_virtual_image(roi).data
    scan.to_device()
    img = scan.get_virtual_image(roi)
    assert isinstance(img.data, StandInDeviceArray) and img.device == "gpu"
    img.to_host()
    np.testing.assert_allclose(img.data, ref, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("lazy", [False, True])
def test_gpu_virtual_images_match_cpu(cupy, lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 8), sig_shape=(64, 64), lazy=lazy)
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=4), hs.roi.CircleROI(cx=0, cy=0, r=25, r_inner=10)]
    cpu = s.get_virtual_image(rois)
    s.to_device()
    gpu = s.get_virtual_image(rois)
    assert gpu.device == "gpu"
    if lazy:
        assert isinstance(gpu.data._meta, cupy.ndarray)
        cpu.compute()
        gpu.compute()
    gpu.to_host()
    np.testing.assert_allclose(gpu.data, cpu.data, rtol=1e-5)


def _masked_scan(dtype="float32"):
    """A scan with a hot masked column, a NaN in a masked pixel and its mask."""
    rng = np.random.default_rng(4)
    data = rng.poisson(5.0, (2, 3, 16, 16)).astype(dtype)
    data[..., :, 8] = 1000
    mask = np.zeros((16, 16), bool)
    mask[:, 8] = True
    if np.dtype(dtype).kind == "f":
        data[0, 1, 4, 8] = np.nan
    s = diffgpu.DiffractionPatterns(data)
    s.calibration.center = None
    s.calibration.mask = mask
    return s, data, mask


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint16"])
def test_virtual_images_leave_out_calibration_mask(dtype):
    s, data, mask = _masked_scan(dtype)
    rois = [hs.roi.RectangularROI(-20, -20, 20, 20), hs.roi.CircleROI(cx=0, cy=0, r=5),
            np.ones((16, 16)).tolist()]
    clean = np.where(mask, 0, data).astype(float)
    ring = disc_weights((16, 16), (7.5, 7.5), 5) * ~mask
    ref = np.stack([clean.sum(axis=(-2, -1)), (clean * ring).sum(axis=(-2, -1)),
                    clean.sum(axis=(-2, -1))])
    eager = s.get_virtual_image(rois)
    np.testing.assert_allclose(eager.data, ref, rtol=1e-5)
    lazy = s.as_lazy().get_virtual_image(rois)
    lazy.compute()
    np.testing.assert_allclose(lazy.data, ref, rtol=1e-5)
    # normalised: the mean over the unmasked pixels
    mean = s.get_virtual_image(hs.roi.RectangularROI(-20, -20, 20, 20), normalize=True).data
    np.testing.assert_allclose(mean, clean.sum(axis=(-2, -1)) / (~mask).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="covers only pixels of calibration.mask"):
        s.get_virtual_image(hs.roi.RectangularROI(0, -3, 1, 3))  # column 8 only


def test_unmasked_nan_spoils_only_the_detectors_that_weigh_it():
    data = np.ones((3, 16, 16), "float32")
    data[1, 2, 2] = np.nan  # outside the bright field, inside the annulus
    data[2, 7, 7] = np.inf  # inside the bright field
    s = diffgpu.DiffractionPatterns(data)
    s.calibration.center = None
    bf, adf = hs.roi.CircleROI(cx=0, cy=0, r=3), hs.roi.CircleROI(cx=0, cy=0, r=9, r_inner=5)
    for lazy in (False, True):
        img = (s.as_lazy() if lazy else s).get_virtual_image([bf, adf])
        if lazy:
            img.compute()
        np.testing.assert_allclose(img.data[0, :2], np.pi * 9, rtol=1e-5)
        assert np.isnan(img.data[0, 2]) and np.isnan(img.data[1, 1])
        ring = disc_weights((16, 16), (7.5, 7.5), 9, inner_radius=5).sum()  # cut by the edges
        np.testing.assert_allclose(img.data[1, [0, 2]], ring, rtol=1e-5)


def test_weighted_sums_of_non_finite_frames_every_path():
    from diffgpu.kernels.reduce import weighted_sums

    rng = np.random.default_rng(2)
    frames = rng.uniform(1, 2, (40, 12)).astype("float32")
    frames[3, 0] = np.nan
    frames[35, 5] = -np.inf
    weights = np.zeros((12, 2), "float32")
    weights[0, 0] = weights[1:, 1] = 1
    clean = np.where(np.isfinite(frames), frames, 0).astype(float)
    for dtype in ("float32", "float64", ">f4", "float16"):
        f = frames.astype(dtype)
        c = np.where(np.isfinite(f), f, 0).astype(float) if dtype == "float16" else clean
        got = weighted_sums(f, weights)
        ref = c @ weights
        ref[3, 0] = ref[35, 1] = np.nan
        np.testing.assert_allclose(got, ref, rtol=1e-3)
        np.testing.assert_allclose(weighted_sums(f, weights, nonfinite="zero"), c @ weights,
                                   rtol=1e-3)
        # the threshold's mean counts non-finite pixels as 0 too
        cut = c >= 0.9 * c.mean(axis=1, keepdims=True)
        ref = np.where(cut, c, 0) @ weights
        np.testing.assert_allclose(weighted_sums(f, weights, 0.9, nonfinite="zero"), ref, rtol=1e-3)
        ref[3, 0] = ref[35, 1] = np.nan
        np.testing.assert_allclose(weighted_sums(f, weights, 0.9), ref, rtol=1e-3)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        weighted_sums(frames, weights, nonfinite="ignore")


def test_mib_read_in_place_leaves_out_the_mask_as_in_memory(tmp_path):
    from diffgpu.readers.mib import write_mib
    from diffgpu.sources import stored_frames

    _, data, mask = _masked_scan("uint16")
    path = str(tmp_path / "scan.mib")
    write_mib(path, data)
    s = diffgpu.load(path)
    assert stored_frames(s.data) is not None  # read in place
    s.calibration.center = None
    s.calibration.mask = mask
    mem = diffgpu.DiffractionPatterns(data)
    mem.calibration.center = None
    mem.calibration.mask = mask
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=5), hs.roi.RectangularROI(-20, -20, 20, 20)]
    got = s.get_virtual_image(rois)
    got.compute()
    np.testing.assert_allclose(got.data, mem.get_virtual_image(rois).data, rtol=1e-6)
    np.testing.assert_allclose(got.data[1], np.where(mask, 0, data).sum(axis=(-2, -1)), rtol=1e-6)


@pytest.mark.parametrize("roi, match", [
    (hs.roi.CircleROI(), r"CircleROI cx, cy and r are not set"),
    (hs.roi.CircleROI(cx=0, cy=0, r=-4), r"CircleROI r is not set .*HyperSpy leaves a negative radius"),
    (hs.roi.RectangularROI(3, 3, 0, 0), r"RectangularROI right and bottom are not set .*right > left"),
    (hs.roi.CircleROI(cx=np.nan, cy=0, r=2), r"CircleROI cx is not set to a finite number"),
])
def test_undefined_rois_are_named(scan, roi, match):
    with pytest.raises(ValueError, match=match):
        scan.get_virtual_image(roi)
    with pytest.raises(ValueError, match=match):
        scan.as_lazy().get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=3), roi])


def test_nested_list_mask_is_one_detector(scan):
    mask = np.zeros((48, 48), bool)
    mask[20:30, 10:40] = True
    ref = scan.get_virtual_image(mask).data
    for nested in (mask.tolist(), mask.astype(int).tolist(), tuple(map(tuple, mask.tolist()))):
        img = scan.get_virtual_image(nested)
        assert img.data.shape == (5, 6)
        np.testing.assert_allclose(img.data, ref)
    two = scan.get_virtual_image([mask.tolist(), mask])  # a list of two masks
    assert two.data.shape == (2, 5, 6)
    with pytest.raises(ValueError, match=r"detector mask shape \(2, 3\) does not match"):
        scan.get_virtual_image([[1, 0, 1], [0, 1, 0]])


def test_all_zero_mask_error_names_its_shape_not_its_values(scan):
    with pytest.raises(ValueError) as info:
        scan.get_virtual_image(np.zeros((48, 48)))
    assert "mask of shape (48, 48)" in str(info.value)
    assert "array(" not in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("lazy", [False, True])
def test_standin_device_virtual_images_leave_out_the_mask(standin_gpu, lazy):
    s, data, mask = _masked_scan("float32")
    s.data[1, 2, 3, 3] = np.nan  # unmasked, inside the rectangle, outside the disc
    rois = [hs.roi.RectangularROI(-20, -20, 20, 20), hs.roi.CircleROI(cx=0, cy=0, r=3)]
    if lazy:
        s = s.as_lazy()
    ref = s.get_virtual_image(rois)
    if lazy:
        ref.compute()
    dev = s.deepcopy()
    dev.to_device()
    got = dev.get_virtual_image(rois)
    got.to_host()
    if lazy:
        got.compute()
    np.testing.assert_allclose(got.data, ref.data, rtol=1e-5)
    assert np.isfinite(ref.data[:, 0, 1]).all()  # the masked NaN is left out
    assert np.isnan(ref.data[0, 1, 2]) and np.isfinite(ref.data[1, 1, 2])


def _annulus(r, r_inner, check=True):
    """A CircleROI with these radii, however HyperSpy's own checks would change them."""
    roi = hs.roi.CircleROI(cx=0, cy=0, r=40, r_inner=0)
    roi._bounds_check = check
    roi.r_inner, roi.r = r_inner, r  # (HyperSpy then lets r come down to r_inner)
    return roi


@pytest.mark.parametrize("roi, match", [
    (_annulus(5, 5), r"r_inner \(5\) must be smaller than r \(5\)"),
    (_annulus(5, 10, check=False), r"r_inner \(10\) must be smaller than r \(5\)"),
    (_annulus(5, -2), r"r_inner must be 0 or more"),
    (_annulus(5, np.nan), r"r_inner must be a finite number"),
    (hs.roi.CircleROI(cx=0, cy=0, r=np.inf), r"r must be a finite positive number; got inf"),
    (hs.roi.CircleROI(cx=0, cy=0, r=np.nan), r"r must be a finite positive number; got nan"),
    (hs.roi.CircleROI(cx=0, cy=0, r=0), r"r must be a finite positive number; got 0"),
])
def test_circle_radii_are_checked(scan, roi, match):
    """An annulus whose inner radius is not below its outer one, or a radius that is not a
    finite positive number, is refused: not computed as a disc (a NaN r_inner was read as 0),
    nor explained as a negative radius HyperSpy left undefined."""
    for lazy in (False, True):
        s = scan.as_lazy() if lazy else scan
        with pytest.raises(ValueError, match=match) as info:
            s.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=3), roi])
        assert "HyperSpy leaves" not in str(info.value)


@pytest.mark.parametrize("rois", [[("annulus", (15, 15), 5, 10)], "disc", [["a", "b"]]])
def test_a_detector_that_is_no_roi_nor_mask_is_named(rois):
    """Tuples of words and numbers, strings, lists of words: a TypeError that says what a
    virtual detector can be (not NumPy's message about inhomogeneous shapes)."""
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(32, 32))
    with pytest.raises(TypeError, match=r"detector's shape \(32, 32\).*CircleROI"):
        s.get_virtual_image(rois)


def test_a_ring_series_of_64_detectors_is_weighed_once(monkeypatch):
    """The discs' weights are kept by bytes, not by count: 64 annuli (a ring series) were
    weighed again at every call when 32 were kept, 100 ms of each call at 256 x 256."""
    from diffgpu import detectors

    calls = []
    real = detectors._disc_weights

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(detectors, "_disc_weights", counted)
    edges = np.linspace(1.0, 30.0, 65)
    for _ in range(2):
        for i in range(64):
            detectors.disc_weights((64, 64), (31.7, 32.2), edges[i + 1], inner_radius=edges[i])
    assert len(calls) == 64


def test_one_frame_is_summed_as_accurately_as_many():
    """A block of one frame went to BLAS's matrix-vector product, ten times less accurate in
    float32 than the matrix product (chunks of one frame, a task's last frame): a thresholded
    centre of mass of a 512 x 512 frame came out 1e-3 px off."""
    from diffgpu.kernels.reduce import weighted_sums

    rng = np.random.default_rng(0)
    y, x = np.indices((512, 512))
    frames = (rng.poisson(5, (4, 512, 512)) + 3000 * (np.hypot(x - 250.3, y - 260.7) < 20))
    frames = frames.astype(np.uint32).reshape(4, -1)
    w = np.stack([np.ones(x.size), x.ravel(), y.ravel()], 1).astype(np.float32)
    f64 = frames.astype(np.float64)
    expected = (f64 * (f64 >= f64.mean(axis=1, keepdims=True))) @ w.astype(np.float64)
    for i in range(4):
        got = weighted_sums(frames[i:i + 1], w, threshold=1.0)[0]
        centre = got[1:] / got[0]
        np.testing.assert_allclose(centre, expected[i, 1:] / expected[i, 0], atol=1e-4)
