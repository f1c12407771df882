"""File readers and the command line as a new user meets them: round trips, odd arguments
and the errors they give."""

import shutil

import hyperspy.api as hs
import numpy as np
import pytest

import diffgpu
from diffgpu.readers.mib import write_mib


@pytest.fixture
def quad_file(tmp_path):
    """A small Merlin quad scan with the gap between its chips (a mask of 2052 pixels)."""
    path = tmp_path / "quad.mib"
    frames = np.random.default_rng(0).integers(0, 50, (2, 2, 514, 514)).astype("uint16")
    write_mib(str(path), frames, quad=True, gap=2)
    return path, frames


@pytest.mark.parametrize("ext", ["zspy", "hspy"])
def test_a_saved_mask_is_in_memory_after_a_lazy_load(quad_file, tmp_path, ext):
    """RosettaSciIO reads arrays of the metadata of a lazy .hspy/.zspy as dask arrays: the
    detector mask comes back as a NumPy array, and operations that apply it work."""
    path, frames = quad_file
    saved = tmp_path / f"saved.{ext}"
    diffgpu.load(path).save(saved, show_progressbar=False)
    s = diffgpu.load(saved)
    assert isinstance(s.calibration.mask, np.ndarray)
    assert int(s.calibration.mask.sum()) == 2052
    images = s.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=100)])
    expected = diffgpu.load(path, lazy=False).get_virtual_image(
        [hs.roi.CircleROI(cx=0, cy=0, r=100)])
    np.testing.assert_allclose(np.asarray(images.data), np.asarray(expected.data))


def test_an_int_of_chunks_for_hdf5_means_what_it_means_for_the_other_readers(tmp_path):
    """``chunks=N`` is about N frames per chunk, at least 8 (whole scan rows where they fit),
    for every reader: an Arina file (one frame per HDF5 chunk) is cut as a .mib file of the
    same scan, and HDF5 chunks of 4 frames are rounded up to whole ones, not to 1 frame."""
    import h5py

    hdf5plugin = pytest.importorskip("hdf5plugin")
    frames = np.random.default_rng(1).integers(0, 9, (8, 16, 32, 32)).astype("uint16")
    write_mib(str(tmp_path / "scan.mib"), frames)
    for chunk in (1, 4):
        path = tmp_path / f"scan{chunk}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("entry/data/data", data=frames.reshape(-1, 32, 32),
                             chunks=(chunk, 32, 32), **hdf5plugin.Bitshuffle(cname="lz4"))
        for n in (1, 3, 20):
            s = diffgpu.load(path, navigation_shape=(16, 8), chunks=n)
            sizes = [a * b for a in s.data.chunks[0] for b in s.data.chunks[1]]
            assert min(sizes) >= 8 and all(k % chunk == 0 for k in sizes), (chunk, n, sizes)
            if chunk == 1:
                assert s.data.chunks == diffgpu.load(tmp_path / "scan.mib", chunks=n).data.chunks
            np.testing.assert_array_equal(s.data.compute(), frames)


def test_reader_modules_are_reached_from_the_package(tmp_path):
    """``file_format=diffgpu.readers.mib`` (as the error for a file without an extension
    suggests) works after a plain ``import diffgpu``."""
    import subprocess
    import sys

    path = tmp_path / "scan"
    write_mib(str(path), np.ones((4, 8, 8), "uint16"), hdr=False)
    code = ("import diffgpu\n"
            "names = ['mib', 'hdf5', 'empad', 'dm', 'blockfile', 'errors']\n"
            "assert all(hasattr(diffgpu.readers, n) for n in names)\n"
            f"print(diffgpu.load({str(path)!r}, file_format=diffgpu.readers.mib))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(4|8, 8)" in out.stdout
    with pytest.raises(AttributeError, match="no_such_reader"):
        diffgpu.readers.no_such_reader


def test_an_output_that_is_an_input_is_refused(tmp_path, capsys, monkeypatch):
    """``-o`` naming the input itself (however spelled), with ``--overwrite``, would replace
    the scan by its result: refused before anything is computed, the input kept."""
    from diffgpu.cli import main

    scan = tmp_path / "scan.zspy"
    diffgpu.data.synthetic_4dstem(nav_shape=(2, 3), sig_shape=(32, 32)).save(
        scan, show_progressbar=False)
    monkeypatch.chdir(tmp_path)
    for output in (str(scan), "scan.zspy", "./scan.zspy/", str(tmp_path / "." / "scan.zspy")):
        code = main(["integrate", str(scan), "-o", output, "--overwrite", "--no-progress",
                     "--device", "cpu", "--npt", "4", "--npt-azim", "4"])
        assert code == 3, output
        err = capsys.readouterr().err
        assert "input" in err and "scan.zspy" in err
    assert type(diffgpu.load(scan)).__name__ == "LazyDiffractionPatterns"
    # a ring standard read from a file is an input too
    rings = tmp_path / "rings.zspy"
    shutil.copytree(scan, rings)
    code = main(["strain", str(scan), "-o", str(rings), "--overwrite", "--radius", "2",
                 "--rings", str(rings), "--d-spacings", "3.1", "1.9"])
    assert code == 3
    assert "--rings" in capsys.readouterr().err
    assert type(diffgpu.load(rings)).__name__ == "LazyDiffractionPatterns"


def test_demo_into_a_file_is_an_input_error(tmp_path, capsys):
    """``diffgpu demo -o FILE`` (a file, not a folder) says so, without a traceback."""
    from diffgpu.cli import main

    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main(["demo", "-o", str(path), "--nav", "2", "2", "--sig", "32", "32",
                 "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "notes.txt" in err and "not a directory" in err
    assert path.read_text() == "mine"


def test_the_whole_frames_of_a_mib_file_cut_inside_a_frame(tmp_path, capsys):
    """An acquisition (or a copy) stopped inside a frame: refused as truncated, with the way
    to read its whole frames, which navigation_shape= then reads (also ``diffgpu info``)."""
    from diffgpu.cli import main
    from diffgpu.readers.errors import DetectorFileError

    path = str(tmp_path / "cut.mib")
    frames = np.random.default_rng(3).integers(0, 99, (12, 16, 16)).astype("uint16")
    write_mib(path, frames, hdr=False)
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(DetectorFileError, match=r"truncated.*navigation_shape=\(11,\)"):
        diffgpu.load(path)
    for lazy in (True, False):
        s = diffgpu.load(path, navigation_shape=(11,), lazy=lazy)
        np.testing.assert_array_equal(np.asarray(s.data), frames[:11])
    with pytest.raises(DetectorFileError, match="11 whole frames"):
        diffgpu.load(path, navigation_shape=(4, 3))
    assert main(["info", path, "--navigation-shape", "11"]) == 0
    out = capsys.readouterr().out
    assert "(11|16, 16)" in out and "100 bytes" not in out and "796" in out


def test_an_output_in_upper_case_or_under_a_file_is_refused_before_the_run(tmp_path, capsys):
    """``-o OUT.ZSPY``: HyperSpy reads a store back only under a name ending in ``.zspy``, so
    it is refused at once (not after reading the input), as is a folder that is a file."""
    from diffgpu.cli import main

    scan = tmp_path / "scan.mib"
    write_mib(str(scan), np.ones((4, 8, 8), "uint16"))
    base = ["integrate", str(scan), "--no-progress", "--device", "cpu", "--npt", "4",
            "--npt-azim", "4"]
    assert main(base + ["-o", str(tmp_path / "OUT.ZSPY")]) == 3
    err = capsys.readouterr().err
    assert "OUT.ZSPY" in err and "lower case" in err
    assert main(base + ["-o", str(scan / "out.zspy")]) == 3
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.hdr", "scan.mib"]


def test_a_store_not_named_zspy_says_so(tmp_path):
    """A .zspy store renamed (``scan.ZSPY``, ``scan_store``): HyperSpy's "No filename matches
    the pattern" becomes what is wrong and what to do."""
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16))
    s.save(tmp_path / "scan.zspy", show_progressbar=False)
    for name in ("scan.ZSPY", "scan_store"):
        shutil.copytree(tmp_path / "scan.zspy", tmp_path / name)
        with pytest.raises(OSError, match=r"name ending in '\.zspy'") as err:
            diffgpu.load(tmp_path / name)
        assert name in str(err.value)


def test_navigation_shape_of_a_dm_stack_on_the_command_line(tmp_path, capsys):
    """A DigitalMicrograph stack of N frames that is a scan: ``diffgpu.load`` takes
    ``navigation_shape=`` for it, and so does ``--navigation-shape``."""
    import sys
    from pathlib import Path

    from diffgpu.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from _dm4 import write_dm4

    path = str(tmp_path / "stack.dm4")
    write_dm4(path, np.random.default_rng(0).integers(0, 9, (12, 16, 16)).astype("uint16"))
    assert main(["info", path, "--navigation-shape", "4", "3"]) == 0
    assert "(4, 3|16, 16)" in capsys.readouterr().out
    out = tmp_path / "polar.zspy"
    assert main(["integrate", path, "-o", str(out), "--navigation-shape", "4", "3", "--npt", "4",
                 "--npt-azim", "4", "--no-progress", "--device", "cpu"]) == 0
    assert diffgpu.load(out).axes_manager.navigation_shape == (4, 3)


def test_square_brackets_in_a_path_are_part_of_the_name(tmp_path):
    """``scan[1].hspy`` is that file, not HyperSpy's glob pattern (which matches ``scan1.hspy``,
    another file, or nothing)."""
    small = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16))
    other = diffgpu.data.synthetic_4dstem(nav_shape=(3, 3), sig_shape=(16, 16))
    small.save(tmp_path / "scan[1].hspy", show_progressbar=False)
    other.save(tmp_path / "scan1.hspy", show_progressbar=False)  # what the pattern matches
    assert diffgpu.load(tmp_path / "scan[1].hspy").axes_manager.navigation_shape == (2, 2)
    small.save(tmp_path / "scan[1].zspy", show_progressbar=False)
    assert diffgpu.load(tmp_path / "scan[1].zspy").axes_manager.navigation_shape == (2, 2)
    write_mib(str(tmp_path / "scan [A].mib"), np.ones((2, 3, 8, 8), "uint16"))
    assert diffgpu.load(tmp_path / "scan [A].mib").axes_manager.navigation_shape == (3, 2)


def test_a_mask_option_adds_to_the_mask_of_the_file(quad_file, tmp_path):
    """``--mask`` (hot pixels, say) on a quad scan keeps the gap between the chips masked: the
    file's own mask is not dropped for the user's."""
    from diffgpu import cli

    path, _ = quad_file
    hot = np.zeros((514, 514), bool)
    hot[10, 20] = True
    hot[300, 257] = True  # in the gap already
    np.save(tmp_path / "hot.npy", hot)
    args = cli.build_parser().parse_args(["integrate", str(path), "-o", str(tmp_path / "o.zspy"),
                                          "--mask", str(tmp_path / "hot.npy"), "--device", "cpu"])
    mask = cli._load(args).calibration.mask
    assert int(mask.sum()) == 2052 + 1 and mask[10, 20] and mask[300, 257]


def test_info_without_a_file_refuses_navigation_shape(capsys):
    """``diffgpu info --navigation-shape 4 3`` without a FILE: a usage error, not ignored."""
    from diffgpu.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["info", "--navigation-shape", "4", "3"])
    assert exc.value.code == 2
    assert "FILE" in capsys.readouterr().err


@pytest.mark.parametrize("scan, field", [
    ('<scan_parameters mode="acquire"><scan_resolution_x>3</scan_resolution_x>'
     '</scan_parameters>', "scan_resolution_y"),
    ("<scan_parameters><series_count></series_count></scan_parameters>", "series_count"),
    ('<scan_parameters mode="acquire"><scan_resolution_x>3.5</scan_resolution_x>'
     "<scan_resolution_y>2</scan_resolution_y></scan_parameters>", "scan_resolution_x"),
    ("<pix_x>3</pix_x><pix_y>two</pix_y>", "pix_y"),
])
def test_an_empad_xml_with_a_bad_scan_shape_names_the_field(tmp_path, scan, field):
    """A scan size missing, empty, not a whole number: the error names the file and the XML
    element (not a TypeError from deep inside, which the command line would not catch)."""
    from diffgpu.readers.errors import DetectorFileError

    xml = tmp_path / "scan.xml"
    xml.write_text(f'<root><raw_file filename="scan_x3_y2.raw"/>{scan}</root>')
    np.zeros((6, 130, 128), "<f4").tofile(tmp_path / "scan_x3_y2.raw")
    with pytest.raises(DetectorFileError, match=field) as err:
        diffgpu.load(xml)
    assert "scan.xml" in str(err.value)


@pytest.mark.parametrize("units, ours", [("$A^{-1}$", "1/Å"), (r"$\AA^{-1}$", "1/Å"),
                                         ("k_A^-1", "1/Å"), ("A^-1", "1/Å"),
                                         ("nm$^{-1}$", "1/nm"), ("k_nm^-1", "1/nm"),
                                         ("1/nm", "1/nm"), ("px", "px")])
def test_reciprocal_units_of_pyxem_are_understood(tmp_path, units, ours):
    """pyxem writes ``$A^{-1}$`` (and other spellings) for the detector's 1/Å: a pyxem signal
    or file becomes diffraction patterns in ``1/Å``, which orientation mapping takes."""
    raw = hs.signals.Signal2D(np.zeros((2, 3, 16, 16), np.float32))
    for axis in raw.axes_manager.signal_axes:
        axis.scale, axis.units = 0.05, units
    assert diffgpu.as_diffraction_patterns(raw).calibration.units == ours
    raw.save(tmp_path / "pyxem.zspy", show_progressbar=False)
    s = diffgpu.load(tmp_path / "pyxem.zspy")
    assert s.calibration.units == ours and s.calibration.scale == (0.05, 0.05)


def test_messages_on_the_command_line_name_its_option(tmp_path, capsys):
    """A reader's advice ``pass navigation_shape=(11,)`` reads, on the command line, as the
    option to give: ``--navigation-shape 11``."""
    from diffgpu.cli import main

    path = str(tmp_path / "cut.mib")
    write_mib(path, np.ones((12, 16, 16), "uint16"))
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    assert main(["info", path]) == 3
    err = capsys.readouterr().err
    assert "--navigation-shape 11 reads its whole frames" in err and "navigation_shape=" not in err
    assert main(["virtual", path, "-o", str(tmp_path / "v.zspy"), "--disc", "2",
                 "--navigation-shape", "4", "3"]) == 3
    err = capsys.readouterr().err
    assert "needs 12 frames" in err and "pass --navigation-shape 11 to read" in err, err


def test_an_xml_that_is_not_empad_and_a_raw_given_alone_say_what_to_give(tmp_path):
    """An .xml naming no raw file got HyperSpy's "multiple file readers ... ['JobinYvon',
    'EMPAD']"; an EMPAD .raw given itself, "no reader takes the extension .raw"."""
    other = tmp_path / "notes.xml"
    other.write_text("<root><a>1</a></root>")
    with pytest.raises(OSError, match="not an EMPAD .xml"):
        diffgpu.load(other)
    raw = tmp_path / "scan_x4_y4.raw"
    raw.write_bytes(b"\0" * 4 * 128 * 130 * 16)
    with pytest.raises(OSError, match="give that .xml"):
        diffgpu.load(raw)
