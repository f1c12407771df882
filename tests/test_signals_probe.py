"""Signal classes behaving as HyperSpy signals: what slicing, cropping, rebinning and plotting
keep, found by using them as a HyperSpy / pyxem user would."""

import matplotlib
import numpy as np
import pytest

import diffgpu

matplotlib.use("Agg")


def _masked_scan(lazy=False):
    """A 3 x 4 scan of 16 x 16 patterns, calibrated, with two masked pixels."""
    s = diffgpu.DiffractionPatterns(np.random.default_rng(0).random((3, 4, 16, 16)).astype("f4"))
    s.calibration.center = (7.0, 8.0)
    s.calibration.scale = 0.1
    s.calibration.units = "1/nm"
    mask = np.zeros((16, 16), bool)
    mask[2, 3] = mask[9, 12] = True  # (row, column)
    s.calibration.mask = mask
    return (s.as_lazy() if lazy else s), mask


@pytest.mark.parametrize("lazy", [False, True])
def test_isig_crops_the_mask_with_the_detector(lazy):
    s, mask = _masked_scan(lazy)
    c = s.isig[2:14, 1:12]  # columns 2-13 (x), rows 1-11 (y)
    np.testing.assert_array_equal(c.calibration.mask, mask[1:12, 2:14])
    assert c.calibration.center == pytest.approx((5.0, 7.0))
    # calibrated (float) bounds and steps slice the mask as they slice the data
    image = diffgpu.DiffractionPatterns(mask.astype("f4"))
    image.axes_manager.signal_axes[0].update_from(s.axes_manager.signal_axes[0], ("scale", "offset"))
    image.axes_manager.signal_axes[1].update_from(s.axes_manager.signal_axes[1], ("scale", "offset"))
    f = s.isig[-0.5:0.55, ::2]
    np.testing.assert_array_equal(f.calibration.mask, image.isig[-0.5:0.55, ::2].data > 0)
    assert f.calibration.mask.shape == f.axes_manager.signal_shape[::-1]
    # the cropped signal's operations take its own mask
    assert c.get_azimuthal_integral1d(npt=4).data.shape == (3, 4, 4)
    assert c.center_of_mass().data.shape == (3, 4, 2)
    v = c.get_virtual_image(np.ones((11, 12)))
    kept = np.asarray(c.data) * ~mask[1:12, 2:14]  # both bad pixels lie inside the crop
    np.testing.assert_allclose(np.asarray(v.data), kept.sum(axis=(-2, -1)), rtol=1e-5)


def test_navigation_slicing_keeps_the_mask():
    s, mask = _masked_scan()
    np.testing.assert_array_equal(s.inav[1:3, 0].calibration.mask, mask)
    np.testing.assert_array_equal(s.inav[0, 0].calibration.mask, mask)


def test_isig_to_one_pixel_row_drops_the_detector_mask():
    s, _ = _masked_scan()
    line = s.isig[:, 2]  # a line of the detector is no longer a detector image
    assert not line.metadata.has_item("Diffraction.mask")
    assert s.calibration.mask is not None  # the original keeps its own


@pytest.mark.parametrize("how", ["crop", "crop_signal"])
def test_crop_in_place_crops_the_mask(how):
    s, mask = _masked_scan()
    if how == "crop":
        s.crop(2, 2, 14)  # x: columns 2-13
        s.crop(3, 1, 12)  # y: rows 1-11
    else:
        s.crop_signal(top=1, bottom=12, left=2, right=14)
    np.testing.assert_array_equal(s.calibration.mask, mask[1:12, 2:14])
    s.crop(0, 1, 3)  # a navigation axis: the detector is unchanged
    np.testing.assert_array_equal(s.calibration.mask, mask[1:12, 2:14])
    assert s.get_azimuthal_integral1d(npt=4).data.shape == (3, 2, 4)


@pytest.mark.parametrize("lazy", [False, True])
def test_rebin_rebins_the_mask(lazy):
    s, mask = _masked_scan(lazy)
    r = s.rebin(scale=(1, 1, 2, 2))
    expected = mask.reshape(8, 2, 8, 2).any(axis=(1, 3))  # a binned pixel holding a bad one is bad
    np.testing.assert_array_equal(r.calibration.mask, expected)
    assert r.get_azimuthal_integral1d(npt=4).data.shape == (3, 4, 4)
    # binning only the scan leaves the detector, and its mask, as they were
    np.testing.assert_array_equal(s.rebin(scale=(2, 1, 1, 1)).calibration.mask, mask)
    if not lazy:  # up-sampling: every pixel drawn from a bad one is bad
        up = s.rebin(scale=(1, 1, 0.5, 0.5))
        np.testing.assert_array_equal(up.calibration.mask, np.kron(mask, np.ones((2, 2), bool)))


@pytest.mark.parametrize("nav", [(), (2, 3, 5)])
def test_lazy_strain_map_plots_like_hyperspy_off_a_2d_scan(nav):
    import matplotlib.pyplot as plt

    data = np.random.default_rng(0).random(nav + (4,)) * 0.01
    lazy = diffgpu.StrainMap(data).as_lazy()
    assert lazy.plot() is None  # HyperSpy's plot, with its navigator
    assert lazy._plot is not None and lazy._plot.is_active
    plt.close("all")


def test_lazy_strain_map_of_a_2d_scan_draws_its_four_maps():
    import matplotlib.pyplot as plt

    lazy = diffgpu.StrainMap(np.zeros((3, 5, 4))).as_lazy()
    fig = lazy.plot(limit=0.01)
    assert len(fig.axes) == 6 and fig.axes[0].images[0].get_clim() == (-0.01, 0.01)
    plt.close("all")


def test_vector_map_of_vectors_without_disks():
    v = diffgpu.BraggVectors(np.full((2, 3, 8, 3), np.nan, dtype="float32"))
    with pytest.raises(ValueError, match="no disks.*detector_shape"):
        v.get_vector_map()
    v.metadata.set_item("BraggDisks.detector_shape", [16, 12])
    bvm = v.get_vector_map()
    assert bvm.data.shape == (32, 24) and bvm.data.sum() == 0


@pytest.mark.parametrize("nav", [(4, 3), (5,)])
def test_virtual_images_sliced_by_detector_keep_their_own_descriptions(nav):
    from hyperspy.roi import CircleROI

    s = diffgpu.DiffractionPatterns(np.ones(nav + (16, 16), "f4"))
    rois = [CircleROI(7.5, 7.5, 3), np.ones((16, 16)), CircleROI(7.5, 7.5, 6, 4)]
    v = s.get_virtual_image(rois)
    described = list(v.metadata.VirtualDetectors.detectors)
    assert len(described) == 3
    assert v.inav[1].metadata.VirtualDetectors.detectors == [described[1]]
    assert v.inav[::2].metadata.VirtualDetectors.detectors == described[::2]
    assert v.inav[1:].metadata.VirtualDetectors.detectors == described[1:]
    assert v.as_lazy().inav[2].metadata.VirtualDetectors.detectors == [described[2]]
    # slicing the scan keeps every detector
    assert v.isig[1:3].metadata.VirtualDetectors.detectors == described


def test_pyxem_mask_becomes_the_calibration_mask(tmp_path):
    import hyperspy.api as hs

    p = hs.signals.Signal2D(np.random.default_rng(0).random((2, 3, 16, 16)))
    mask = np.zeros((16, 16), bool)
    mask[3, 4] = True
    # pyxem keeps its mask in metadata.General.mask (its integration uses it), as pyxem's
    # signal_type="electron_diffraction" and calibration.mask set it (pyxem need not be here)
    p.metadata.set_item("General.mask", mask)
    np.testing.assert_array_equal(diffgpu.as_diffraction_patterns(p).calibration.mask, mask)
    q = p.deepcopy()
    q.set_signal_type("diffraction_patterns")
    np.testing.assert_array_equal(q.calibration.mask, mask)
    assert not q.metadata.has_item("General.mask")  # moved: one mask, in one place
    removed = q.deepcopy()
    removed.calibration.mask = None
    assert removed.inav[0].calibration.mask is None  # and once removed, it stays removed
    p.save(tmp_path / "pyxem.zspy")
    back = diffgpu.load(tmp_path / "pyxem.zspy", signal_type="diffraction_patterns")
    np.testing.assert_array_equal(back.calibration.mask, mask)
    # ours wins where both are set; a pyxem mask that is no detector mask is left alone
    ours = np.eye(16, dtype=bool)
    q.calibration.mask = ours
    np.testing.assert_array_equal(diffgpu.as_diffraction_patterns(q).calibration.mask, ours)
    p.metadata.set_item("General.mask", np.ones((4, 4), bool))
    assert diffgpu.as_diffraction_patterns(p).calibration.mask is None


def test_strain_map_component_by_isig():
    data = np.random.default_rng(0).random((3, 5, 4)) * 0.01
    data[0, 0, 0] = np.nan
    m = diffgpu.StrainMap(data)
    m.metadata.set_item("Strain.n_failed", 1)
    exx = m.isig[0]  # one component: a plain HyperSpy signal
    np.testing.assert_array_equal(exx.data, data[..., 0])
    assert not exx.metadata.has_item("Strain.n_failed")
    assert m.isig[1:3].metadata.Strain.n_failed == 0
    assert m.inav[0, 0].metadata.Strain.n_failed == 1


def test_ipf_map_leaves_positions_without_a_match_black():
    import matplotlib.pyplot as plt
    from orix.quaternion import Rotation

    si = diffgpu.TemplateLibrary.silicon()
    lib = diffgpu.TemplateLibrary.from_phase(si, resolution=5.0, reciprocal_radius=1.0)
    np.random.seed(0)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(4), sig_shape=(96, 96),
                                          calibration=0.025, reciprocal_radius=1.0)
    s.data = s.data.astype("float32")
    s.data[1] = 0  # vacuum
    s.data[2] = np.nan  # a frame lost
    polar = s.get_azimuthal_integral2d(npt=32, npt_azim=180, radial_range=(0, 1.1))
    m = polar.get_orientation(lib, n_best=2)
    assert m.to_crystal_map().phase_id.tolist() == [0, -1, -1, 0]
    rgb = m.plot_ipf_map().images[0].get_array()
    assert rgb.shape == (1, 4, 3)
    # not indexed: black, as in plot_phase_map, not the colour of whichever template came first
    np.testing.assert_array_equal(rgb[0, 1:3], 0)
    assert rgb[0, 0].max() > 0 and rgb[0, 3].max() > 0
    plt.close("all")


def test_swapping_the_detector_axes_transposes_the_mask():
    s, mask = _masked_scan()
    s = s.isig[:, 1:]  # 16 x 15: a transposed mask would not fit the old shape
    mask = mask[1:]
    swapped = s.swap_axes(2, 3)
    np.testing.assert_array_equal(swapped.calibration.mask, mask.T)
    assert swapped.get_azimuthal_integral1d(npt=4).data.shape == (3, 4, 4)
    np.testing.assert_array_equal(s.swap_axes(0, 1).calibration.mask, mask)
    assert not s.swap_axes(0, 2).metadata.has_item("Diffraction.mask")


@pytest.mark.parametrize("lazy", [False, True])
def test_transpose_keeps_the_mask_with_the_detector(lazy):
    rng = np.random.default_rng(3)
    s = diffgpu.DiffractionPatterns(rng.random((3, 4, 8, 6), dtype=np.float32))
    mask = np.zeros((8, 6), bool)
    mask[1, 2] = True
    s.calibration.mask = mask
    s = s.as_lazy() if lazy else s
    # the detector's x and y exchanged: the mask transposed with the data
    t = s.transpose(signal_axes=[3, 2])
    np.testing.assert_array_equal(t.calibration.mask, mask.T)
    np.testing.assert_array_equal(np.asarray(t.data)[..., 2, 1], np.asarray(s.data)[..., 1, 2])
    np.testing.assert_array_equal(s.transpose(signal_axes=[2, 3]).calibration.mask, mask)
    # s.T: the scan is the signal now, and 3 x 4 is no detector of this mask
    assert not s.T.metadata.has_item("Diffraction.mask")
    # a square scan of the detector's shape: the stale mask would fit, and must still go
    sq = diffgpu.DiffractionPatterns(np.zeros((8, 6, 8, 6), np.float32))
    sq.calibration.mask = mask
    assert not sq.T.metadata.has_item("Diffraction.mask")
    assert [ax.name for ax in s.axes_manager._axes] == [ax.name for ax in t.axes_manager._axes]


def _strain_map(shape, lazy=False):
    rng = np.random.default_rng(5)
    data = rng.normal(0, 0.004, shape + (4,))
    m = diffgpu.StrainMap(data)
    for ax, name in zip(m.axes_manager.navigation_axes, "xy"):
        ax.name, ax.units, ax.scale, ax.offset = name, "nm", 2.0, 10.0
    return m.as_lazy() if lazy else m


@pytest.mark.parametrize("lazy", [False, True])
def test_strain_line_scan_plots_profiles_on_its_scale(lazy):
    import matplotlib.pyplot as plt

    fig = _strain_map((9,), lazy).plot(limit=0.02)
    ax_s, ax_t = fig.axes
    assert [ln.get_label() for ln in ax_s.lines[:3]] == ["exx", "eyy", "exy"]
    assert ax_s.get_ylim() == (-0.02, 0.02)
    np.testing.assert_allclose(ax_s.lines[0].get_xdata(), 10 + 2 * np.arange(9))
    assert ax_s.get_xlabel() == "x (nm)"
    plt.close("all")


def test_strain_map_plot_uses_the_scan_calibration_and_colours():
    import matplotlib.pyplot as plt

    fig = _strain_map((4, 5)).plot(limit=0.01, cmap="viridis")
    im = fig.axes[0].images[0]
    assert im.get_clim() == (-0.01, 0.01) and im.get_cmap().name == "viridis"
    # pixel edges: 5 columns of 2 nm from 10 nm, 4 rows, y down
    np.testing.assert_allclose(im.get_extent(), (9, 19, 17, 9))
    with pytest.raises(ValueError, match="limit"):
        _strain_map((4, 5)).plot(limit=-1)
    plt.close("all")


def test_strain_plot_says_when_its_settings_are_not_used():
    import matplotlib.pyplot as plt

    with pytest.warns(UserWarning, match="limit"):
        _strain_map((2, 3, 4)).plot(limit=0.01)
    plt.close("all")


def test_frames_one_per_chunk_are_merged_into_larger_chunks():
    # one frame per dask chunk: 4,096 tasks of a few microseconds' work each ran 200 times
    # slower than in memory; the chunks are merged into diffgpu's own first
    import dask.array as da

    frames = np.random.default_rng(0).integers(0, 100, (64, 64, 32, 32)).astype("uint16")
    s = diffgpu.DiffractionPatterns(da.from_array(frames, chunks=(1, 1, 32, 32))).as_lazy()
    profiles = s.get_azimuthal_integral1d(npt=16)
    assert profiles.data.npartitions <= 16
    np.testing.assert_allclose(profiles.data.compute(),
                               diffgpu.DiffractionPatterns(frames).get_azimuthal_integral1d(npt=16).data,
                               rtol=1e-6)
    # a few chunks of a small scan stay as they are
    few = diffgpu.DiffractionPatterns(da.from_array(frames[:4, :4], chunks=(1, 4, 32, 32))).as_lazy()
    assert few.get_azimuthal_integral1d(npt=16).data.chunks[0] == (1, 1, 1, 1)


def test_polar_transform_needs_azimuthal_bins():
    s = diffgpu.DiffractionPatterns(np.ones((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="npt_azim.*get_azimuthal_integral1d"):
        s.get_azimuthal_integral2d(npt=4, npt_azim=None)
    assert s.get_azimuthal_integral2d(npt=4, npt_azim=1).data.shape == (2, 4, 1)


def test_a_gain_with_inf_says_where_and_what_to_do():
    s = diffgpu.DiffractionPatterns(np.ones((2, 6, 6), np.float32))
    flat = np.ones((6, 6), np.float32)
    flat[2, 3] = 0  # a dead pixel of the flat field
    with np.errstate(divide="ignore"):
        gain = flat.mean() / flat
    with pytest.raises(ValueError, match=r"1 pixels, the first at \(row, column\) \(2, 3\).*gain of 0"):
        s.flat_field(gain=gain)


def test_results_keep_the_microscope_and_name_untitled_inputs():
    import hyperspy.api as hs

    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(32, 32), lazy=False)
    s.calibration.beam_energy = 200.0
    s.metadata.General.title = ""
    images = s.get_virtual_image(hs.roi.CircleROI(cx=0, cy=0, r=4))
    shifts = s.center_of_mass()
    for result, title in ((images, "Virtual image"), (shifts, "Centre of mass")):
        assert result.metadata.get_item("Acquisition_instrument.TEM.beam_energy") == 200.0
        assert result.metadata.General.title == title


@pytest.mark.parametrize("lazy", [False, True])
def test_patterns_to_pyxem_carry_the_mask_where_pyxem_reads_it(lazy):
    s = diffgpu.DiffractionPatterns(np.ones((2, 3, 16, 16), np.float32))
    s.calibration.scale, s.calibration.units = 0.02, "1/nm"
    mask = np.zeros((16, 16), bool)
    mask[:2] = True
    s.calibration.mask = mask
    s = s.as_lazy() if lazy else s
    p = s.to_pyxem()
    assert p.metadata.Signal.signal_type == "electron_diffraction"
    assert [ax.units for ax in p.axes_manager.signal_axes] == ["k_nm^-1", "k_nm^-1"]
    np.testing.assert_array_equal(p.metadata.General.mask, mask)
    assert p._lazy == lazy
    assert [ax.offset for ax in p.axes_manager.signal_axes] == \
        [ax.offset for ax in s.axes_manager.signal_axes]
    assert s.axes_manager.signal_axes[0].units == "1/nm"  # the original is left as it was


def test_synthetic_frames_do_not_depend_on_the_hosts_threads(monkeypatch):
    # each chunk draws its own noise: chunks that followed the thread count gave other
    # frames on another machine
    import diffgpu.device

    a = diffgpu.data.synthetic_4dstem(nav_shape=(16, 16), sig_shape=(64, 64), lazy=False).data
    monkeypatch.setattr(diffgpu.device, "host_threads", lambda: 16)
    b = diffgpu.data.synthetic_4dstem(nav_shape=(16, 16), sig_shape=(64, 64), lazy=False).data
    np.testing.assert_array_equal(a, b)
