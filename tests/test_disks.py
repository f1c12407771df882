"""Bragg disk detection: accuracy, filters, lazy == eager, device path == host path."""

import numpy as np
import pytest

import diffgpu
from diffgpu.kernels.disks import DiskFinder, disk_image
from diffgpu.synthetic_nbed import synthetic_nbed


@pytest.fixture(scope="module")
def nbed():
    return synthetic_nbed(nav_shape=(3, 3), sig_shape=(128, 128), disk_radius=4.0, dose=5e7,
                          seed=3)


def _match(found, truth, radius=1.0):
    """Errors (found - true) of the found disks matched to the nearest true disk."""
    errs = []
    for f, t in zip(found.reshape(-1, *found.shape[-2:]), truth.reshape(-1, *truth.shape[-2:])):
        f = f[np.isfinite(f[:, 0]), :2]
        t = t[np.isfinite(t[:, 0])]
        d = np.linalg.norm(f[:, None] - t[None], axis=-1)
        j = d.argmin(1)
        ok = d[np.arange(len(f)), j] < radius
        errs.append(f[ok] - t[j[ok]])
    return np.concatenate(errs)


def test_positions_within_005_px_at_high_dose(nbed):
    v = nbed.find_bragg_disks(radius=4.0)
    assert isinstance(v, diffgpu.BraggVectors)
    truth = nbed.metadata.Synthetic.positions
    err = _match(v.data, truth)
    n_true = np.isfinite(truth[..., 0]).sum()
    assert len(err) >= 0.95 * n_true  # nearly every disk found
    rms = np.sqrt((err**2).mean(axis=0))
    assert np.all(rms <= 0.05), rms
    assert np.all(np.abs(err.mean(axis=0)) < 0.01)  # no systematic shift


def test_subpixel_bias_small_on_noise_free_disks():
    rng = np.random.default_rng(0)
    finder = DiskFinder((64, 64), disk_image(5.0), max_disks=4)
    from diffgpu.synthetic_nbed import _disk_coverage

    errs = []
    for _ in range(30):
        p = np.array([31.0, 30.0]) + rng.uniform(-0.5, 0.5, 2)
        frame = _disk_coverage(p[:1], p[1:], 5.0, (64, 64))[None] * 100
        errs.append(finder(frame)[0, 0, :2] - p)
    assert np.sqrt((np.array(errs) ** 2).mean()) < 0.01


def test_integer_positions_without_refinement():
    frame = np.zeros((1, 48, 48), np.float32)
    frame[0, 15:26, 20:31] = disk_image(4.0, size=11) * 50  # centred on (25, 20)
    out = DiskFinder((48, 48), disk_image(4.0), refine_iterations=0)(frame)
    assert out[0, 0, :2].tolist() == [25.0, 20.0]
    assert np.isnan(out[0, 1:]).all()


def test_lazy_equals_eager(nbed):
    eager = nbed.find_bragg_disks(radius=4.0, max_disks=80)
    lazy = nbed.as_lazy()
    lazy.rechunk(nav_chunks=(1, 2))
    lv = lazy.find_bragg_disks(radius=4.0, max_disks=80)
    assert isinstance(lv, diffgpu.LazyBraggVectors)
    lv.compute()
    np.testing.assert_array_equal(lv.data, eager.data)


def test_sorted_strongest_first_and_capacity(nbed):
    v = nbed.find_bragg_disks(radius=4.0, max_disks=10)
    assert v.data.shape[-2:] == (10, 3)
    inten = v.data[..., 2]
    assert np.all(np.diff(inten, axis=-1) <= 0)
    assert np.all(v.n_disks() == 10)
    full = nbed.find_bragg_disks(radius=4.0).data.reshape(-1, 128, 3)
    for few, many in zip(v.data.reshape(-1, 10, 3), full):  # the same disks, the strongest
        assert all(np.any(np.all(many == row, axis=1)) for row in few)
        assert few[-1, 2] >= np.sort(many[np.isfinite(many[:, 2]), 2])[::-1][11]


def test_filters_mask_edge_threshold(nbed):
    base = nbed.find_bragg_disks(radius=4.0)
    mask = np.zeros((128, 128), bool)
    mask[:, :64] = True
    left_out = nbed.find_bragg_disks(radius=4.0, mask=mask)
    x = left_out.data[..., 0]
    assert np.all(x[np.isfinite(x)] >= 63.5)
    edged = nbed.find_bragg_disks(radius=4.0, edge=30)
    xy = edged.data[..., :2]
    ok = np.isfinite(xy)
    assert np.all((xy[ok] >= 29.5) & (xy[ok] <= 127 - 29.5))
    strong = nbed.find_bragg_disks(radius=4.0, relative_threshold=0.3)
    assert strong.n_disks().sum() < base.n_disks().sum()
    rel = strong.data[..., 2] / np.nanmax(strong.data[..., 2], axis=-1, keepdims=True)
    assert np.nanmin(rel) >= 0.27  # thresholds apply on the pixel grid, before refinement


def test_measured_probe_template(nbed):
    probe = np.zeros((40, 40))
    probe[12:25, 14:27] = disk_image(4.0, size=13) * 1e4
    v = nbed.find_bragg_disks(template=probe)
    assert v.metadata.BraggDisks.template == "probe"
    assert abs(v.metadata.BraggDisks.radius - 4.0) < 0.2
    err = _match(v.data, nbed.metadata.Synthetic.positions)
    assert np.sqrt((err**2).mean()) < 0.05


def test_hybrid_correlation_still_finds_the_disks(nbed):
    v = nbed.find_bragg_disks(radius=4.0, correlation_power=0.5)
    err = _match(v.data, nbed.metadata.Synthetic.positions)
    assert len(err) > 0.9 * np.isfinite(nbed.metadata.Synthetic.positions[..., 0]).sum()
    assert np.sqrt((err**2).mean()) < 0.1


@pytest.mark.parametrize("kwargs, words", [
    ({}, "radius"),
    ({"radius": 4.0, "template": np.ones((5, 5))}, "not both"),
    ({"radius": -1.0}, "radius"),
    ({"radius": 4.0, "correlation_power": 2.0}, "correlation_power"),
    ({"radius": 4.0, "max_disks": 0}, "max_disks"),
    ({"radius": 4.0, "mask": np.zeros((5, 5), bool)}, "mask shape"),
])
def test_bad_parameters(nbed, kwargs, words):
    with pytest.raises(ValueError, match=words):
        nbed.find_bragg_disks(**kwargs)


def test_vector_map_and_counts(nbed):
    v = nbed.find_bragg_disks(radius=4.0)
    bvm = v.get_vector_map(weighted=False)
    assert bvm.data.shape == (256, 256)
    assert bvm.data.sum() == v.n_disks().sum()


def test_device_path_matches_host(nbed, standin_gpu, monkeypatch):
    import diffgpu.kernels.disks as kd

    monkeypatch.setattr(kd, "_DEVICE_BATCH", 4)  # 9 frames: three device batches
    host = nbed.find_bragg_disks(radius=4.0, max_disks=80)
    dev = nbed.deepcopy()
    dev.to_device()
    out = dev.find_bragg_disks(radius=4.0, max_disks=80)
    assert out.device == "gpu"
    out.to_host()
    np.testing.assert_array_equal(np.isfinite(out.data), np.isfinite(host.data))
    np.testing.assert_allclose(out.data, host.data, atol=2e-3, rtol=2e-4)
    lazy = nbed.as_lazy()
    lazy.to_device()
    lout = lazy.find_bragg_disks(radius=4.0, max_disks=80)
    assert lout.device == "gpu"
    lout.to_host()
    lout.compute()
    np.testing.assert_allclose(lout.data, host.data, atol=2e-3, rtol=2e-4)


def test_save_and_load_keep_the_class(nbed, tmp_path):
    v = nbed.find_bragg_disks(radius=4.0, max_disks=20)
    v.save(tmp_path / "v.zspy")
    back = diffgpu.load(tmp_path / "v.zspy", lazy=False)
    assert isinstance(back, diffgpu.BraggVectors)
    np.testing.assert_array_equal(back.data, v.data)


def test_non_finite_pixels_count_as_zero(nbed, standin_gpu):
    s = nbed.deepcopy()
    s.data[1, 1, 10:20, 10:20] = np.nan
    s.data[1, 1, 60, 60] = np.inf
    clean = nbed.find_bragg_disks(radius=4.0).data[1, 1]
    host = s.find_bragg_disks(radius=4.0).data[1, 1]
    assert np.isfinite(host[:, 0]).sum() >= np.isfinite(clean[:, 0]).sum() - 3
    s.to_device()
    dev = s.find_bragg_disks(radius=4.0)
    dev.to_host()
    np.testing.assert_allclose(dev.data[1, 1], host, atol=2e-3, rtol=2e-4)


def test_masked_hot_pixels_do_not_make_disks(nbed, standin_gpu):
    s = nbed.deepcopy()
    s.data[:, :, 30, 100] = 1e6  # a hot pixel between the disks
    hot = np.zeros((128, 128), bool)
    hot[30, 100] = True
    unmasked = s.find_bragg_disks(radius=4.0)
    near = np.hypot(unmasked.data[..., 0] - 100, unmasked.data[..., 1] - 30) < 3
    assert near.any(axis=-1).all()  # the hot pixel shows up as a disk in every frame...
    masked = s.find_bragg_disks(radius=4.0, mask=hot)
    near = np.hypot(masked.data[..., 0] - 100, masked.data[..., 1] - 30) < 3
    assert not near.any()  # ...and not once masked
    # nor does its correlation raise the relative threshold: the same disks as without it
    np.testing.assert_array_equal(masked.n_disks(), nbed.find_bragg_disks(radius=4.0,
                                                                          mask=hot).n_disks())
    s.to_device()
    dev = s.find_bragg_disks(radius=4.0, mask=hot)
    dev.to_host()
    np.testing.assert_allclose(dev.data, masked.data, atol=2e-3, rtol=2e-4)
