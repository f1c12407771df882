"""Detector files as the instruments' software writes them (not only as the formats' specs allow):
a DECTRIS ARINA acquisition with its scan system's metadata file, electron detectors whose master
file records a photon's wavelength, older EMPAD XML files."""

import os

import h5py
import numpy as np
import pytest

import diffgpu
from _dm4 import write_dm4
from diffgpu.calibration import electron_wavelength
from diffgpu.readers.errors import ReaderArgumentError

hdf5plugin = pytest.importorskip("hdf5plugin")

HC = 12398.419843320026  # eV Å


def _frames(n, shape, dtype="uint16", seed=0):
    return np.random.default_rng(seed).poisson(3, (n,) + shape).astype(dtype)


def write_arina(folder, frames, name="test_00", photon_energy=300000.0, wavelength=None,
                distance=0.0, pixel=1e-4, scan=None):
    """An ARINA master file (as detector firmware 2024.1 writes it: one frame per trigger, no
    beam group, beam centre and detector distance 0), its data file, and where ``scan`` is
    given the scan system's ``<name>.h5`` with the attributes of ``STEM Metadata``."""
    master = os.path.join(folder, f"{name}_master.h5")
    with h5py.File(master, "w") as m:
        det = m.create_group("entry/instrument/detector")
        det["description"] = b"Dectris ARINA CZT"
        det["x_pixel_size"], det["y_pixel_size"] = pixel, pixel
        det["detector_distance"] = distance
        det["beam_center_x"], det["beam_center_y"] = 0.0, 0.0
        det["count_time"] = 9.95e-05
        det["bit_depth_image"] = np.uint32(8 * frames.dtype.itemsize)
        spec = det.create_group("detectorSpecific")
        spec["nimages"], spec["ntrigger"] = np.uint64(1), np.uint64(len(frames))
        spec["photon_energy"] = photon_energy
        spec["pixel_mask"] = np.zeros(frames.shape[1:], "uint32")
        if wavelength is not None:
            m["entry/instrument/beam/incident_wavelength"] = wavelength
        fname = f"{name}_data_000001.h5"
        with h5py.File(os.path.join(folder, fname), "w") as f:
            f.create_dataset("entry/data/data", data=frames, chunks=(1,) + frames.shape[1:],
                             **hdf5plugin.Bitshuffle(cname="lz4"))
        m["entry/data/data_000001"] = h5py.ExternalLink(fname, "entry/data/data")
    if scan is not None:
        with h5py.File(os.path.join(folder, f"{name}.h5"), "w") as f:
            group = f.create_group("STEM Metadata")
            for key, value in scan.items():
                group.attrs[key] = value
    return master


SCAN = {"Camera Length": np.array([0.115]), "High Tension": np.array([300000.0]),
        "IsPixelSizeCalibrated": np.array([0], "uint8"), "NumPixelsPrescan": np.array([0], "uint32"),
        "NumPixelsX": np.int64(6), "NumPixelsY": np.int64(4), "Pixel Size": np.array([0.13915206]),
        "ScanIncrement": np.array([810.67])}


def test_arina_reads_its_scan_from_the_scan_metadata_file(tmp_path):
    frames = _frames(24, (48, 40))
    master = write_arina(tmp_path, frames, scan=SCAN)
    s = diffgpu.load(master)
    # 24 frames: neither square nor (ntrigger, nimages) a scan; the metadata file says 6 x 4
    assert s.axes_manager.navigation_shape == (6, 4)
    np.testing.assert_array_equal(s.data.compute(), frames.reshape(4, 6, 48, 40))
    for axis in s.axes_manager.navigation_axes:
        assert axis.scale == pytest.approx(0.13915206) and axis.units == "nm"
    assert s.calibration.beam_energy == pytest.approx(300.0)
    assert s.metadata.Acquisition_instrument.TEM.camera_length == pytest.approx(115.0)
    assert s.original_metadata.detector["STEM Metadata"]["NumPixelsX"] == 6
    # the user's shape wins; a stack keeps a frame axis without the scan's step
    s = diffgpu.load(master, navigation_shape=(4, 6))
    assert s.axes_manager.navigation_shape == (4, 6)
    assert s.axes_manager.navigation_axes[0].units == "nm"
    s = diffgpu.load(master, navigation_shape=24)
    assert s.axes_manager.navigation_axes[0].scale == 1.0
    # a metadata file that does not hold the frames' scan is no scan: the frames as a stack
    os.remove(tmp_path / "test_00.h5")
    master = write_arina(tmp_path, frames, scan=dict(SCAN, NumPixelsX=np.int64(5)))
    assert diffgpu.load(master).axes_manager.navigation_shape == (24,)


def test_arina_without_scan_metadata_file(tmp_path):
    frames = _frames(16, (32, 32))
    s = diffgpu.load(write_arina(tmp_path, frames))
    assert s.axes_manager.navigation_shape == (4, 4)
    assert s.axes_manager.navigation_axes[0].units == ""
    # the electron detector is set to the beam energy (no wavelength recorded)
    assert s.calibration.beam_energy == pytest.approx(300.0)
    assert s.calibration.units == "px"  # no detector distance: no reciprocal scale


@pytest.mark.parametrize("energy", [200000.0, 300000.0])
def test_electron_detector_records_a_photon_wavelength(tmp_path, energy):
    # DECTRIS firmware keeps incident_wavelength = h c / photon_energy, a photon's wavelength;
    # an electron detector is set to the beam energy, whose electrons' wavelength is shorter
    frames = _frames(9, (16, 16))
    master = write_arina(tmp_path, frames, photon_energy=energy, wavelength=HC / energy,
                         distance=0.2, pixel=75e-6)
    s = diffgpu.load(master)
    assert s.calibration.beam_energy == pytest.approx(energy / 1e3)
    expected = 75e-6 / 0.2 / electron_wavelength(energy / 1e3)
    assert s.calibration.scale == pytest.approx((expected, expected))
    assert s.calibration.units == "1/Å"


def test_electron_wavelength_set_in_the_master_file_is_kept(tmp_path):
    # a wavelength that is not the photon's of the recorded energy was set as the electrons'
    frames = _frames(9, (16, 16))
    master = write_arina(tmp_path, frames, photon_energy=300000.0, wavelength=0.025079,
                         distance=0.2, pixel=75e-6)
    s = diffgpu.load(master)
    assert s.calibration.beam_energy == pytest.approx(200.0, abs=0.01)
    assert s.calibration.scale[0] == pytest.approx(75e-6 / 0.2 / 0.025079)


# an EMPAD XML of the 2019 software (RosettaSciIO's test file map4x4.xml, shortened): the scan
# in <pix_x>/<pix_y>, another resolution in <scan_parameters>, and the microscope's readings
# in elements named by its API calls
OLD_EMPAD_XML = """<root name="acquisition_1"><timestamp timestamp="1559820600.164675" \
isoformat="2019-06-06T13:30:00.164675"/><software_version>0.51 211118</software_version>\
<type>scan</type><pix_x>{nx}</pix_x><pix_y>{ny}</pix_y><raw_file filename="scan_x{nx}_y{ny}.raw"/>\
<exposure_time>1</exposure_time><scan_parameters mode="search"><scan_resolution_x>64\
</scan_resolution_x><scan_size>0.55</scan_size><scan_resolution_y>64</scan_resolution_y>\
</scan_parameters><scan_parameters mode="acquire"><scan_resolution_x>128</scan_resolution_x>\
<scan_size>0.55</scan_size><scan_resolution_y>128</scan_resolution_y></scan_parameters>\
<iom_measurements><optics.get_cameralength>0.7225</optics.get_cameralength>\
<source.get_voltage>300000.0</source.get_voltage><optics.get_full_scan_field_of_view>\
[4.5663426505682195e-06, 4.5663426505682195e-06]</optics.get_full_scan_field_of_view>\
<calibrated_pixelsize>1.826537060227288e-10</calibrated_pixelsize></iom_measurements></root>"""


def _empad_raw(path, frames):
    raw = np.zeros((len(frames), 130, 128), "<f4")
    raw[:, :128] = frames
    raw.tofile(path)


def test_older_empad_xml(tmp_path):
    frames = _frames(12, (128, 128), "<f4")
    _empad_raw(tmp_path / "scan_x4_y3.raw", frames)
    xml = tmp_path / "map4x3.xml"
    xml.write_text(OLD_EMPAD_XML.format(nx=4, ny=3))
    s = diffgpu.load(xml)
    assert s.axes_manager.navigation_shape == (4, 3)
    np.testing.assert_array_equal(s.data.compute(), frames.reshape(3, 4, 128, 128))
    for axis in s.axes_manager.navigation_axes:  # the field of view spans the larger side
        assert axis.scale == pytest.approx(4.5663426505682195e-06 / 4 * 1e9)
        assert axis.units == "nm"
    assert s.calibration.scale == pytest.approx((0.1826537060227288,) * 2)
    assert s.calibration.units == "1/nm"
    assert s.calibration.beam_energy == pytest.approx(300.0)
    assert s.metadata.Acquisition_instrument.TEM.camera_length == pytest.approx(722.5)


def test_empad_raw_file_of_the_search_scan(tmp_path):
    # the raw file holds the "search" scan's frames, not the "acquire" scan's
    frames = _frames(6, (128, 128), "<f4")
    _empad_raw(tmp_path / "scan.raw", frames)
    xml = tmp_path / "scan.xml"
    xml.write_text('<root><raw_file filename="scan.raw"/><scan_parameters mode="search">'
                   '<scan_resolution_x>3</scan_resolution_x><scan_resolution_y>2'
                   '</scan_resolution_y></scan_parameters><scan_parameters mode="acquire">'
                   '<scan_resolution_x>8</scan_resolution_x><scan_resolution_y>8'
                   '</scan_resolution_y></scan_parameters><iom_measurements>'
                   '<full_scan_field_of_view><scale_factor>0.72</scale_factor><x>1.44e-07</x>'
                   '</full_scan_field_of_view></iom_measurements></root>')
    s = diffgpu.load(xml)
    assert s.axes_manager.navigation_shape == (3, 2)
    assert s.axes_manager.navigation_axes[0].scale == pytest.approx(1.44e-07 / 0.72 / 3 * 1e9)
    np.testing.assert_array_equal(s.data.compute(), frames.reshape(2, 3, 128, 128))
    # a raw file that holds none of the recorded scans is still an error
    _empad_raw(tmp_path / "scan.raw", frames[:5])
    with pytest.raises(ValueError, match="needs 64 frames"):
        diffgpu.load(xml)


def test_empad_q_calibration(tmp_path):
    frames = _frames(4, (128, 128), "<f4")
    _empad_raw(tmp_path / "scan_x2_y2.raw", frames)
    xml = tmp_path / "scan.xml"
    xml.write_text('<root><raw_file filename="scan_x2_y2.raw"/></root>')
    s = diffgpu.load(xml, q_calibration=0.3315)  # RosettaSciIO's keyword, in 1/nm per pixel
    assert s.calibration.scale == pytest.approx((0.3315, 0.3315))
    assert s.calibration.units == "1/nm"
    assert s.axes_manager.signal_axes[0].offset == pytest.approx(-63.5 * 0.3315)
    with pytest.raises(ReaderArgumentError, match="q_calibration"):
        diffgpu.load(xml, q_calibration=-1)


def test_transposed_4d_dm4_is_refused(tmp_path):
    counts = _frames(12, (8, 8)).reshape(3, 4, 8, 8)
    path = tmp_path / "scan.dm4"
    # GMS's older layout, tagged: read as frames, every "frame" would be pixels of the scan
    write_dm4(path, counts, meta_data={"Format": "Diffraction image", "Data Order Swapped": 0})
    with pytest.raises(ValueError, match="stored transposed.*Data Order Swapped") as err:
        diffgpu.load(path)
    assert str(path) in str(err.value)
    # C order, tagged as such (newer GMS) or not tagged: the frames
    for meta in ({"Format": "Diffraction image", "Data Order Swapped": 1}, None):
        write_dm4(path, counts, meta_data=meta)
        np.testing.assert_array_equal(diffgpu.load(path).data.compute(), counts)


def test_info_names_the_files_that_hold_the_frames(tmp_path):
    from diffgpu.fileinfo import describe

    master = write_arina(tmp_path, _frames(16, (16, 16)))
    rows = dict(describe(master))
    assert "1 file beside it" in rows["frames in"] and "test_00_data_000001.h5" in rows["frames in"]
    frames = _frames(4, (128, 128), "<f4")
    _empad_raw(tmp_path / "scan_x2_y2.raw", frames)
    (tmp_path / "scan.xml").write_text('<root><raw_file filename="scan_x2_y2.raw"/></root>')
    assert "scan_x2_y2.raw" in dict(describe(tmp_path / "scan.xml"))["frames in"]
