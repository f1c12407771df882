"""Merlin .mib files: reading (single chip, quad, U08/U16/U32, with and without .hdr), the main
job lazily from a file against the same counts in memory, chunks, bad files, `diffgpu info`."""

import os
import subprocess
import sys
import textwrap

import dask
import hyperspy.api as hs
import numpy as np
import pytest

import diffgpu
from diffgpu.chunking import frame_chunks, whole_frame_chunks
from diffgpu.cli import main
from diffgpu.readers.errors import DetectorFileError
from diffgpu.readers.mib import MIBFile, parse_frame_header, write_mib

RNG = np.random.default_rng(7)


def _frames(shape, dtype):
    top = {"uint8": 255, "uint16": 4095, "uint32": 2**24 - 1}[dtype]
    x = RNG.integers(0, 50, shape).astype(dtype)
    x.flat[:: 97] = top  # the largest counts the depth holds: byte order shows
    return x


@pytest.mark.parametrize("depth, dtype", [("U08", "uint8"), ("U16", "uint16"), ("U32", "uint32")])
@pytest.mark.parametrize("with_hdr", [True, False])
def test_depths_with_and_without_hdr_equal_rosettasciio(tmp_path, depth, dtype, with_hdr):
    frames = _frames((3, 5, 24, 20), dtype)
    path = str(tmp_path / "scan.mib")
    write_mib(path, frames, depth=depth, hdr=with_hdr)
    s = diffgpu.load(path) if with_hdr else diffgpu.load(path, navigation_shape=(5, 3))
    assert isinstance(s, diffgpu.LazyDiffractionPatterns)
    assert s.data.dtype == np.dtype(dtype) and s.data.dtype.isnative
    assert s.axes_manager.navigation_shape == (5, 3) and s.axes_manager.signal_shape == (20, 24)
    np.testing.assert_array_equal(s.data.compute(), frames)
    # RosettaSciIO decodes the same file independently, flipping frames up/down too
    ref = hs.load(path, navigation_shape=(5, 3), file_format="quantumdetector")
    np.testing.assert_array_equal(ref.data, frames)
    assert s.metadata.Acquisition_instrument.Detector.pixel_depth == depth
    assert s.metadata.Acquisition_instrument.Detector.exposure_time == pytest.approx(1e-3)
    assert s.original_metadata.frame_header.width == 20
    eager = diffgpu.load(path, lazy=False, navigation_shape=(5, 3))
    assert isinstance(eager, diffgpu.DiffractionPatterns)
    np.testing.assert_array_equal(eager.data, frames)


def test_without_hdr_or_shape_a_stack_and_flip_option(tmp_path):
    frames = _frames((6, 16, 16), "uint16")
    path = str(tmp_path / "stack.mib")
    write_mib(path, frames, hdr=False)
    s = diffgpu.load(path)
    assert s.data.shape == (6, 16, 16)
    assert diffgpu.load(path, chunks=(4, 16, 16)).data.chunks == ((4, 2), (16,), (16,))
    with pytest.raises(TypeError, match="unknown keyword.*first_frame"):
        diffgpu.load(path, first_frame=2)  # the keyword named, not the file blamed
    stored = diffgpu.load(path, flip_rows=False)
    np.testing.assert_array_equal(stored.data.compute(), frames[:, ::-1, :])
    # the .hdr path works as well as the .mib path
    write_mib(path, frames.reshape(2, 3, 16, 16))
    assert diffgpu.load(path[:-4] + ".hdr").data.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("gap", [0, 2])
def test_quad(tmp_path, gap):
    side = 512 + gap
    frames = _frames((2, 2, side, side), "uint16")
    path = str(tmp_path / "quad.mib")
    write_mib(path, frames, quad=True, gap=gap)
    f = MIBFile(path)
    assert f.header_bytes == 768 and f.quad and f.header["chips"] == 4 and len(f.header["dacs"]) == 4
    s = diffgpu.load(path)
    np.testing.assert_array_equal(s.data.compute(), frames)
    np.testing.assert_array_equal(hs.load(path).data, frames)
    mask = s.calibration.mask
    if gap:
        assert mask.shape == (side, side) and mask.sum() == 2 * gap * side - gap * gap
        assert mask[256:258].all() and mask[:, 256:258].all() and not mask[:256, :256].any()
    else:
        assert mask is None  # a 2x2 frame has no gap pixels


@pytest.mark.parametrize("layout, across", [("4x1", 4), ("2x1", 2), ("Nx1", 4)])
def test_chips_in_a_row_are_not_a_quad(tmp_path, layout, across):
    """A row of four chips (layout "   4x1", 256 x 1024 frames) was taken for a quad: half
    the detector (columns 256-767) masked as a gap, and the detector named 'Merlin Quad'."""
    frames = _frames((3, 256, across * 256), "uint8")
    path = tmp_path / "row.mib"
    # ("Nx1": N from the chips field; the headers are written as 4x1, then relabelled)
    write_mib(path, frames, layout=layout.replace("N", str(across)), hdr=False)
    if layout == "Nx1":
        path.write_bytes(path.read_bytes().replace(b"   4x1,", b"   Nx1,"))
    f = MIBFile(path)
    assert f.header["layout"] == layout and f.header["chips"] == across
    assert f.header_bytes == 768 and len(f.header["dacs"]) == across
    assert f.chip_grid == (across, 1) and not f.quad and f.gap_mask() is None
    s = diffgpu.load(path)
    assert s.calibration.mask is None and "Diffraction" not in s.metadata
    detector = s.metadata.Acquisition_instrument.Detector
    assert detector.name == f"Merlin {across}x1" and detector.chips == across
    np.testing.assert_array_equal(s.data.compute(), frames)
    np.testing.assert_array_equal(hs.load(path, navigation_shape=(3,)).data, frames)


def test_chips_in_a_row_with_their_gaps(tmp_path):
    """An Nx1G frame holds the gaps between its chips: those columns are masked."""
    frames = _frames((2, 256, 4 * 256 + 3 * 2), "uint16")
    path = tmp_path / "rowg.mib"
    write_mib(path, frames, layout="4x1G")
    f = MIBFile(path)
    assert f.chip_grid == (4, 1) and not f.quad
    mask = diffgpu.load(path).calibration.mask
    gaps = np.flatnonzero(mask.all(axis=0))
    assert gaps.tolist() == [256, 257, 514, 515, 772, 773] and mask.sum() == 6 * 256


def test_header_fields():
    raw = (b"MQ1,000007,00384,01,0256,0256,U08,   1x1,01,2020-05-18 16:51:49.971626,0.000555,0,0,0,"
           b"1.200000E+2,5.110000E+2,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,"
           b"0.000000E+0,3RX,175,511,000,000,000,000,000,000,125,255,125,125,100,100,082,100,087,030,"
           b"128,004,255,129,128,176,168,511,511,MQ1A,2020-05-18T14:51:49.971626178Z,555000ns,6,")
    h = parse_frame_header(raw.ljust(384, b"\x00"))
    assert h["sequence"] == 7 and h["depth"] == "U08" and h["layout"] == "1x1"
    assert h["thresholds_keV"][:2] == [120.0, 511.0] and len(h["dacs"][0]) == 27
    assert h["exposure_ns"] == 555000 and h["counter_depth"] == 6
    assert h["timestamp_ns"] == "2020-05-18T14:51:49.971626178Z" and h["shutter_s"] == 0.000555
    old = parse_frame_header(raw.split(b",MQ1A")[0] + b",")  # software before MQ1A
    assert "exposure_ns" not in old and old["counter"] == 0


# -- the main job lazily from a file == in memory --------------------------------------------

@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 8), sig_shape=(64, 64), noise=True, lazy=False)
    counts = np.asarray(s.data)
    path = str(tmp_path_factory.mktemp("mib") / "scan.mib")
    write_mib(path, counts, depth="U16")
    return path, counts, s.calibration.center


def _same_calibration(s, center):
    s.calibration.center = center
    s.calibration.scale = 1.0
    return s


def test_main_job_lazily_from_file_equals_in_memory(scan):
    path, counts, center = scan
    lazy = _same_calibration(diffgpu.load(path, chunks=(2, 8)), center)  # several chunks
    mem = _same_calibration(diffgpu.DiffractionPatterns(counts.astype("float64")), center)
    assert lazy.data.npartitions == 3
    cx, cy = center
    for method, kw in [("center_of_mass", {"mask": (cx, cy, 6)}), ("blur", {}),
                       ("cross_correlate", {"radius": 2.0})]:
        a = lazy.get_direct_beam_position(method=method, **kw)
        b = mem.get_direct_beam_position(method=method, **kw)
        a.compute()
        np.testing.assert_allclose(a.data, b.data, atol=1e-3, err_msg=method)
    shifts = mem.get_direct_beam_position(method="center_of_mass", mask=(cx, cy, 6))
    centred_lazy = lazy.center_direct_beam(shifts=shifts)
    centred_mem = mem.center_direct_beam(shifts=shifts)
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=4), hs.roi.CircleROI(cx=0, cy=0, r=25, r_inner=8)]
    vl = centred_lazy.get_virtual_image(rois)
    vl.compute()
    np.testing.assert_allclose(vl.data, centred_mem.get_virtual_image(rois).data, rtol=1e-5)
    p1 = lazy.get_azimuthal_integral1d(npt=24)
    p1.compute()
    np.testing.assert_allclose(p1.data, mem.get_azimuthal_integral1d(npt=24).data, rtol=1e-4, atol=1e-3)
    p2 = lazy.get_azimuthal_integral2d(npt=16, npt_azim=36)
    p2.compute()
    np.testing.assert_allclose(p2.data, mem.get_azimuthal_integral2d(npt=16, npt_azim=36).data,
                               rtol=1e-4, atol=1e-3)


def test_polar_patterns_from_the_file_written_where_they_belong(scan, monkeypatch):
    """From a file, a task decodes its frames a few at a time; each group's polar patterns
    are written into the task's result (`into`), not made apart and copied there."""
    import diffgpu.mapping as mapping

    path, counts, center = scan
    monkeypatch.setattr(mapping, "DECODE_BYTES", 1)  # groups of MIN_CHUNK_FRAMES frames
    calls = []
    real = mapping._decoded

    def spy(words, stored, *consts, **kw):
        calls.append((words.shape[0], kw.get("into") is not None))
        return real(words, stored, *consts, **kw)

    monkeypatch.setattr(mapping, "_decoded", spy)
    lazy = _same_calibration(diffgpu.load(path, chunks=(2, 8)), center)
    mem = _same_calibration(diffgpu.DiffractionPatterns(counts.astype("float64")), center)
    p2 = lazy.get_azimuthal_integral2d(npt=16, npt_azim=36)
    np.testing.assert_allclose(p2.data.compute(), mem.get_azimuthal_integral2d(
        npt=16, npt_azim=36).data, rtol=1e-4, atol=1e-3)
    assert calls and all(with_into for _, with_into in calls)
    assert max(n for n, _ in calls) > mapping.MIN_CHUNK_FRAMES  # several groups a task


def test_several_results_one_read(scan, monkeypatch):
    """Virtual images, centre of mass and a radial profile computed together read the frames
    of the file region by region: each region's three reads follow one another (so a file
    read from disk is read once, the other two reads finding its pages in the page cache),
    and each frame is read once per result, never decoded into a chunk kept for later."""
    import diffgpu.readers.mib as mibmod
    from diffgpu.sources import StoredFrames

    path, counts, center = scan
    reads, decoded = [], []
    original, original_read = StoredFrames.with_words, mibmod.read_frames

    def counting(self, start, count, func):
        reads.append((start, count))
        return original(self, start, count, func)

    def counting_read(*args, **kwargs):
        decoded.append(args)
        return original_read(*args, **kwargs)

    monkeypatch.setattr(StoredFrames, "with_words", counting)
    monkeypatch.setattr(mibmod, "read_frames", counting_read)
    s = _same_calibration(diffgpu.load(path, chunks=(2, 8)), center)
    vi = s.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=4)])
    com = s.center_of_mass()
    prof = s.get_azimuthal_integral1d(npt=16)
    results = dask.compute(vi.data, com.data, prof.data, scheduler="sync")
    assert sum(count for _, count in reads) == 3 * counts.shape[0] * counts.shape[1]
    assert decoded == []  # no chunk of decoded frames from the reader's own tasks
    where = {}
    for i, key in enumerate(reads):
        where.setdefault(key, []).append(i)
    assert len(where) == 3  # the chunks asked for: 3 regions of 2 x 8 frames, 16 in a run
    assert all(len(v) == 3 and v[-1] - v[0] == 2 for v in where.values()), where
    mem = _same_calibration(diffgpu.DiffractionPatterns(counts), center)
    np.testing.assert_allclose(results[0], mem.get_virtual_image(
        [hs.roi.CircleROI(cx=0, cy=0, r=4)]).data, rtol=1e-5)
    np.testing.assert_allclose(results[1], mem.center_of_mass().data, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results[2], mem.get_azimuthal_integral1d(npt=16).data, rtol=1e-5)


def test_rosettasciio_split_frames_are_rechunked_whole(scan):
    path, counts, center = scan
    s = hs.load(path, lazy=True, navigation_shape=(8, 6), chunks=(3, 4, 32, 32),
                signal_type="diffraction_patterns")
    assert isinstance(s, diffgpu.LazyDiffractionPatterns) and len(s.data.chunks[-1]) == 2
    whole = whole_frame_chunks(s.data)
    assert whole.chunks[-2:] == ((64,), (64,))
    s.calibration.center = center
    mem = _same_calibration(diffgpu.DiffractionPatterns(counts), center)
    p = s.get_azimuthal_integral1d(npt=16)
    p.compute()
    np.testing.assert_allclose(p.data, mem.get_azimuthal_integral1d(npt=16).data, rtol=1e-5)


def test_frame_chunks_rules():
    # whole rows while they fit in the target, runs along a row when a row is larger
    assert frame_chunks((480, 480), 256 * 256 * 2, workers=2) == ((1,) * 480, (60,) * 8)
    assert frame_chunks((16, 1000), 1000, workers=2, target_bytes=3000 * 1000) == (
        (3, 3, 3, 3, 2, 2), (1000,))
    chunks = frame_chunks((64, 64), 8192, workers=2)
    assert chunks == ((16,) * 4, (64,))
    # small data: at least two chunks per worker, not below MIN_CHUNK_BYTES
    assert len(frame_chunks((2000,), 1024, workers=2)[0]) == 1
    assert len(frame_chunks((8192,), 65536, workers=2)[0]) == 64
    assert frame_chunks((10,), 2**30, workers=4) == ((1,) * 10,)
    # GPU chunks are larger
    assert len(frame_chunks((4096,), 131072, device="gpu")[0]) < len(frame_chunks((4096,), 131072)[0])
    # a distributed client: larger chunks (a task costs more to schedule)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        assert frame_chunks((128, 128), 131072, workers=2) == ((1,) * 128, (128,))
    assert frame_chunks((128, 128), 131072, workers=2) == ((1,) * 128, (64, 64))
    # every chunk of the .mib reader is a contiguous run of frames
    for nav in [(7, 300), (300, 7), (33,), (4, 5, 6)]:
        c = frame_chunks(nav, 131072, workers=2, target_bytes=131072 * 64)
        assert sum(c[-1]) == nav[-1]
        assert all(len(set(ax)) <= 2 for ax in c)


# -- bad files ----------------------------------------------------------------------------

def _good(tmp_path, name="scan.mib", hdr=True):
    path = str(tmp_path / name)
    write_mib(path, _frames((3, 4, 16, 16), "uint16"), hdr=hdr)
    return path


def test_truncated_file(tmp_path):
    path = _good(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DetectorFileError, match="truncated") as err:
        diffgpu.load(path)
    assert path in str(err.value) and "11 whole frames" in str(err.value)


def test_navigation_shape_does_not_match(tmp_path):
    path = _good(tmp_path, hdr=False)
    with pytest.raises(DetectorFileError, match=r"needs 20 frames but the file holds 12") as err:
        diffgpu.load(path, navigation_shape=(5, 4))
    assert path in str(err.value)
    # a .hdr file that disagrees with the data
    path = _good(tmp_path, "other.mib")
    hdr = path[:-4] + ".hdr"
    text = open(hdr).read().replace("Frames in Acquisition (Number):\t12",
                                    "Frames in Acquisition (Number):\t16")
    open(hdr, "w").write(text)
    with pytest.raises(DetectorFileError, match="says 16 frames .* holds 12"):
        diffgpu.load(path)
    assert diffgpu.load(path, navigation_shape=(12,)).data.shape == (12, 16, 16)


def test_header_disagrees_with_data(tmp_path):
    path = _good(tmp_path, hdr=False)
    with open(path, "r+b") as f:  # the first header says 8-bit pixels: frames would be shorter
        head = f.read(384)
        f.seek(0)
        f.write(head.replace(b",U16,", b",U08,"))
    with pytest.raises(DetectorFileError) as err:
        diffgpu.load(path)
    assert path in str(err.value) and ("frame header" in str(err.value) or "whole number" in str(err.value))
    path = _good(tmp_path, "b.mib", hdr=False)
    with open(path, "r+b") as f:  # frame 1's header says another frame size
        rec = 384 + 16 * 16 * 2
        f.seek(rec)
        head = f.read(384)
        f.seek(rec)
        f.write(head.replace(b",0016,0016,", b",0008,0032,"))
    with pytest.raises(DetectorFileError, match="disagrees with the first frame"):
        diffgpu.load(path)


def test_not_a_mib_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.mib"
    empty.write_bytes(b"")
    with pytest.raises(DetectorFileError, match="empty"):
        diffgpu.load(empty)
    junk = tmp_path / "junk.mib"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(DetectorFileError, match="not a Merlin .mib file"):
        diffgpu.load(junk)
    raw = tmp_path / "raw.mib"
    raw.write_bytes(b"MQ1,000001,00384,01,0256,0256,R64,   1x1,01,".ljust(384, b"\0") + bytes(8192))
    with pytest.raises(DetectorFileError, match="R64"):
        diffgpu.load(raw)
    lone = tmp_path / "lone.hdr"
    lone.write_text("HDR,\t\r\nEnd\t\r\n")
    with pytest.raises(DetectorFileError, match="no .mib file"):
        diffgpu.load(lone)
    unknown = tmp_path / "data.xyz"
    unknown.write_bytes(b"12345")
    with pytest.raises(OSError, match="data.xyz"):
        diffgpu.load(unknown)
    with pytest.raises(FileNotFoundError):
        diffgpu.load(tmp_path / "missing.mib")


@pytest.mark.parametrize("command", [["virtual", "--disc", "3"], ["integrate", "--1d"],
                                     ["orientation", "--phase", "Si"]])
def test_batch_commands_on_bad_files_write_nothing(tmp_path, capsys, command):
    path = _good(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    out = tmp_path / "out.zspy"
    argv = [command[0], path, "-o", str(out), "--no-progress"] + command[1:]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert path in err and "truncated" in err
    assert set(os.listdir(tmp_path)) == {"scan.mib", "scan.hdr"}  # no output, no partial one


def test_file_shrinking_during_a_run_leaves_no_output(tmp_path, capsys):
    path = _good(tmp_path)
    s = diffgpu.load(path)  # opened while whole
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DetectorFileError, match="changed since it was opened"):
        s.data.compute()


def test_cli_on_a_mib_file_and_info(scan, tmp_path, capsys):
    path, counts, center = scan
    out = tmp_path / "vi.zspy"
    assert main(["virtual", path, "-o", str(out), "--disc", "4", "--no-progress"]) == 0
    images = diffgpu.load(out, lazy=False)
    assert images.data.shape == (1, 6, 8) or images.data.shape == (6, 8)
    capsys.readouterr()
    assert main(["info", path]) == 0
    text = capsys.readouterr().out
    for expected in ["Merlin .mib", ">u2: big-endian, non-native", "(8, 6|64, 64)", "reader's chunks",
                     "diffgpu's chunks", "read in place", "counter depth", "exposure (ms)", ".hdr file"]:
        assert expected in text, expected
    nohdr = str(tmp_path / "n.mib")
    write_mib(nohdr, counts[:2, :3], hdr=False)
    assert main(["info", nohdr, "--navigation-shape", "3", "2"]) == 0
    assert "(3, 2|64, 64)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing.mib")]) == 3
    zspy = tmp_path / "s.zspy"
    diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(32, 32)).save(zspy, show_progressbar=False)
    assert main(["info", str(zspy)]) == 0
    assert "(2, 2|32, 32)" in capsys.readouterr().out


# -- bounded memory ----------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import numpy as np, dask, hyperspy.api as hs, diffgpu

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    path = sys.argv[1]
    s = diffgpu.load(path, chunks=int(sys.argv[2]))
    s.calibration.center = (31.5, 31.5)
    # warm up imports, kernels and the page cache, then measure from here
    dask.compute(s.inav[:2].get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=8)]).data,
                 s.inav[:2].get_azimuthal_integral1d(npt=16).data)
    base = status()
    peak = dict(base)
    done = False

    def watch():
        while not done:
            for k, v in status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    with dask.config.set(scheduler="threads", num_workers=2):
        vi = s.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=8),
                                  hs.roi.CircleROI(cx=0, cy=0, r=30, r_inner=10)])
        com = s.center_of_mass()
        prof = s.get_azimuthal_integral1d(npt=16)
        dask.compute(vi.data, com.data, prof.data)
    done = True
    t.join()
    print((peak["RssAnon"] - base["RssAnon"]) / 2**20, (peak["RssFile"] - base["RssFile"]) / 2**20)
""")


def test_bounded_memory_from_a_file(tmp_path):
    """A 160 MB file through three results at once: anonymous and file-backed memory stay
    far below the file's size (reading it whole, or keeping it mapped, would not)."""
    n = 20_000  # 64 x 64 uint16 frames: 164 MB of pixels
    path = str(tmp_path / "big.mib")
    one = diffgpu.data.synthetic_4dstem(nav_shape=(1, 1), sig_shape=(64, 64), lazy=False).data[0, 0]
    write_mib(path, np.broadcast_to(one, (n // 100, 100, 64, 64)), frames_per_write=2000)
    size_mb = os.path.getsize(path) / 2**20
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, path, "10"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    anon, filebacked = (float(v) for v in proc.stdout.split()[-2:])
    # chunks of 10 scan rows = 1,000 frames = 8 MB; two threads, each with a chunk, its
    # float32 copies and the results: tens of MB, whatever the size of the file
    assert anon < 110 and filebacked < 40, (anon, filebacked, size_mb)
    assert size_mb > 150


def test_an_int_of_chunks_is_frames_per_chunk_as_for_the_other_readers(tmp_path):
    path = tmp_path / "scan.mib"
    write_mib(path, _frames((4, 6, 16, 16), "uint16"))
    s = diffgpu.load(path, chunks=12)  # about 12 frames: two scan rows of 6
    assert s.data.chunks[:2] == ((2, 2), (6,))
    assert diffgpu.load(path, chunks=3).data.chunks[:2] == ((1,) * 4, (6,))  # at least 8 frames


def test_centre_of_mass_of_large_frames_read_in_place_is_float64_exact(tmp_path):
    """Sums over a 512 x 512 frame read in place: each row in float32, the rows in float64 (a
    float32 sum over the whole frame was 4e-4 px off the float64 centre of mass)."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[:512, :512]
    beam = 4000 * np.exp(-((x - 300.3) ** 2 + (y - 200.7) ** 2) / 800)
    counts = rng.poisson(beam + 20, (2, 2, 512, 512)).astype("uint16")
    path = tmp_path / "big.mib"
    write_mib(path, counts)
    s = diffgpu.load(path)
    cx, cy = s.calibration.center
    f = counts.astype(float)
    tot = f.sum(axis=(-2, -1))
    true = np.stack([(f * x).sum(axis=(-2, -1)) / tot - cx,
                     (f * y).sum(axis=(-2, -1)) / tot - cy], axis=-1)
    memory = diffgpu.DiffractionPatterns(counts)  # the integer path in memory sums by rows too
    memory.calibration.center = (cx, cy)
    np.testing.assert_allclose(s.center_of_mass().data.compute(), true, atol=5e-5)
    np.testing.assert_allclose(memory.center_of_mass().data, true, atol=5e-5)
