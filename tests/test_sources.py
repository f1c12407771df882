"""Frames read where a file stores them (diffgpu.sources, map_stored, the in-place kernels)."""

import os

import dask
import numpy as np
import pytest

import diffgpu
from diffgpu.device import DeviceCache
from diffgpu.kernels.decode import decode_records
from diffgpu.kernels.reduce import stored_words_supported, weighted_sums_stored
from diffgpu.mapping import map_frames, map_stored, map_weighted_sums
from diffgpu.readers._raw import RawFrames, lazy_raw
from diffgpu.readers.errors import DetectorFileError
from diffgpu.readers.mib import write_mib
from diffgpu.sources import StoredFrames, block_runs, stored_frames

WORDS = ["u1", "i1", ">u2", "<u2", ">i2", "<i2", ">u4", "<u4", ">i4", "<i4", "<u8", "<i8",
         ">f4", "<f4", ">f8", "<f2"]


def _records(frames, word, skip, flip):
    """``frames`` stored as records: ``skip`` header words, then the rows (last first)."""
    n, h, w = frames.shape
    rec = np.full((n, skip + h * w), 7, dtype=word)  # header words that are not pixels
    rec[:, skip:] = (frames[:, ::-1] if flip else frames).reshape(n, -1)
    return rec


def _frames(word, rng, shape=(5, 7, 6)):
    kind = np.dtype(word).kind
    if kind == "f":
        return rng.normal(0, 50, shape).astype(word)
    low = -100 if kind == "i" else 0
    return rng.integers(low, 200, shape).astype(word)


def _stored_case(word, seed, skip, flip):
    """Frames of ``word`` and their records read as native words, and whether they are
    swapped."""
    frames = _frames(word, np.random.default_rng(seed))
    word = np.dtype(word)
    words = _records(frames, word, skip, flip).view(word.newbyteorder("="))
    return frames, words, not word.isnative and word.itemsize > 1


@pytest.mark.parametrize("word", WORDS)
@pytest.mark.parametrize("flip", [False, True])
def test_decode_records_every_word(word, flip):
    frames, words, swapped = _stored_case(word, 3, 3, flip)
    out = np.empty(frames.shape, words.dtype)
    decode_records(words, out, 3, flip, swapped=swapped)
    np.testing.assert_array_equal(out, frames.astype(out.dtype))


@pytest.mark.parametrize("word", [w for w in WORDS if np.dtype(w).kind in "ui"])
@pytest.mark.parametrize("flip", [False, True])
def test_weighted_sums_of_stored_words_equal_decoded(word, flip):
    frames, words, swapped = _stored_case(word, 4, 2, flip)
    assert stored_words_supported(word)
    weights = np.random.default_rng(5).random((42, 3)).astype(np.float32)
    got = weighted_sums_stored(words, np.ascontiguousarray(weights.T).reshape(3, 7, 6), 2, flip,
                               swapped=swapped)
    want = frames.astype(np.float64).reshape(5, -1) @ weights.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_stored_words_not_read_in_place_say_so():
    assert not stored_words_supported(">f4") and not stored_words_supported(">u8")
    with pytest.raises(TypeError, match="only integers"):
        weighted_sums_stored(np.zeros((1, 4), "f4"), np.ones((1, 2, 2), "f4"), 0)
    with pytest.raises(ValueError, match="cannot hold"):
        weighted_sums_stored(np.zeros((1, 4), "u2"), np.ones((1, 2, 2), "f4"), 1)


def test_block_runs_merge_whole_rows():
    assert block_runs([(0, 2), (0, 4)], (3, 4)) == [(0, 8)]
    assert block_runs([(0, 2), (2, 4)], (3, 4)) == [(2, 2), (6, 2)]
    assert block_runs([(2, 5)], (9,)) == [(2, 3)]
    assert block_runs([], ()) == [(0, 1)]


@pytest.fixture
def raw_file(tmp_path):
    """6 x 5 frames of 8 x 8 big-endian uint16 behind 16 bytes of file header, each frame
    followed by 4 words of metadata."""
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 1000, (6, 5, 8, 8)).astype(">u2")
    path = str(tmp_path / "scan.raw")
    rec = np.zeros((30, 64 + 4), ">u2")
    rec[:, :64] = frames.reshape(30, 64)
    with open(path, "wb") as f:
        f.write(b"\0" * 16)
        f.write(rec.tobytes())
    return path, frames


def _lazy(path, chunks=None):
    return lazy_raw(RawFrames(path, 16, (6, 5), (8, 8), ">u2", stride=68 * 2), "raw", chunks)


def test_reader_array_is_stored_until_touched(raw_file):
    path, frames = raw_file
    data = _lazy(path)
    stored = stored_frames(data)
    assert stored is not None and stored.swapped and stored.stride == 136 and stored.skip == 0
    # any further dask operation is a new array: decoded frames, the ordinary path
    assert stored_frames(data[1:]) is None and stored_frames(data.rechunk((2, 5, 8, 8))) is None
    assert stored_frames(data + 0) is None and stored_frames(np.asarray(frames)) is None
    with pytest.raises(ValueError, match="whole words"):
        StoredFrames(path, 1, 136, 0, ">u2", (8, 8), (30,))


@pytest.mark.parametrize("chunks", [None, (2, 5)])
def test_map_frames_on_stored_frames_equal_in_memory(raw_file, chunks):
    path, frames = raw_file
    data = _lazy(path, chunks)
    got = map_frames(data, lambda f: f.astype(np.float64).max(axis=(1, 2)), (), np.float64)
    assert got.name.startswith("stored-") and got.dtype == np.float64
    np.testing.assert_array_equal(got.compute(), frames.max(axis=(2, 3)))
    weights = DeviceCache(np.random.default_rng(6).random((64, 2)).astype(np.float32))
    sums = map_weighted_sums(data, weights, 2)
    assert sums.name.startswith("stored-")
    want = frames.astype(np.float64).reshape(30, 64) @ weights.host.astype(np.float64)
    np.testing.assert_allclose(sums.compute().reshape(30, 2), want, rtol=1e-5)
    # a threshold needs the decoded frames: the ordinary path, the same numbers
    plain = map_weighted_sums(data, weights, 2, threshold=0.0)
    assert plain.name.startswith("stored-decoded") and "decoded" not in sums.name
    np.testing.assert_allclose(plain.compute(), sums.compute(), rtol=1e-5)


def test_operations_on_one_file_share_the_regions(raw_file):
    path, frames = raw_file
    data = _lazy(path, (2, 5))
    a = map_frames(data, lambda f: f.sum(axis=(1, 2)), (), np.int64)
    b = map_frames(data, lambda f: f.min(axis=(1, 2)), (), np.int64)
    roots_a = {k for k in dict(a.dask) if "stored-region" in str(k)}
    roots_b = {k for k in dict(b.dask) if "stored-region" in str(k)}
    assert roots_a == roots_b and len(roots_a) == 3
    sa, sb = dask.compute(a, b)
    np.testing.assert_array_equal(sa, frames.astype(np.int64).sum(axis=(2, 3)))
    np.testing.assert_array_equal(sb, frames.min(axis=(2, 3)))


def test_map_stored_chunks_and_a_single_frame(tmp_path):
    path = str(tmp_path / "one.raw")
    np.arange(16, dtype="<u2").tofile(path)
    single = StoredFrames(path, 0, 32, 0, "<u2", (4, 4), ())
    got = map_stored(single, lambda w, st: st.decode(w).sum(axis=(1, 2)), (), np.int64)
    assert got.shape == () and int(got.compute()) == 120


def test_a_file_changed_after_loading_raises(tmp_path):
    path = str(tmp_path / "scan.mib")
    write_mib(path, np.ones((4, 4, 16, 16), "uint16"))
    s = diffgpu.load(path)
    s.calibration.center = (7.5, 7.5)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DetectorFileError, match="changed since it was opened"):
        s.center_of_mass().data.compute()


def test_stored_and_decoded_paths_agree_on_a_mib(tmp_path):
    import hyperspy.api as hs

    s0 = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), noise=True,
                                       lazy=False)
    counts = np.asarray(s0.data).astype(np.uint32)
    path = str(tmp_path / "scan.mib")
    write_mib(path, counts, depth="U32")
    lazy = diffgpu.load(path)
    mem = diffgpu.DiffractionPatterns(counts)
    for s in (lazy, mem):
        s.calibration.center = s0.calibration.center
        s.calibration.scale = 1.0
    assert stored_frames(lazy.data) is not None
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=5), hs.roi.CircleROI(cx=0, cy=0, r=12, r_inner=6)]
    np.testing.assert_allclose(lazy.get_virtual_image(rois).data.compute(),
                               mem.get_virtual_image(rois).data, rtol=1e-5)
    np.testing.assert_allclose(lazy.center_of_mass().data.compute(), mem.center_of_mass().data,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lazy.get_azimuthal_integral1d(npt=12).data.compute(),
                               mem.get_azimuthal_integral1d(npt=12).data, rtol=1e-5)


_ALLOCATOR_PROBE = """
import ctypes, json, os, platform, tempfile
import numpy as np
from diffgpu.sources import StoredFrames, _TUNED
path = os.path.join(tempfile.mkdtemp(), "frames.raw")
np.arange(3 * 4, dtype="<u2").tofile(path)
before = list(_TUNED)
StoredFrames(path, 0, 8, 0, "<u2", (2, 2), (3,)).with_words(0, 3, lambda w: w.sum())
glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
print(json.dumps({"before": before, "after": list(_TUNED), "glibc": glibc}))
"""


@pytest.mark.parametrize("env", [{}, {"DIFFGPU_TUNE_MALLOC": "0"},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_first_read_of_stored_frames_tunes_the_allocator_once_unless_told_not_to(env):
    import json
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items()
               if k not in ("DIFFGPU_TUNE_MALLOC", "MALLOC_MMAP_THRESHOLD_",
                            "MALLOC_TRIM_THRESHOLD_")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=environ, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["before"] == []
    assert got["after"] == [got["glibc"] and not env]


@pytest.fixture
def read_as(monkeypatch):
    """Set DIFFGPU_READ for one test, with the per-file decisions forgotten."""
    from diffgpu import sources

    def set_mode(mode):
        monkeypatch.setenv("DIFFGPU_READ", mode)
        monkeypatch.setattr(sources, "_DIRECT", {})

    return set_mode


@pytest.mark.parametrize("mode", ["direct", "mapped"])
def test_direct_and_mapped_reads_give_the_same_frames_and_results(tmp_path, read_as, mode,
                                                                  monkeypatch):
    import hyperspy.api as hs

    from diffgpu import sources

    calls = []
    real = sources._DirectReads.read
    monkeypatch.setattr(sources._DirectReads, "read",
                        lambda self, *a: calls.append(a) or real(self, *a))

    rng = np.random.default_rng(5)
    counts = rng.integers(0, 4000, (5, 7, 24, 40)).astype(np.uint16)  # records not 4 KiB aligned
    path = str(tmp_path / "scan.mib")
    write_mib(path, counts.reshape(-1, 24, 40))
    read_as(mode)
    s = diffgpu.load(path, navigation_shape=(7, 5), chunks=(2, 3))
    np.testing.assert_array_equal(s.data.compute(), counts)
    mem = diffgpu.DiffractionPatterns(counts)
    for sig in (s, mem):
        sig.calibration.center = (19.5, 11.5)
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=5), hs.roi.CircleROI(cx=0, cy=0, r=12, r_inner=6)]
    np.testing.assert_allclose(s.get_virtual_image(rois).data.compute(),
                               mem.get_virtual_image(rois).data, rtol=1e-6)
    np.testing.assert_allclose(s.get_azimuthal_integral1d(npt=8).data.compute(),
                               mem.get_azimuthal_integral1d(npt=8).data, rtol=1e-5)
    assert bool(calls) == (mode == "direct")


def test_direct_read_buffer_is_never_overwritten_under_a_view(tmp_path, read_as):
    """A func that keeps a view of the words (against with_words' advice) keeps its data:
    the next read gets a new buffer."""
    path = str(tmp_path / "frames.raw")
    np.arange(4 * 6, dtype="<u2").tofile(path)
    read_as("direct")
    stored = StoredFrames(path, 0, 12, 2, "<u2", (2, 2), (4,))
    kept = stored.with_words(0, 2, lambda w: w)  # a view, kept
    again = stored.with_words(2, 2, lambda w: w.copy())
    np.testing.assert_array_equal(kept, np.arange(12).reshape(2, 6))
    np.testing.assert_array_equal(again, np.arange(12, 24).reshape(2, 6))


@pytest.mark.parametrize("how", ["with_words", "each_words"])
def test_direct_reads_fall_back_to_mapped_where_refused(tmp_path, read_as, monkeypatch, how):
    """A file system without O_DIRECT (tmpfs refuses the open with EINVAL): mapped reads,
    the same frames, one region at a time or in steps read ahead."""
    import errno

    from diffgpu import sources

    path = str(tmp_path / "frames.raw")
    np.arange(4 * 4, dtype="<u2").tofile(path)
    real_open = os.open

    def no_direct(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    read_as("direct")
    monkeypatch.setattr(sources.os, "open", no_direct)
    stored = StoredFrames(path, 0, 8, 0, "<u2", (2, 2), (4,))
    if how == "with_words":
        assert stored.with_words(0, 4, lambda w: w.sum()) == sum(range(16))
    else:
        got = [int(s) for s in stored.each_words([(0, 2), (2, 2)], lambda w: w.sum())]
        assert got == [sum(range(8)), sum(range(8, 16))]
    assert sources._DIRECT[path] is False


def test_read_mode_names_the_setting(monkeypatch):
    from diffgpu.sources import read_mode

    monkeypatch.setenv("DIFFGPU_READ", "fast")
    with pytest.raises(ValueError, match="DIFFGPU_READ='fast'"):
        read_mode()


def test_each_words_reads_ahead_in_order_and_stops_cleanly(tmp_path, read_as):
    path = str(tmp_path / "frames.raw")
    np.arange(10 * 6, dtype="<u2").tofile(path)
    stored = StoredFrames(path, 0, 12, 2, "<u2", (2, 2), (10,))
    steps = [(0, 3), (3, 3), (6, 1), (7, 3)]
    for mode in ("direct", "mapped"):
        read_as(mode)
        sums = list(stored.each_words(steps, lambda w: w[:, 2:].sum(axis=1)))
        np.testing.assert_array_equal(np.concatenate(sums),
                                      np.arange(60).reshape(10, 6)[:, 2:].sum(axis=1))
        it = stored.each_words(steps, lambda w: int(w.sum()))
        assert next(it) == sum(range(18))
        it.close()  # the reads ahead are dropped, nothing raised


def test_direct_reads_work_in_a_forked_child(tmp_path, read_as):
    """The read-ahead threads are the parent's: a forked worker makes its own."""
    import multiprocessing

    path = str(tmp_path / "frames.raw")
    np.arange(8 * 4, dtype="<u2").tofile(path)
    read_as("direct")
    stored = StoredFrames(path, 0, 8, 0, "<u2", (2, 2), (8,))
    assert [int(x) for x in stored.each_words([(0, 4), (4, 4)], lambda w: w.sum())] == \
        [sum(range(16)), sum(range(16, 32))]  # the parent's pool is started
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_sums_of_steps, (path,)).get(timeout=60)
    assert got == [sum(range(16)), sum(range(16, 32))]


def _sums_of_steps(path):
    stored = StoredFrames(path, 0, 8, 0, "<u2", (2, 2), (8,))
    return [int(x) for x in stored.each_words([(0, 4), (4, 4)], lambda w: w.sum())]
