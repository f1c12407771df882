"""The compiled integration-matrix build against the NumPy reference build."""

import numpy as np
import pytest

from diffgpu.geometry import PolarGeometry, integration_matrix
from diffgpu.kernels import geometry_build


def assert_same_matrix(geom, mask=None):
    got = integration_matrix(geom, mask)
    ref = integration_matrix(geom, mask, _reference=True)
    assert got.shape == ref.shape
    assert got.data.dtype == np.float32
    assert got.has_canonical_format
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    # one float32 rounding at most; the builds agree bit for bit where NumPy's and libm's
    # atan2 agree, and otherwise differ by float64 rounding of the pixel area (1e-16 of it)
    diff = np.abs(got.data.astype(np.float64) - ref.data)
    assert np.all((diff <= np.spacing(ref.data)) | (diff <= 1e-15)), diff.max()
    return got


def random_geometry(rng):
    ny, nx = (int(v) for v in rng.integers(3, 28, 2))
    kind = rng.integers(4)
    if kind == 0:  # on a pixel corner or centre: corners on bin edges and wedge rays
        center = (float(rng.integers(0, nx)) + 0.5 * rng.integers(2),
                  float(rng.integers(0, ny)) + 0.5 * rng.integers(2))
    elif kind == 1:  # off the detector
        center = (float(rng.uniform(-2 * nx, 3 * nx)), float(rng.uniform(-2 * ny, 3 * ny)))
    else:
        center = (float(rng.uniform(0, nx)), float(rng.uniform(0, ny)))
    scale = (1.0, 1.0) if rng.random() < 0.5 else tuple(float(v) for v in rng.uniform(0.3, 2.0, 2))
    affine = None
    if rng.random() < 0.4:
        a = np.eye(2) + rng.normal(0, 0.15, (2, 2))
        if rng.random() < 0.3:
            a[1] *= -1  # a reflection
        affine = tuple(float(v) for v in a.ravel())
    npt_azim = int(rng.choice([1, 1, 2, 3, 4, 5, 7, 36, 90]))
    if rng.random() < 0.5:
        azimuth_range = (-180.0, 180.0)
    else:
        start = float(rng.uniform(-360, 360))
        azimuth_range = (start, start + float(rng.uniform(5, 360)))
    reach = float(np.hypot(nx, ny) + np.hypot(*center)) * max(scale)
    r0 = 0.0 if rng.random() < 0.5 else float(rng.uniform(0, 0.3 * reach))
    geom = PolarGeometry((ny, nx), center, scale, int(rng.integers(1, 25)), npt_azim,
                         (r0, float(rng.uniform(r0 + 1, reach))), azimuth_range, affine)
    mask = rng.random((ny, nx)) < 0.2 if rng.random() < 0.3 else None
    return geom, mask


@pytest.mark.parametrize("seed", range(12))
def test_random_geometries(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        assert_same_matrix(*random_geometry(rng))


@pytest.mark.parametrize("kw", [
    dict(radial_unit="2theta_deg", wavelength=0.0251, radial_range=(0.05, 0.9)),
    dict(radial_unit="2theta_rad", wavelength=0.0251, radial_range=(0.001, 0.015)),
    dict(radial_unit="q", wavelength=0.0251, curved=True, radial_range=(0.0, 2.0)),
    dict(radial_unit="k", wavelength=0.0251, curved=True, radial_range=(0.1, 0.35)),
])
def test_radial_units(kw):
    for npt_azim, azimuth_range in [(1, (-180.0, 180.0)), (24, (-180.0, 180.0)), (5, (150.0, 260.0))]:
        g = PolarGeometry((40, 48), (21.3, 18.6), (0.01, 0.012), npt=23, npt_azim=npt_azim,
                          azimuth_range=azimuth_range, **kw)
        assert_same_matrix(g)


def test_hard_cases():
    cases = [
        # a centre on a pixel corner, 1D: corners on the sub-wedges' rays
        PolarGeometry((32, 32), (15.5, 15.5), (1.0, 1.0), 16, 1, (0.0, 23.0), (-180.0, 180.0)),
        # integer radii through integer corners, 8 wedges on the diagonals
        PolarGeometry((32, 32), (15.5, 15.5), (1.0, 1.0), 16, 8, (0.0, 16.0), (-180.0, 180.0)),
        # a range wrapping past +180, and one past the seam of the full circle
        PolarGeometry((30, 40), (12.2, 17.9), (1.0, 1.0), 9, 6, (0.0, 25.0), (120.0, 300.0)),
        PolarGeometry((30, 40), (12.2, 17.9), (1.0, 1.0), 9, 7, (2.0, 25.0), (-400.0, -40.0)),
        # 1D on part of the circle (bins wider than 90 degrees), rectangular pixels
        PolarGeometry((30, 40), (12.2, 17.9), (0.5, 1.5), 9, 1, (0.0, 25.0), (-30.0, 250.0)),
        PolarGeometry((30, 40), (12.2, 17.9), (1.0, 1.0), 9, 2, (0.0, 25.0), (10.0, 350.0)),
        # the centre far off a non-square detector
        PolarGeometry((12, 50), (-40.0, 70.0), (1.0, 1.0), 30, 12, (60.0, 120.0), (-180.0, 180.0)),
        # elliptical correction, and one with a reflection
        PolarGeometry((36, 36), (17.2, 18.4), (1.0, 1.0), 15, 36, (0.0, 20.0), (-180.0, 180.0),
                      affine=(1.08, 0.04, 0.04, 0.93)),
        PolarGeometry((36, 36), (17.2, 18.4), (1.0, 1.0), 15, 36, (0.0, 20.0), (-180.0, 180.0),
                      affine=(1.08, 0.04, 0.04, -0.93)),
        # more bins than pixels, and a radial range beyond the detector
        PolarGeometry((8, 8), (3.7, 4.1), (1.0, 1.0), 40, 360, (0.0, 6.0), (-180.0, 180.0)),
        PolarGeometry((8, 8), (3.7, 4.1), (1.0, 1.0), 4, 3, (20.0, 30.0), (-180.0, 180.0)),
    ]
    for g in cases:
        assert_same_matrix(g)
    g = cases[1]
    m = assert_same_matrix(g)
    assert abs(float(m.sum()) / (np.pi * 16.0 ** 2) - 1) < 1e-6


def test_masks():
    g = PolarGeometry((30, 34), (16.1, 14.4), (1.0, 1.0), 12, 18, (0.0, 22.0), (-180.0, 180.0))
    rng = np.random.default_rng(3)
    assert_same_matrix(g, rng.random((30, 34)) < 0.5)
    mask = np.zeros((30, 34), bool)
    mask[:, 10:13] = True
    mask[14:17, 16:] = True
    assert_same_matrix(g, mask)
    every = integration_matrix(g, np.ones((30, 34), bool))
    assert every.nnz == 0 and every.shape == (12 * 18, 30 * 34)


def test_threads_and_blocks(monkeypatch):
    """The matrix does not depend on the block size or the number of threads."""
    g = PolarGeometry((40, 44), (20.3, 19.1), (1.0, 1.0), 17, 1, (0.0, 28.0), (-180.0, 180.0))
    m = np.diag([1.0, 1.0])
    edges = np.linspace(0.0, 28.0, 18)
    one = geometry_build.split_pixels_csr(g.detector_shape, g.center, m, edges, 17, 1, (-180.0, 180.0))
    monkeypatch.setattr(geometry_build, "BLOCK", 37)
    for threads in (1, 3):
        got = geometry_build.split_pixels_csr(g.detector_shape, g.center, m, edges, 17, 1,
                                              (-180.0, 180.0), threads=threads)
        for a, b in zip(got, one):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert_same_matrix(g)
