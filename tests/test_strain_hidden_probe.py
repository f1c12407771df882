"""Strain mapping on NBED data as recorded: a direct beam far brighter than the Bragg disks,
checked against the truth that ``synthetic_nbed`` keeps."""

import numpy as np
import pytest

from diffgpu.kernels.disks import DiskFinder, disk_image
from diffgpu.synthetic_nbed import synthetic_nbed


def _bright_beam(factor, nav=(1, 3), seed=0):
    """NBED frames whose direct beam is ``factor`` x brighter than synthetic_nbed's (3 x the
    first-order disks there), 3e6 electrons in the disks, Poisson noise."""
    rng = np.random.default_rng(seed)
    exx, eyy, exy, theta = (rng.uniform(-0.01, 0.01, nav), rng.uniform(-0.01, 0.01, nav),
                            rng.uniform(-0.005, 0.005, nav), rng.uniform(-0.3, 0.3, nav))
    for v in (exx, eyy, exy, theta):
        v[0, 0] = 0.0
    s = synthetic_nbed(nav, (128, 128), dose=None, strain=(exx, eyy, exy, theta))
    y, x = np.indices((128, 128))
    beam = np.hypot(x - 63.5, y - 63.5) < 6
    data = s.data.copy()
    scale = 3e6 / data.reshape(-1, 128 * 128).sum(axis=1).reshape(nav)
    data[..., beam] *= factor
    s.data = rng.poisson(data * scale[..., None, None]).astype(np.float32)
    return s


@pytest.mark.parametrize("factor", [30, 100])
def test_bright_direct_beam_keeps_the_bragg_disks(factor):
    """A direct beam 100-300 x the first-order disks (real NBED): relative_threshold of the
    strongest peak kept 1 disk of 51 (BasisError) at 100 x and 9 at 30 x (strain 3.5e-4 off)."""
    s = _bright_beam(factor)
    v = s.find_bragg_disks(radius=4.0)
    assert v.n_disks().min() >= 45
    strain = v.get_strain_map(reference=(slice(0, 1), slice(0, 1)))
    md = s.metadata.Synthetic
    truth = np.stack([md.exx, md.eyy, md.exy, md.theta], axis=-1)
    err = strain.data - truth
    assert np.sqrt(np.mean(err[..., :3] ** 2)) < 2e-4
    assert np.sqrt(np.mean(err[..., 3] ** 2)) < 0.01


def test_bright_beam_threshold_same_on_host_and_array_paths():
    """The host (numba) and array (GPU) peak finders apply the same relative threshold; a
    vacuum frame (the direct beam alone) still has one disk, not its noise."""
    s = _bright_beam(100)
    frames = s.data[0].copy()
    y, x = np.indices((128, 128))
    vacuum = (np.hypot(x - 63.5, y - 63.5) <= 4).astype(np.float32)
    frames[2] = np.random.default_rng(1).poisson(vacuum * 3e6 / vacuum.sum())
    finder = DiskFinder((128, 128), disk_image(4.0), min_spacing=4, edge=5, max_disks=128)
    host = finder(frames)
    idx, _ = finder._device_peaks(finder.correlate(frames), np)
    n_host = np.isfinite(host[..., 0]).sum(axis=1)
    np.testing.assert_array_equal(n_host, (idx >= 0).sum(axis=1))
    assert n_host[:2].min() >= 45 and n_host[2] == 1
    # a normal pattern (direct beam 3 x the disks) keeps its threshold: of the strongest
    normal = synthetic_nbed((1,), (128, 128), dose=3e6).data
    weak = DiskFinder((128, 128), disk_image(4.0), min_spacing=4, edge=5,
                      relative_threshold=0.2)(normal)
    top = np.nanmax(weak[0, :, 2])
    assert np.nanmin(weak[0, :, 2]) > 0.2 * top * 0.99


def test_detector_of_awkward_size_is_correlated_at_a_fast_fft_size():
    """A prime (251) or 5 x 103 (515, a Merlin quad with its gap) detector side made the FFTs
    3-6 x slower per pixel than 256 or 512: the frames are zero-padded to a size of small
    primes, and the disks are those of the same frame padded by hand."""
    finder = DiskFinder((251, 251), disk_image(4.0), min_spacing=4, edge=5, max_disks=256)
    assert finder.fft_shape == (256, 256)
    assert DiskFinder((515, 515), disk_image(4.0)).fft_shape == (540, 540)
    s = synthetic_nbed((1, 2), (251, 251), dose=3e6)
    frames = s.data[0]
    padded = np.zeros((2, 256, 256), np.float32)
    padded[:, :251, :251] = frames
    direct = DiskFinder((256, 256), disk_image(4.0), min_spacing=4, edge=5, max_disks=256)
    found, expected = finder(frames), direct(padded)
    for a, b in zip(found, expected):
        b = b[np.all(b[:, :2] < 251 - 5, axis=1)]  # the same edge on the 251 px detector
        a = a[np.isfinite(a[:, 0])]
        assert len(a) == len(b) > 200
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_awkward_size_and_bright_beam_on_device_blocks(standin_gpu):
    """The array (GPU) path gives the same disks as the host on a padded detector and with a
    bright direct beam (CuPy stand-in)."""
    s = _bright_beam(100)
    big = np.zeros((1, 3, 131, 129), np.float32)
    big[..., :128, :128] = s.data
    s.data = big
    host = s.find_bragg_disks(radius=4.0)
    s.to_device()
    dev = s.find_bragg_disks(radius=4.0)
    dev.to_host()
    np.testing.assert_array_equal(dev.n_disks(), host.n_disks())
    assert host.n_disks().min() >= 45
    np.testing.assert_allclose(dev.data[..., :2], host.data[..., :2], atol=2e-3, equal_nan=True)


def test_too_few_reference_disks_names_the_thresholds():
    """Too few disks for a basis: the error names relative_threshold (the one that hides the
    disks beside a bright beam), not only "the detection threshold"."""
    import diffgpu

    data = np.full((1, 2, 8, 3), np.nan, np.float32)
    data[..., :3, :] = [[10.0, 10.0, 5.0], [27.0, 11.5, 1.0], [6.0, 25.0, 1.0]]
    v = diffgpu.BraggVectors(data)
    with pytest.raises(ValueError, match="relative_threshold"):
        v.get_strain_map(reference=(slice(0, 1), slice(0, 1)))
