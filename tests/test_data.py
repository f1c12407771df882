"""Synthetic 4D-STEM data: lazy, reproducible, and true to its recorded truth."""

import numpy as np
import pytest

import diffgpu
from diffgpu.data import beam_centers, synthetic_4dstem


def test_lazy_chunked_and_cheap_at_any_size():
    big = synthetic_4dstem(nav_shape=(880, 880), sig_shape=(256, 256))
    assert big.data.nbytes > 100e9
    assert big.data.chunksize[-2:] == (256, 256)
    assert big.data.chunksize[0] * big.data.chunksize[1] * 256 * 256 * 2 <= 32 * 2**20
    frame = big.inav[500, 700].data.compute()
    assert frame.dtype == np.uint16 and frame.shape == (256, 256)


def test_same_chunk_same_data_every_time():
    a = synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), chunks=(2, 3), seed=3)
    b = synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), chunks=(2, 3), seed=3)
    np.testing.assert_array_equal(a.data.compute(), b.data.compute())
    # one chunk computed alone equals the same chunk within the whole
    np.testing.assert_array_equal(a.data[2:4, 3:6].compute(), a.data.compute()[2:4, 3:6])
    c = synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), chunks=(2, 3), seed=4)
    assert not np.array_equal(a.data.compute(), c.data.compute())


def test_noise_free_model_does_not_depend_on_chunking():
    a = synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), chunks=(1, 6), noise=False,
                         dtype="float32")
    b = synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), chunks=(4, 1), noise=False,
                         dtype="float32")
    np.testing.assert_array_equal(a.data.compute(), b.data.compute())


def test_truth_matches_the_data():
    s = synthetic_4dstem(nav_shape=(6, 5), sig_shape=(96, 96), noise=False, dtype="float32",
                         background=0.0, ring_counts=(0.0, 0.0, 0.0))
    truth = s.metadata.Synthetic.beam_centers
    data = s.data.compute()
    y, x = np.indices((96, 96))
    com_x = (data * x).sum(axis=(-2, -1)) / data.sum(axis=(-2, -1))
    com_y = (data * y).sum(axis=(-2, -1)) / data.sum(axis=(-2, -1))
    np.testing.assert_allclose(com_x, truth[..., 0], atol=0.01)
    np.testing.assert_allclose(com_y, truth[..., 1], atol=0.01)
    assert s.calibration.center == pytest.approx(tuple(s.metadata.Synthetic.center))


def test_rings_where_the_truth_says():
    s = synthetic_4dstem(nav_shape=(1, 1), sig_shape=(128, 128), noise=False, dtype="float32",
                         background=0.0, beam_counts=0.0, drift=(0, 0), wobble=0.0)
    frame = s.data.compute()[0, 0]
    cx, cy = s.metadata.Synthetic.center
    y, x = np.indices(frame.shape)
    r = np.hypot(x - cx, y - cy)
    for radius in s.metadata.Synthetic.ring_radii:
        near = np.abs(r - radius) < 0.5
        far = np.abs(r - radius - 5) < 0.5
        assert frame[near].mean() > 10 * frame[far].mean()


def test_counts_and_detector_saturation():
    s = synthetic_4dstem(nav_shape=(2, 2), sig_shape=(32, 32), beam_counts=1e9, lazy=False)
    assert s.data.dtype == np.uint16 and s.data.max() == 65535
    assert type(s) is diffgpu.DiffractionPatterns


def test_drift_spans_the_scan():
    c = beam_centers((5, 9), (50.0, 40.0), drift=(4.0, 3.0), wobble=0.0)
    assert c[0, -1, 0] - c[0, 0, 0] == pytest.approx(4.0)
    assert c[-1, 0, 1] - c[0, 0, 1] == pytest.approx(3.0)
    assert c.mean(axis=(0, 1)) == pytest.approx((50.0, 40.0))
    assert beam_centers((7,), (1.0, 2.0)).shape == (7, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nav_shape"):
        synthetic_4dstem(nav_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="sig_shape"):
        synthetic_4dstem(sig_shape=(64,))
    with pytest.raises(ValueError, match="same length"):
        synthetic_4dstem(ring_radii=(10, 20), ring_counts=(1,))
