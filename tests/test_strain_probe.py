"""Strain mapping results as a py4DSTEM user checks them: measured vacuum probes as templates
(hot pixels, bright rims), lattices and scans of awkward kinds, against the truth that
``synthetic_nbed`` keeps."""

import warnings

import numpy as np
import pytest

from diffgpu.kernels.disks import probe_image
from diffgpu.synthetic_nbed import synthetic_nbed

G = ((17.0, 1.5), (-4.0, 15.0))  # synthetic_nbed's reference lattice, pixels


def _truth(s):
    md = s.metadata.Synthetic
    return np.stack([md.exx, md.eyy, md.exy, md.theta], axis=-1)


def _probe(shape=(48, 48), centre=(23.3, 24.6), radius=5.0, level=1000.0):
    """A flat vacuum probe with anti-aliased edges, off the middle of its image."""
    y, x = np.indices(shape)
    return np.clip(radius + 0.5 - np.hypot(x - centre[0], y - centre[1]), 0, 1) * level


@pytest.fixture(scope="module")
def scan():
    return synthetic_nbed(nav_shape=(4, 4), sig_shape=(128, 128), disk_radius=5.0, dose=3e6,
                          seed=2)


@pytest.mark.parametrize("pixels", [(slice(40, 41), slice(3, 4)), (slice(5, 7), slice(30, 32))])
def test_hot_pixel_in_the_vacuum_probe_is_ignored(scan, pixels):
    """A hot pixel (or a 2 x 2 cosmic ray) 50 x the probe's level in the vacuum probe image,
    as a detector gives one: the template was the hot pixel alone, the disks noise, and
    get_strain_map raised BasisError."""
    clean = _probe()
    hot = clean.copy()
    hot[pixels] = 50 * clean.max()
    img_hot, r_hot = probe_image(hot)
    img, r = probe_image(clean)
    assert abs(r_hot - r) < 0.05
    np.testing.assert_allclose(img_hot, img, atol=1e-4)
    v = scan.find_bragg_disks(template=hot)
    strain = v.get_strain_map(reference=(slice(0, 1), slice(0, 1)))
    err = strain.data - _truth(scan)
    assert np.sqrt(np.mean(err[..., :3] ** 2)) < 2e-4
    assert np.sqrt(np.mean(err[..., 3] ** 2)) < 0.01


def test_titles_of_an_untitled_scan():
    """An untitled scan's disks were titled "Bragg disks of" and its strain map "Strain of
    Bragg disks of"."""
    import diffgpu

    s = synthetic_nbed(nav_shape=(1, 2), sig_shape=(96, 96), dose=3e6)
    s.metadata.General.title = ""
    v = s.find_bragg_disks(radius=4.0)
    assert v.metadata.General.title == "Bragg disks"
    assert v.get_strain_map(reference=G).metadata.General.title == "Strain"
    one = diffgpu.DiffractionPatterns(s.data[0, 1])
    assert one.find_bragg_disks(radius=4.0).get_strain_map().metadata.General.title == "Strain"
    s.metadata.General.title = "Si scan"
    v = s.find_bragg_disks(radius=4.0)
    assert v.metadata.General.title == "Bragg disks of Si scan"
    assert v.get_strain_map(reference=G).metadata.General.title == "Strain of Si scan"


def test_reference_region_across_two_grains_is_reported():
    """A reference region half in each of two grains (turned 25 degrees apart), or the whole
    scan's median: no fit is an outlier of the other half, so the mean (median) of the two
    lattices, a lattice no position has, became the reference without a word (every strain
    off by 3 %, theta by 12.5 degrees)."""
    theta = np.zeros((2, 4))
    theta[:, 2:] = 25.0
    s = synthetic_nbed(nav_shape=(2, 4), sig_shape=(128, 128), dose=3e6,
                       strain=(0.0, 0.0, 0.0, theta))
    v = s.find_bragg_disks(radius=4.0)
    with pytest.warns(UserWarning, match="more than one grain"):
        v.get_strain_map(reference=(slice(0, 2), slice(1, 3)))
    with pytest.warns(UserWarning, match="more than one grain"):  # the median of the scan
        v.get_strain_map()
    with warnings.catch_warnings():  # one grain: nothing to say
        warnings.simplefilter("error")
        strain = v.get_strain_map(reference=(slice(0, 2), slice(0, 2)))
    np.testing.assert_allclose(strain.data[..., 3], theta, atol=0.01)
    # a region of one grain with its own strain up to 1 % is no cause for a warning
    s = synthetic_nbed(nav_shape=(6, 6), sig_shape=(128, 128), dose=3e6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.find_bragg_disks(radius=4.0).get_strain_map(reference=(slice(0, 6), slice(0, 6)))


@pytest.mark.parametrize("basis, reference", [
    (G, (G[1], G[0])),                                  # the reference's vectors swapped
    (G, (G[0], (-G[1][0], -G[1][1]))),                  # ... or one of them reversed
    (None, ((0.0, 2 * 13.856406), (16.0, 0.0))),        # a left-handed centred cell (hexagonal)
    (((16.0, 0.0), (8.0, 13.856406)), ((8.0, 13.856406), (16.0, 0.0))),
])
def test_reference_vectors_of_the_other_hand(basis, reference):
    """Reference vectors that are the basis' lattice in another order or hand (a left-handed
    cell, det < 0): they were compared vector by vector with fits of the right-handed basis,
    and every position read strains of 0.3-1.9 and theta of 30-150 degrees, without a word."""
    rng = np.random.default_rng(4)
    n = 4
    truth = (rng.uniform(-0.02, 0.02, (3, 1, n)).tolist() + [rng.uniform(-3, 3, (1, n))])
    for part in truth:
        part[0][0] = 0.0
    hexagonal = basis is not G
    lattice = dict(g1=(16.0, 0.0), g2=(8.0, 13.856406)) if hexagonal else dict(g1=G[0], g2=G[1])
    s = synthetic_nbed(nav_shape=(1, n), sig_shape=(128, 128), dose=3e6, strain=truth, **lattice)
    v = s.find_bragg_disks(radius=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the centred cell's own warning
        strain = v.get_strain_map(basis=basis, reference=reference)
    err = strain.data - _truth(s)
    assert np.abs(err[..., :3]).max() < 5e-4, err
    assert np.abs(err[..., 3]).max() < 0.02, err


def test_lazy_default_reference_finds_each_disk_once(monkeypatch):
    """A lazy scan with the default reference (the median of all fits): the fits were
    computed for the median, then the strain map's graph found every disk again (2.25 x the
    scan's frames through the disk finder, the file read twice)."""
    import dask.array as da

    import diffgpu
    from diffgpu.kernels import disks as kernel

    s = synthetic_nbed(nav_shape=(4, 4), sig_shape=(96, 96), dose=3e6)
    data = np.tile(s.data, (2, 2, 1, 1))  # 8 x 8
    lazy = diffgpu.DiffractionPatterns(data).as_lazy()
    lazy.data = da.from_array(data, chunks=(2, 8, 96, 96))
    lazy.calibration.center = s.calibration.center
    seen = []
    call = kernel.DiskFinder.__call__
    monkeypatch.setattr(kernel.DiskFinder, "__call__",
                        lambda self, frames: seen.append(len(frames)) or call(self, frames))
    strain = lazy.find_bragg_disks(radius=4.0).get_strain_map()
    strain.compute()
    assert sum(seen) <= 64 + 32  # every frame once, and the basis' first 32 frames
    eager = diffgpu.DiffractionPatterns(data)
    eager.calibration.center = s.calibration.center
    expected = eager.find_bragg_disks(radius=4.0).get_strain_map()
    np.testing.assert_array_equal(np.asarray(strain.data), expected.data)


def test_lazy_default_reference_on_device_blocks(standin_gpu):
    """The fits kept for a lazy map's default reference stay device blocks (CuPy stand-in)."""
    s = synthetic_nbed(nav_shape=(4, 4), sig_shape=(96, 96), dose=3e6)
    host = s.find_bragg_disks(radius=4.0).get_strain_map()
    lazy = s.as_lazy()
    lazy.to_device()
    strain = lazy.find_bragg_disks(radius=4.0).get_strain_map()
    assert strain.device == "gpu"
    strain.to_host()
    strain.compute()
    np.testing.assert_allclose(np.asarray(strain.data), host.data, atol=2e-5)
