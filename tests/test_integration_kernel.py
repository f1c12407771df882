"""The host integration kernel (banded, sliced-ELLPACK chunks) against scipy.sparse products."""

import numpy as np
import pytest

import diffgpu.geometry as geometry
import diffgpu.kernels.integration as integration
from diffgpu.geometry import PolarGeometry, integration_matrix
from diffgpu.kernels.integration import IntegrationEngine


def reference(matrix, frames):
    """M @ frames in float64, non-finite pixels as zero."""
    f = np.nan_to_num(np.asarray(frames, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.asarray(matrix.astype(np.float64) @ f.T).T


def frames_with_nonfinite(n, n_pix, dtype, seed=0):
    rng = np.random.default_rng(seed)
    frames = (rng.random((n, n_pix)) * 1000).astype(dtype)
    if np.dtype(dtype).kind == "f":
        frames[min(1, n - 1), 17] = np.nan
        frames[min(4, n - 1), n_pix // 2] = np.inf
    return frames


@pytest.mark.parametrize("band_bytes", [integration.BAND_BYTES, 4096, 30_016])
def test_more_bins_than_pixels_equals_sparse_product(monkeypatch, band_bytes):
    # 48 x 48 pixels -> 64 x 180 = 11,520 bins (5x the pixels): many bins hold one or two entries
    monkeypatch.setattr(integration, "BAND_BYTES", band_bytes)
    g = PolarGeometry((48, 48), (23.3, 24.8), (1.0, 1.0), 64, 180, (0.0, 30.0), (-180.0, 180.0))
    m = integration_matrix(g)
    assert m.shape[0] > 4 * m.shape[1]
    eng = IntegrationEngine(m)
    for n in (1, 7, 8, 21):  # short, single and several tiles
        for dtype in ("uint16", "uint32", "float32", ">u2"):
            frames = frames_with_nonfinite(n, 48 * 48, dtype)
            ref = reference(m, frames)
            for threads in (1, 2):
                out = eng.apply(frames, threads=threads)
                np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-3)
            out64 = eng.apply(frames, dtype="float64")
            np.testing.assert_allclose(out64, ref, rtol=1e-12, atol=1e-9)


def test_large_detector_in_bands_equals_sparse_product(monkeypatch):
    # 512 x 512: the transposed tile (8 MiB) is split into bands; bins cross band borders
    g = PolarGeometry((512, 512), (250.3, 261.7), (1.0, 1.0), 40, 24, (0.0, 300.0), (-180.0, 180.0))
    mask = np.zeros((512, 512), bool)
    mask[:, 100:104] = True
    m = integration_matrix(g, mask)
    eng = IntegrationEngine(m)
    n_bands = len(eng._bands[1]) - 1
    assert n_bands > 2 and eng._bands[6].dtype == np.uint16  # pixel indices within a band
    frames = frames_with_nonfinite(11, 512 * 512, "float32")
    ref = reference(m, frames)
    out = eng.apply(frames, threads=2)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-2)
    # one band of 262,144 pixels: int32 indices, the same sums
    monkeypatch.setattr(integration, "BAND_BYTES", 1 << 30)
    whole = IntegrationEngine(m)
    assert len(whole._bands[1]) == 2 and whole._bands[6].dtype == np.int32
    np.testing.assert_array_equal(whole.apply(frames), out)
    # 1D: every ring crosses every band
    g1 = PolarGeometry((512, 512), (250.3, 261.7), (1.0, 1.0), 50, 1, (0.0, 300.0), (-180.0, 180.0))
    m1 = integration_matrix(g1)
    np.testing.assert_allclose(IntegrationEngine(m1).apply(frames), reference(m1, frames), rtol=1e-5)


def test_result_does_not_depend_on_the_band_size(monkeypatch):
    """Each bin sums its pixels in the same order whatever the bands: float32 results are equal."""
    g = PolarGeometry((64, 72), (30.2, 41.7), (1.0, 1.0), 30, 90, (0.0, 50.0), (-180.0, 180.0))
    m = integration_matrix(g)
    frames = frames_with_nonfinite(13, 64 * 72, "float32", seed=3)
    outs = []
    for band_bytes in (integration.BAND_BYTES, 8192, 32 * 1000):
        monkeypatch.setattr(integration, "BAND_BYTES", band_bytes)
        eng = IntegrationEngine(m)
        outs.append((len(eng._bands[1]) - 1, eng.apply(frames, mean=True)))
    assert outs[0][0] == 1 and min(outs[1][0], outs[2][0]) > 2  # one band, then several
    for _, out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0][1])


def test_bins_no_pixel_reaches_are_zero():
    # the radial range reaches past the detector: outer bins have no entries
    g = PolarGeometry((32, 32), (15.5, 15.5), (1.0, 1.0), 40, 12, (0.0, 80.0), (-180.0, 180.0))
    m = integration_matrix(g)
    empty = np.diff(m.indptr) == 0
    assert empty[-12 * 8:].all()
    frames = np.full((9, 32 * 32), 5.0, np.float32)
    out = IntegrationEngine(m).apply(frames)
    assert np.all(out[:, empty] == 0)
    np.testing.assert_allclose(out, reference(m, frames), rtol=2e-6)


def test_geometry_built_in_blocks_is_the_same_matrix(monkeypatch):
    g = PolarGeometry((40, 52), (19.2, 27.7), (1.0, 1.1), 25, 36, (0.0, 30.0), (-150.0, 170.0),
                      affine=(1.02, 0.01, -0.02, 0.99))
    mask = np.random.default_rng(0).random((40, 52)) < 0.1
    # the NumPy reference build (the compiled one's blocks: tests/test_geometry_build.py)
    whole = integration_matrix(g, mask, _reference=True)
    monkeypatch.setattr(geometry, "_BUILD_BLOCK", 97)  # many blocks, uneven last one
    blocks = integration_matrix(g, mask, _reference=True)
    assert whole.nnz > 0
    np.testing.assert_array_equal(whole.indptr, blocks.indptr)
    np.testing.assert_array_equal(whole.indices, blocks.indices)
    np.testing.assert_array_equal(whole.data, blocks.data)


def test_host_chunks_hold_a_whole_tile_of_large_frames():
    from diffgpu.chunking import frame_chunks

    # 1024 x 1024 float32 (4 MiB): 8 frames per chunk, not 2 (a tile 3/4 empty)
    assert set(frame_chunks((256,), 1024 * 1024 * 4, workers=2)[0]) == {integration.TILE}
    assert frame_chunks((10,), 2**30, workers=4) == ((1,) * 10,)  # but not 8 GiB chunks


def test_every_pixel_masked_gives_zeros():
    g = PolarGeometry((16, 16), (7.5, 7.5), (1.0, 1.0), 4, 3, (0.0, 8.0), (-180.0, 180.0))
    m = integration_matrix(g, np.ones((16, 16), bool))
    assert m.nnz == 0
    out = IntegrationEngine(m).apply(np.ones((9, 256), np.float32))
    assert out.shape == (9, 12) and not out.any()


@pytest.mark.parametrize("chunks", [(2, 5), (2, 2)])  # whole scan rows, and parts of rows
@pytest.mark.parametrize("mean", [False, True])
def test_lazy_compute_of_several_chunks_equals_eager(chunks, mean, monkeypatch):
    """Lazy compute() integrates each chunk straight into its part of one result array, from
    dask's threads (through a copy where that part is not contiguous)."""
    import dask.array as da

    import diffgpu
    from diffgpu import mapping

    rng = np.random.default_rng(5)
    frames = rng.poisson(50, (6, 5, 40, 40)).astype("uint16")
    eager = diffgpu.DiffractionPatterns(frames)
    lazy = diffgpu.DiffractionPatterns(da.from_array(frames, chunks=chunks + (40, 40))).as_lazy()
    for s in (eager, lazy):
        s.calibration.center = (19.3, 20.6)
    ref = eager.get_azimuthal_integral2d(npt=12, npt_azim=18, mean=mean)
    out = lazy.get_azimuthal_integral2d(npt=12, npt_azim=18, mean=mean)
    assert out.data.npartitions > 1
    used = []
    into = mapping.compute_into
    monkeypatch.setattr("diffgpu.signals._device.compute_into",
                        lambda *a, **k: used.append(into(*a, **k)) or used[-1])
    out.compute(show_progressbar=False)
    assert used == [True]  # computed in place, not block by block
    assert not out._lazy and isinstance(out.data, np.ndarray)
    np.testing.assert_array_equal(out.data, ref.data)
    # any other graph: each block copied into the result
    shifted = lazy.shift_diffraction(np.full((6, 5, 2), 0.5))
    shifted.compute(show_progressbar=False)
    assert used == [True, False]
    np.testing.assert_array_equal(shifted.data, eager.shift_diffraction(np.full((6, 5, 2), 0.5)).data)
    sync = lazy.get_azimuthal_integral1d(npt=12)
    sync.compute(scheduler="synchronous", show_progressbar=False)  # HyperSpy's own path
    np.testing.assert_array_equal(sync.data, eager.get_azimuthal_integral1d(npt=12).data)


@pytest.mark.parametrize("band_bytes", [integration.BAND_BYTES, 4096])
def test_means_are_sums_over_each_bins_coverage(monkeypatch, band_bytes):
    """mean=True reads weights divided by each bin's coverage: the sums over coverage, bins
    beyond the detector NaN, frames with non-finite pixels over their own coverage."""
    monkeypatch.setattr(integration, "BAND_BYTES", band_bytes)
    g = PolarGeometry((40, 44), (19.2, 23.7), (1.0, 1.0), 30, 36, (0.0, 35.0), (-180.0, 180.0))
    m = integration_matrix(g)
    eng = IntegrationEngine(m)
    frames = frames_with_nonfinite(13, 40 * 44, "float32")
    cover = np.asarray(m.sum(axis=1)).ravel()
    assert (cover == 0).any() and (cover > 0).any()  # outer rings beyond the detector
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = reference(m, frames) / np.where(cover > 0, cover, np.nan)
        finite = np.isfinite(frames).astype(np.float64)
        own = reference(m, finite)  # each frame's own coverage, for those with bad pixels
        bad = ~np.isfinite(frames).all(axis=1)
        ref[bad] = reference(m, frames)[bad] / np.where(own[bad] > 0, own[bad], np.nan)
    for threads in (1, 2):
        out = eng.apply(frames, mean=True, threads=threads)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_allclose(out, ref, rtol=1e-5, equal_nan=True)
    assert eng._mean_weights() is eng._mean_weights()  # made once


def test_engine_tokenized_once_without_hashing_its_matrix(monkeypatch):
    """A lazy integration names its engine by a token made once: dask would otherwise pickle
    and hash the matrix and its bands every time a graph is built. A copy sent to a worker
    keeps the token; another engine has another."""
    import cloudpickle
    from dask.base import tokenize

    from diffgpu.azimuthal import get_engine
    from diffgpu.geometry import PolarGeometry

    g = PolarGeometry((64, 64), (31.5, 31.5), (1.0, 1.0), npt=20, npt_azim=36,
                      radial_range=(0.0, 40.0), azimuth_range=(-180.0, 180.0))
    eng = get_engine(g)
    token = tokenize(eng)
    monkeypatch.setattr(type(eng.matrix), "__reduce__",
                        lambda self: (_ for _ in ()).throw(AssertionError("matrix pickled")),
                        raising=False)
    assert tokenize(eng) == token
    monkeypatch.undo()
    assert tokenize(cloudpickle.loads(cloudpickle.dumps(eng))) == token
    other = get_engine(PolarGeometry((64, 64), (31.5, 31.5), (1.0, 1.0), npt=21, npt_azim=36,
                                     radial_range=(0.0, 40.0), azimuth_range=(-180.0, 180.0)))
    assert tokenize(other) != token
