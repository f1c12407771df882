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


def test_line_scan_gives_a_plain_signal():
    s = diffgpu.DiffractionPatterns(np.ones((7, 16, 16), dtype="uint16"))
    img = s.get_virtual_image([np.ones((16, 16)), np.eye(16)])
    assert img.data.shape == (2, 7)
    np.testing.assert_allclose(img.data[0], 256)


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
