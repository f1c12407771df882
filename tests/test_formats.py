"""Detector and software file formats, read lazily and run through the main job.

Each test writes a small file of one format -- with the format's own writer where one exists
(RosettaSciIO for HyperSpy's .hspy/.zspy, blockfile, Berkeley EMD and NeXus; h5py with
hdf5plugin's bitshuffle/LZ4 for the Dectris Arina/EIGER layout), otherwise by its documented
byte layout as the detector software writes it (DM4: tests/_dm4.py; EMPAD .xml + .raw) --
loads it with ``diffgpu.load(path, lazy=True)`` and checks that beam finding, centring,
virtual images and 1D and 2D integration give the same numbers as on the same counts in
memory. Bad files (truncated, corrupt, companions missing, wrong scan shapes) must raise an
error that names the file and the problem.
"""

import os
import shutil

import h5py
import hyperspy.api as hs
import numpy as np
import pytest
from _dm4 import write_dm4

import diffgpu
from diffgpu.readers import dm as dm_reader
from diffgpu.readers import empad as empad_reader
from diffgpu.readers.errors import DetectorFileError

NAV = (3, 4)  # scan rows, scan columns


def _counts(nav, sig, dtype, seed=0):
    """Frames with a direct beam that wanders by up to a pixel, a ring and Poisson noise."""
    rng = np.random.default_rng(seed)
    ny, nx = sig
    y, x = np.mgrid[:ny, :nx]
    frames = np.empty(nav + sig)
    for idx in np.ndindex(nav):
        cx = (nx - 1) / 2 + 0.7 * np.sin(idx[-1] + 0.5 * idx[0])
        cy = (ny - 1) / 2 + 0.6 * np.cos(0.5 * idx[-1] + idx[0])
        r = np.hypot(x - cx, y - cy)
        lam = 150 * (r < 0.12 * nx) + 12 * (np.abs(r - 0.3 * nx) < 1.5) + 1.0
        frames[idx] = rng.poisson(lam)
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        frames = np.minimum(frames, np.iinfo(dtype).max)
    return frames.astype(dtype)


def _main_job(s):
    """Beam finding, centring, virtual images, 1D and 2D integration; computed results."""
    import dask

    scale = s.axes_manager.signal_axes[0].scale
    n = s.axes_manager.signal_axes[0].size
    shifts = s.get_direct_beam_position(method="blur", sigma=1.0, window=0.25 * n)
    shifts.compute(show_progressbar=False) if shifts._lazy else None
    centred = s.center_direct_beam(shifts=shifts)
    r_max = 0.45 * n * scale
    polar = centred.get_azimuthal_integral2d(npt=8, npt_azim=12, radial_range=(0, r_max))
    profile = centred.get_azimuthal_integral1d(npt=10, radial_range=(0, r_max))
    images = centred.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=0.15 * n * scale),
                                        hs.roi.CircleROI(cx=0, cy=0, r=r_max,
                                                         r_inner=0.2 * n * scale)])
    results = [shifts.data, polar.data, profile.data, images.data]
    if s._lazy:
        results = list(dask.compute(*results))
    return [np.asarray(r, dtype=float) for r in results]


def _in_memory_like(loaded, counts):
    """An eager signal of ``counts`` with the loaded signal's axes calibration."""
    ref = diffgpu.DiffractionPatterns(np.asarray(counts))
    for a, b in zip(loaded.axes_manager._axes, ref.axes_manager._axes):
        b.scale, b.offset, b.units = a.scale, a.offset, a.units
    return ref


def check_main_job(path, counts, **load_kwargs):
    """Load ``path`` lazily: same counts, chunks of whole frames, same main-job numbers."""
    s = diffgpu.load(path, lazy=True, **load_kwargs)
    assert type(s).__name__ == "LazyDiffractionPatterns"
    assert s.data.chunks[-2:] == ((counts.shape[-2],), (counts.shape[-1],)), "frames split"
    data = s.data.compute()
    np.testing.assert_array_equal(data, counts)
    assert data.flags.writeable  # users may change what they computed
    assert data.dtype.newbyteorder("=") == counts.dtype.newbyteorder("=")
    lazy = _main_job(s)
    eager = _main_job(_in_memory_like(s, counts))
    for a, b in zip(lazy, eager):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    return s


def check_hyperspy_load(path, counts, **kwargs):
    s = hs.load(path, lazy=True, signal_type="diffraction_patterns", **kwargs)
    assert type(s).__name__ == "LazyDiffractionPatterns"
    np.testing.assert_array_equal(s.data.compute(), counts)


def _signal(counts, scale=0.05, units="1/nm"):
    s = hs.signals.Signal2D(counts)
    for ax, name in zip(s.axes_manager.navigation_axes, ("x", "y")):
        ax.name, ax.scale, ax.units = name, 2.0, "nm"
    for ax, name in zip(s.axes_manager.signal_axes, ("kx", "ky")):
        ax.name, ax.scale, ax.units = name, scale, units
        ax.offset = -(ax.size - 1) / 2 * scale
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 200.0)
    s.metadata.set_item("Acquisition_instrument.TEM.camera_length", 120.0)
    return s


# -- formats with their own writer ---------------------------------------------------------

@pytest.mark.parametrize("ext", ["hspy", "zspy"])
@pytest.mark.parametrize("dtype", ["uint8", ">u2", "uint32", "<f4", ">f4"])
def test_hyperspy_formats(tmp_path, ext, dtype):
    counts = _counts(NAV, (24, 24), dtype)
    path = tmp_path / f"scan.{ext}"
    _signal(counts).save(path, show_progressbar=False)
    s = check_main_job(path, counts)
    assert s.calibration.scale == (0.05, 0.05) and s.calibration.units == "1/nm"
    assert s.calibration.center == (11.5, 11.5)
    assert s.calibration.beam_energy == 200.0
    check_hyperspy_load(path, counts)


@pytest.mark.parametrize("ext", ["hspy", "zspy"])
def test_hyperspy_formats_take_chunks(tmp_path, ext, caplog):
    """RosettaSciIO's .hspy/.zspy readers take no chunks: diffgpu rechunks to whole frames."""
    counts = _counts((3, 5), (16, 16), "uint16")
    path = tmp_path / f"scan.{ext}"
    _signal(counts).as_lazy().save(path, chunks=(1, 2, 8, 8), show_progressbar=False)
    for chunks, nav_chunks in ((3, ((1, 1, 1), (5,))), ((1, 5), ((1, 1, 1), (5,))),
                               ((3, 1, 16, 16), ((3,), (1,) * 5))):
        s = diffgpu.load(path, chunks=chunks)
        assert s.data.chunks == nav_chunks + ((16,), (16,))
        np.testing.assert_array_equal(s.data.compute(), counts)
    assert "RosettaSciIO developers" not in caplog.text
    assert type(diffgpu.load(path, chunks=3, lazy=False)).__name__ == "DiffractionPatterns"
    with pytest.raises(ValueError, match="chunks must be a positive number"):
        diffgpu.load(path, chunks=0)


def test_blockfile(tmp_path):
    counts = _counts(NAV, (32, 32), "uint8")  # the format stores uint8 frames
    path = tmp_path / "scan.blo"
    sig = _signal(counts, scale=0.1, units="cm")
    sig.save(path, intensity_scaling=None, show_progressbar=False)
    s = check_main_job(path, counts)
    assert s.calibration.scale == pytest.approx((0.1, 0.1)) and s.calibration.units == "cm"
    assert s.axes_manager.navigation_axes[0].scale == pytest.approx(2.0)
    assert s.calibration.beam_energy is None  # not recorded (0 in the header)
    assert "beam=unknown" in repr(s.calibration)
    check_hyperspy_load(path, counts)
    # a tuple is the navigation chunks, as for the other readers; the frames stay whole
    for chunks in ((1, 4), (1, 4, 16, 16)):
        assert diffgpu.load(path, chunks=chunks).data.chunks == ((1, 1, 1), (4,), (32,), (32,))
    # ASTAR records the beam energy in V (RosettaSciIO's writer leaves it 0): set it in the header
    from rsciio.blockfile._api import get_header_dtype_list

    header = np.fromfile(path, dtype=get_header_dtype_list("<"), count=1)
    header["Beam_energy"] = 200000
    with open(path, "r+b") as f:
        f.write(header.tobytes())
    assert diffgpu.load(path).calibration.beam_energy == pytest.approx(200.0)


@pytest.mark.parametrize("dtype", ["uint16", ">u4", "float32"])
def test_berkeley_emd(tmp_path, dtype):
    counts = _counts(NAV, (24, 20), dtype)
    path = tmp_path / "scan.emd"
    _signal(counts).save(path)
    s = check_main_job(path, counts)  # every axis comes back as a signal axis: frames last
    assert s.axes_manager.signal_shape == (20, 24)
    assert s.calibration.scale == pytest.approx((0.05, 0.05))


@pytest.mark.parametrize("dtype", ["uint16", "<i4", ">f4"])
def test_nexus(tmp_path, dtype):
    counts = _counts(NAV, (24, 24), dtype)
    path = tmp_path / "scan.nxs"
    _signal(counts).save(path)
    s = check_main_job(path, counts)
    assert s.calibration.scale == pytest.approx((0.05, 0.05))
    assert s.calibration.center == pytest.approx((11.5, 11.5))
    check_hyperspy_load(path, counts, nxdata_only=True)


# -- Dectris Arina / EIGER HDF5 --------------------------------------------------------------

def write_dectris(folder, counts, frames_per_file=5, chunk=1, name="scan", wavelength=0.025079,
                  distance=0.2, pixel=75e-6, center=None, mask=None, triggers=None):
    """A Dectris master file and its data files, as the detector writes them."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    flat = counts.reshape((-1,) + counts.shape[-2:])
    master = os.path.join(folder, f"{name}_master.h5")
    with h5py.File(master, "w") as m:
        m.attrs["NX_class"] = "NXroot"
        entry = m.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        for k, start in enumerate(range(0, len(flat), frames_per_file)):
            fname = f"{name}_data_{k + 1:06d}.h5"
            with h5py.File(os.path.join(folder, fname), "w") as f:
                f.create_dataset("entry/data/data", data=flat[start:start + frames_per_file],
                                 chunks=(chunk,) + flat.shape[1:],
                                 **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
            data[f"data_{k + 1:06d}"] = h5py.ExternalLink(fname, "entry/data/data")
        det = entry.create_group("instrument/detector")
        det["x_pixel_size"], det["y_pixel_size"] = pixel, pixel
        det["detector_distance"] = distance
        det["count_time"] = 0.001
        det["bit_depth_image"] = 8 * counts.dtype.itemsize
        if center is not None:
            det["beam_center_x"], det["beam_center_y"] = center
        spec = det.create_group("detectorSpecific")
        spec["nimages"] = len(flat) if triggers is None else len(flat) // triggers
        spec["ntrigger"] = 1 if triggers is None else triggers
        spec["pixel_mask"] = (np.zeros(counts.shape[-2:], "uint32") if mask is None
                              else mask.astype("uint32"))
        entry["instrument/beam/incident_wavelength"] = wavelength
    return master


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", ">u2", "float32"])
def test_dectris_hdf5(tmp_path, dtype):
    counts = _counts(NAV, (20, 24), dtype)
    master = write_dectris(tmp_path, counts, frames_per_file=5, center=(11.2, 9.6))
    s = check_main_job(master, counts, navigation_shape=NAV[::-1])
    # calibration from the master file: pixel / distance / wavelength, energy from wavelength
    assert s.calibration.scale == pytest.approx((75e-6 / 0.2 / 0.025079,) * 2)
    assert s.calibration.units == "1/Å"
    assert s.calibration.center == pytest.approx((11.2, 9.6))
    assert s.calibration.beam_energy == pytest.approx(200.0, abs=0.01)
    assert s.metadata.Acquisition_instrument.TEM.camera_length == pytest.approx(200.0)
    from diffgpu.readers import hdf5 as hdf5_reader

    check_hyperspy_load(master, counts, file_format=hdf5_reader, navigation_shape=NAV[::-1])


def test_dectris_chunks_follow_hdf5_chunks(tmp_path):
    """HDF5 chunks of 4 frames, 12 frames per data file: dask chunks are whole HDF5 chunks."""
    counts = _counts((6, 8), (16, 16), "uint16")
    master = write_dectris(tmp_path, counts, frames_per_file=12, chunk=4)
    s = diffgpu.load(master, navigation_shape=(8, 6), chunks=10)
    rows = s.data.chunks[0]
    assert s.data.chunks[1] == (8,) and all(r * 8 % 4 == 0 for r in rows[:-1])
    np.testing.assert_array_equal(s.data.compute(), counts)
    # a square number of frames is a square scan without being told
    sq = _counts((4, 4), (16, 16), "uint16")
    s = diffgpu.load(write_dectris(tmp_path, sq, name="square"))
    assert s.axes_manager.navigation_shape == (4, 4)
    np.testing.assert_array_equal(s.inav[1:3, 2].data.compute(), sq[2, 1:3])
    # one trigger per scan row: the scan shape from the master file
    s = diffgpu.load(write_dectris(tmp_path, counts, name="lines", triggers=6))
    assert s.axes_manager.navigation_shape == (8, 6)
    np.testing.assert_array_equal(s.data.compute(), counts)


def test_hdf5_tuple_chunks(tmp_path):
    """A tuple is dask's chunks of the navigation axes, as for the other readers; whole frames."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    counts = _counts((3, 5), (16, 16), "uint16")
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=counts.reshape(-1, 16, 16), chunks=(1, 16, 16))
    s = diffgpu.load(path, navigation_shape=(5, 3), chunks=(1, 5))
    assert s.data.chunks == ((1, 1, 1), (5,), (16,), (16,))
    np.testing.assert_array_equal(s.data.compute(), counts)
    # Dectris chunks of 4 frames: the chunks asked for, the frames read right
    master = write_dectris(tmp_path, counts, frames_per_file=8, chunk=4)
    s = diffgpu.load(master, navigation_shape=(5, 3), chunks=((2, 1), (3, 2), 16, 16))
    assert s.data.chunks == ((2, 1), (3, 2), (16,), (16,))
    np.testing.assert_array_equal(s.data.compute(), counts)
    with pytest.raises(ValueError, match="chunks"):
        diffgpu.load(master, navigation_shape=(5, 3), chunks=(1, 2, 3))
    assert hdf5plugin  # the Dectris layout is bitshuffle/LZ4


def test_dectris_pixel_mask(tmp_path):
    counts = _counts(NAV, (16, 16), "uint16")
    bad = np.zeros((16, 16), bool)
    bad[3, 5] = bad[10, 2] = True
    s = diffgpu.load(write_dectris(tmp_path, counts, mask=bad), navigation_shape=(4, 3))
    np.testing.assert_array_equal(s.calibration.mask, bad)


def test_plain_hdf5_stack_and_4d(tmp_path):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    counts = _counts(NAV, (16, 16), "uint16")
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("exp/frames", data=counts.reshape(-1, 16, 16), chunks=(2, 16, 16),
                         **hdf5plugin.Bitshuffle(cname="lz4"))
        f.create_dataset("exp/dark", data=np.zeros((16, 16)))
    check_main_job(path, counts, navigation_shape=(4, 3))
    path4 = tmp_path / "four.h5"
    with h5py.File(path4, "w") as f:
        f.create_dataset("data", data=counts, chunks=(1, 2, 16, 16),
                         **hdf5plugin.Bitshuffle(cname="lz4"))
    s = check_main_job(path4, counts)
    assert s.axes_manager.navigation_shape == (4, 3)


# -- formats written by their documented byte layout --------------------------------------

@pytest.mark.parametrize("dtype,endian", [("uint8", "<"), ("uint16", "<"), ("uint32", "<"),
                                          ("int16", "<"), ("float32", "<"), ("uint16", ">"),
                                          ("float32", ">")])
def test_dm4(tmp_path, dtype, endian):
    counts = _counts(NAV, (24, 20), dtype)
    path = tmp_path / "scan.dm4"
    write_dm4(path, counts, signal_scale=0.02, signal_units="1/nm", signal_origin=(9.5, 11.5),
              nav_scale=1.5, nav_units="nm", voltage=300e3, camera_length=80.0, endian=endian)
    s = check_main_job(path, counts)
    assert s.calibration.scale == pytest.approx((0.02, 0.02)) and s.calibration.units == "1/nm"
    assert s.calibration.center == pytest.approx((9.5, 11.5))
    assert s.calibration.beam_energy == pytest.approx(300.0)
    assert s.metadata.Acquisition_instrument.TEM.camera_length == pytest.approx(80.0)
    assert s.axes_manager.navigation_axes[0].scale == pytest.approx(1.5)
    check_hyperspy_load(path, counts, file_format=dm_reader)
    if endian == "<":  # HyperSpy's own choice by extension reads these too
        check_hyperspy_load(path, counts)


@pytest.mark.parametrize("nav", [(1, 4), (4, 1), (1, 1)])
def test_dm4_keeps_size_one_scan_axes(tmp_path, nav):
    """A 1 x N, N x 1 or 1 x 1 scan keeps its scan shape, as the other readers keep it
    (RosettaSciIO drops size-1 axes)."""
    counts = _counts(nav, (24, 20), "uint16")
    path = tmp_path / "line.dm4"
    write_dm4(path, counts, nav_scale=1.5, nav_units="nm")
    for lazy in (True, False):
        s = diffgpu.load(path, lazy=lazy)
        assert s.axes_manager.navigation_shape == nav[::-1]
        np.testing.assert_array_equal(np.asarray(s.data), counts)


def test_dm4_navigation_shape_and_keywords(tmp_path):
    counts = _counts((1, 6), (16, 16), "uint16")
    path = tmp_path / "line.dm4"
    write_dm4(path, counts, nav_scale=1.5, nav_units="nm")
    s = diffgpu.load(path, navigation_shape=(3, 2), chunks=(1, 3))
    assert s.axes_manager.navigation_shape == (3, 2) and s.data.chunks[:2] == ((1, 1), (3,))
    assert s.axes_manager.navigation_axes[0].scale == 1.5  # the file's scan step
    np.testing.assert_array_equal(s.data.compute(), counts.reshape(2, 3, 16, 16))
    assert diffgpu.load(path, navigation_shape=(6, 1)).axes_manager.navigation_shape == (6, 1)
    _raises(path, "holds 6 frames", "needs 4", navigation_shape=(4, 1))
    # the argument is named, the file not blamed
    for kwargs, err, says in ((dict(navigation_shape=(0, 6)), ValueError, "positive"),
                              (dict(chunks=(1, 2, 3)), ValueError, "3 entries"),
                              (dict(first_frame=2), TypeError, "first_frame")):
        with pytest.raises(err, match=says) as info:
            diffgpu.load(path, **kwargs)
        assert "corrupt" not in str(info.value)


EMPAD_XML = """<root name="{name}"><timestamp timestamp="1774471672.586728" \
isoformat="2026-03-25T16:47:52.586728"/><software_version>1.2.2  (2021-08-20)</software_version>\
<raw_file filename="{raw}"/><exposure_time>1</exposure_time>\
<scan_parameters mode="search"><scan_size>0.8</scan_size><scan_resolution_y>64</scan_resolution_y>\
<scan_resolution_x>64</scan_resolution_x></scan_parameters><scan_parameters mode="acquire">\
<scan_size>0.6</scan_size><scan_center_x>0.5</scan_center_x><scan_resolution_y>{ny}\
</scan_resolution_y><scan_resolution_x>{nx}</scan_resolution_x><scan_center_y>0.5</scan_center_y>\
</scan_parameters><iom_measurements><scan_rotation>0.0</scan_rotation>\
<full_scan_field_of_view><scale_factor>0.72</scale_factor><x>1.44e-07</x><y>1.44e-07</y>\
</full_scan_field_of_view><nominal_camera_length>0.369</nominal_camera_length>\
<high_voltage>300000.0</high_voltage></iom_measurements></root>"""


def write_empad(folder, counts, name="scan"):
    """An EMPAD .xml + .raw pair: float32 little-endian frames, two metadata rows each."""
    ny, nx = counts.shape[:2]
    raw = f"scan_x{nx}_y{ny}.raw"
    frames = np.zeros((ny * nx, 130, 128), "<f4")
    frames[:, :128] = counts.reshape(-1, 128, 128)
    frames[:, 128:] = np.arange(2 * 128)[None].reshape(1, 2, 128)  # per-frame metadata rows
    frames.tofile(os.path.join(folder, raw))
    xml = os.path.join(folder, f"{name}.xml")
    with open(xml, "w") as f:
        f.write(EMPAD_XML.format(name=name, raw=raw, nx=nx, ny=ny))
    return xml


def test_empad(tmp_path):
    counts = _counts((2, 3), (128, 128), "<f4")
    xml = write_empad(tmp_path, counts)
    s = check_main_job(xml, counts)
    assert s.axes_manager.navigation_shape == (3, 2)
    assert s.calibration.beam_energy == 300.0
    assert s.metadata.Acquisition_instrument.TEM.camera_length == pytest.approx(369.0)
    assert s.axes_manager.navigation_axes[0].scale == pytest.approx(1.44e-7 / 0.72 / 3 * 1e9)
    check_hyperspy_load(xml, counts, file_format=empad_reader)
    # a series (type/count) and an XML naming the raw file by an absolute path elsewhere
    series = tmp_path / "series.xml"
    series.write_text('<root><type>series</type><count>6</count><raw_file '
                      'filename="C:\\data\\scan_x3_y2.raw"/></root>')
    s = diffgpu.load(series)
    assert s.axes_manager.navigation_shape == (6,)
    np.testing.assert_array_equal(s.data.compute(), counts.reshape(6, 128, 128))


# -- bad files -------------------------------------------------------------------------------

def _raises(path, *words, **kwargs):
    with pytest.raises((DetectorFileError, OSError)) as info:
        s = diffgpu.load(path, **kwargs)
        s.data.compute()
    message = str(info.value)
    assert os.path.basename(str(path)) in message, message
    for w in words:
        assert w in message, message
    return message


def test_bad_dm4(tmp_path):
    counts = _counts(NAV, (16, 16), "uint16")
    path = tmp_path / "scan.dm4"
    write_dm4(path, counts)
    whole = path.read_bytes()
    cut = tmp_path / "cut.dm4"
    cut.write_bytes(whole[:len(whole) - 700])  # the pixels reach past the end
    _raises(cut, "truncated")
    cut.write_bytes(whole[:200])  # the tag tree ends early
    _raises(cut, "truncated or corrupt")
    junk = tmp_path / "junk.dm4"
    junk.write_bytes(b"\x00\x00\x00\x07" + whole[4:])
    _raises(junk, "not a DigitalMicrograph file")


def test_bad_empad(tmp_path):
    counts = _counts((2, 3), (128, 128), "<f4")
    xml = write_empad(tmp_path, counts)
    raw = tmp_path / "scan_x3_y2.raw"
    whole = raw.read_bytes()
    raw.write_bytes(whole[:-1000])
    _raises(xml, "truncated")
    raw.write_bytes(whole + whole[:130 * 128 * 4])  # one frame more than the scan
    _raises(xml, "needs 6 frames")
    s = diffgpu.load(xml, navigation_shape=(3, 2))  # ... readable when the scan is given
    np.testing.assert_array_equal(s.data.compute(), counts)
    raw.unlink()
    _raises(xml, "scan_x3_y2.raw", "missing")
    bad = tmp_path / "bad.xml"
    bad.write_text('<root><raw_file filename="x.raw"/><unclosed></root>')
    _raises(bad, "not a readable EMPAD XML file")


def test_bad_dectris(tmp_path):
    counts = _counts(NAV, (16, 16), "uint16")
    master = write_dectris(tmp_path, counts, frames_per_file=5)
    _raises(master, "holds 12 frames", "needs 10", navigation_shape=(5, 2))
    data2 = tmp_path / "scan_data_000002.h5"
    saved = data2.read_bytes()
    # a damaged compressed chunk: the error names the data file and the frames
    with h5py.File(data2, "r") as f:
        offset = f["entry/data/data"].id.get_chunk_info(2).byte_offset
    broken = bytearray(saved)
    broken[offset + 12:offset + 40] = b"\xff" * 28
    data2.write_bytes(bytes(broken))
    _raises(master, "scan_data_000002.h5", navigation_shape=(4, 3))
    data2.write_bytes(saved[:len(saved) // 2])  # truncated data file
    _raises(master, navigation_shape=(4, 3))
    data2.unlink()  # missing external data file
    _raises(master, "scan_data_000002.h5", "missing", navigation_shape=(4, 3))
    notes = tmp_path / "notes.h5"
    with h5py.File(notes, "w") as f:
        f["a"], f["b"] = np.zeros((2, 3, 4)), np.zeros((2, 3, 4))
    _raises(notes, "2 datasets", "dataset=")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file at all" * 10)
    _raises(garbage, "not a readable HDF5 file")


def test_bad_software_formats(tmp_path):
    counts = _counts(NAV, (16, 16), "uint16")
    hspy = tmp_path / "scan.hspy"
    _signal(counts).save(hspy, show_progressbar=False)
    cut = tmp_path / "cut.hspy"
    cut.write_bytes(hspy.read_bytes()[:3000])
    _raises(cut)
    blo = tmp_path / "scan.blo"
    _signal(counts.astype("uint8"), units="cm").save(blo, intensity_scaling=None,
                                                     show_progressbar=False)
    cut = tmp_path / "cut.blo"
    cut.write_bytes(blo.read_bytes()[:2000])
    _raises(cut)
    unknown = tmp_path / "scan.xyz"
    shutil.copy(hspy, unknown)
    _raises(unknown)


def test_bad_files_are_named_with_what_is_wrong(tmp_path, caplog):
    for name in ("empty.mib", "empty.xml", "empty.zspy", "empty.hspy", "empty.blo"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DetectorFileError, match="empty"):
            diffgpu.load(tmp_path / name)
    text = tmp_path / "notes.blo"
    text.write_text("a text file, not a blockfile\n" * 40)
    with pytest.raises(DetectorFileError, match="not a blockfile"):
        diffgpu.load(text)
    # HyperSpy's hint to report to RosettaSciIO is not given for diffgpu's own readers
    assert "RosettaSciIO developers" not in caplog.text
    for name, says in (("scan", "without an extension"), ("scan.xyz", "extension .xyz")):
        (tmp_path / name).write_bytes(b"\0" * 64)
        with pytest.raises(OSError, match=says):
            diffgpu.load(tmp_path / name)
    # a .zspy store named with a trailing slash, as shell completion writes it
    counts = _counts(NAV, (16, 16), "uint16")
    _signal(counts).save(tmp_path / "scan.zspy", show_progressbar=False)
    got = diffgpu.load(str(tmp_path / "scan.zspy") + "/")
    np.testing.assert_array_equal(np.asarray(got.data), counts)


def test_eager_load_of_own_readers(tmp_path):
    """lazy=False reads the same counts into memory (a DiffractionPatterns, not lazy)."""
    counts = _counts((2, 3), (128, 128), "<f4")
    paths = [(write_empad(tmp_path, counts), counts, {})]
    dm = tmp_path / "scan.dm4"
    write_dm4(dm, counts.astype("uint16"), endian=">")
    paths.append((dm, counts.astype("uint16"), {}))
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:  # the Dectris layout needs its compression filter
        pass
    else:
        paths.append((write_dectris(tmp_path, counts.astype("uint32")), counts.astype("uint32"),
                      {"navigation_shape": (3, 2)}))
    for path, expected, kwargs in paths:
        s = diffgpu.load(path, lazy=False, **kwargs)
        assert type(s).__name__ == "DiffractionPatterns", path
        np.testing.assert_array_equal(s.data, expected)


def test_dectris_direct_chunk_reading(tmp_path):
    """Bitshuffle/LZ4 chunks read and decoded without h5py's lock equal h5py's reading, for any
    range of frames; other layouts are read through h5py."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    from diffgpu.readers.hdf5 import _direct_index, _read_direct

    rng = np.random.default_rng(3)
    for dtype, k in (("uint16", 1), ("<u4", 3), (">u2", 2), ("uint8", 4)):
        frames = rng.poisson(5, (11, 9, 13)).astype(dtype)
        path = str(tmp_path / f"d_{k}.h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("entry/data/data", data=frames, chunks=(k, 9, 13),
                             **hdf5plugin.Bitshuffle(cname="lz4"))
        index = _direct_index(path, "entry/data/data")
        if index is None:
            pytest.skip("this h5py/HDF5 has no chunk index (h5py reads everything)")
        for fa, fb in ((0, 11), (1, 2), (2, 9), (10, 11), (3, 7)):
            out = np.empty((fb - fa, 9, 13), np.dtype(dtype))
            _read_direct(path, index, fa, fb, out)
            np.testing.assert_array_equal(out, frames[fa:fb])
    plain = str(tmp_path / "plain.h5")
    with h5py.File(plain, "w") as f:
        f.create_dataset("a", data=frames, chunks=(1, 9, 13), compression="gzip")
        f.create_dataset("b", data=frames)
    assert _direct_index(plain, "a") is None and _direct_index(plain, "b") is None


def test_unrecorded_beam_energy_and_camera_length(tmp_path):
    """Files that write 0 for 'not recorded' load with no beam energy, not 0 keV."""
    path = tmp_path / "scan.dm4"
    write_dm4(path, _counts((2, 3), (16, 16), "uint16"), voltage=0.0, camera_length=0.0)
    s = diffgpu.load(path)
    assert s.calibration.beam_energy is None and s.calibration.wavelength is None
    assert not s.metadata.has_item("Acquisition_instrument.TEM.camera_length")
    assert "beam=unknown" in repr(s.calibration)


@pytest.mark.parametrize("fmt", ["dm4", "dectris"])
def test_file_backed_big_endian_frames_on_device(tmp_path, standin_gpu, fmt):
    """Frames read from a file (big-endian here) go to the device chunk by chunk: the main job
    there gives the host's numbers (CuPy stand-in: device rules, no GPU needed)."""
    counts = _counts(NAV, (24, 24), ">u2")
    if fmt == "dm4":
        path = tmp_path / "scan.dm4"
        write_dm4(path, counts, endian=">")
        kwargs = {}
    else:
        path = write_dectris(tmp_path, counts)
        kwargs = {"navigation_shape": NAV[::-1]}
    host = diffgpu.load(path, **kwargs)
    device = diffgpu.load(path, **kwargs)
    device.to_device()
    assert device.device == "gpu" and isinstance(device.data._meta, standin_gpu.ndarray)
    r = 8.0
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=4.0), hs.roi.CircleROI(cx=0, cy=0, r=r, r_inner=5.0)]
    for s in (host, device):  # pixel units for the detectors below
        s.calibration.scale = 1.0
        s.calibration.center = None
    results = []
    for s in (host, device):
        images = s.get_virtual_image(rois)
        profile = s.get_azimuthal_integral1d(npt=8, radial_range=(0, r))
        for out in (images, profile):
            out.to_host()
        results.append([np.asarray(images.data.compute()), np.asarray(profile.data.compute())])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("ext", ["h5", "emd"])
def test_py4dstem_emd1(tmp_path, ext):
    """A py4DSTEM DataCube file (EMD 1.0, written by emdfile) with its calibrated dims."""
    counts = _counts(NAV, (24, 20), "uint16")
    path = tmp_path / f"datacube.{ext}"
    with h5py.File(path, "w") as f:
        f.attrs.update({"authoring_program": "emdfile", "emd_group_type": "file",
                        "version_major": 1, "version_minor": 0})
        root = f.create_group("datacube_root")
        root.attrs.update({"emd_group_type": "root", "python_class": "Root"})
        cube = root.create_group("datacube")
        cube.attrs.update({"emd_group_type": "array", "python_class": "DataCube"})
        cube["data"] = counts
        cube["data"].attrs["units"] = "pixel intensity"
        for k, (name, step, units) in enumerate((("Rx", 1.5, "nm"), ("Ry", 1.5, "nm"),
                                                 ("Qx", 0.02, "A^-1"), ("Qy", 0.02, "A^-1"))):
            cube[f"dim{k}"] = np.array([0.0, step])  # py4DSTEM: first value and step
            cube[f"dim{k}"].attrs.update({"name": name, "units": units})
    s = check_main_job(path, counts)
    assert s.calibration.scale == pytest.approx((0.02, 0.02))
    assert s.axes_manager.navigation_axes[0].scale == pytest.approx(1.5)


def test_files_without_frames_are_refused_at_load(tmp_path):
    """A stack of 0 frames loaded as a signal of navigation size 0: `diffgpu virtual` then
    divided by zero and `integrate --1d` wrote an output that could not be read back."""
    from rsciio.blockfile._api import get_header_dtype_list

    from diffgpu.readers.mib import write_mib

    for name, shape, says in (("empty.h5", (0, 8, 8), "no frames"),
                              ("empty4d.h5", (3, 0, 8, 8), "no frames"),
                              ("nopixels.h5", (4, 0, 8), "frames of no pixels")):
        with h5py.File(tmp_path / name, "w") as f:
            f["a"] = np.zeros(shape)
        _raises(tmp_path / name, f"the dataset 'a' holds {says} (shape {shape})")
    for shape in ((0, 16, 16), (3, 0, 16, 16)):
        write_dm4(tmp_path / "empty.dm4", np.zeros(shape, "uint16"))
        _raises(tmp_path / "empty.dm4", f"holds no frames (image data of shape {shape})")
    (tmp_path / "empty.xml").write_text('<root><type>series</type><count>0</count>'
                                        '<raw_file filename="empty.raw"/></root>')
    (tmp_path / "empty.raw").write_bytes(b"")
    _raises(tmp_path / "empty.xml", "a scan of 0 frames", "no frames")
    blo = tmp_path / "scan.blo"
    _signal(_counts(NAV, (16, 16), "uint8"), units="cm").save(blo, intensity_scaling=None,
                                                              show_progressbar=False)
    header = np.fromfile(blo, dtype=get_header_dtype_list("<"), count=1)
    header["NX"] = 0
    with open(blo, "r+b") as f:
        f.write(header.tobytes())
    _raises(blo, "a scan of 0 x 3", "holds no frames")
    # a .mib of a header and no pixels
    write_mib(tmp_path / "scan.mib", np.zeros((1, 16, 16), np.uint16), hdr=False)
    (tmp_path / "short.mib").write_bytes((tmp_path / "scan.mib").read_bytes()[:384])
    _raises(tmp_path / "short.mib", "less than one frame")


def test_navigation_shape_errors_print_plain_numbers(tmp_path):
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.ones((6, 8, 8))
    for shape in ((7, 4), np.array([7, 4])):
        message = _raises(path, "navigation_shape=(7, 4) needs 28", navigation_shape=shape)
        assert "np." not in message
    write_dm4(tmp_path / "scan.dm4", np.zeros((6, 16, 16), "uint16"))
    message = _raises(tmp_path / "scan.dm4", "navigation_shape=(7, 4) needs 28",
                      navigation_shape=np.array([7, 4]))
    assert "np." not in message


def test_directories_and_misnamed_files_are_named(tmp_path):
    from diffgpu.readers.mib import write_mib

    for name in ("folder", "folder.mib", "folder.h5"):
        (tmp_path / name).mkdir()
        with pytest.raises(IsADirectoryError, match=f"'{tmp_path / name}' is a directory, not a "
                                                    "data file nor a .zspy store"):
            diffgpu.load(tmp_path / name)
    write_mib(tmp_path / "scan.mib", np.ones((2, 3, 16, 16), np.uint16))
    with h5py.File(tmp_path / "stack.h5", "w") as f:
        f["a"] = np.ones((6, 8, 8))
    write_dm4(tmp_path / "scan.dm4", np.zeros((6, 16, 16), "uint16"))
    for source, looks in (("scan.mib", "a Merlin .mib file"), ("stack.h5", "an HDF5 file"),
                          ("scan.dm4", "a DigitalMicrograph .dm4 file")):
        renamed = tmp_path / (source.split(".")[0] + ".zspy")
        shutil.copy(tmp_path / source, renamed)
        with pytest.raises(DetectorFileError, match="is a file, not a .zspy store") as info:
            diffgpu.load(renamed)
        assert looks in str(info.value) and "FSPathExistNotDir" not in str(info.value)
