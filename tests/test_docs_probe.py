"""A first hour with diffgpu: the user guide's snippets run as written, and what they found.

The ``.. code-block:: python`` snippets of docs/calibration.rst, docs/synthetic_data.rst
and docs/strain_mapping.rst are run as a user pastes them (sizes made small where the
page says a size is the user's choice); the other tests pin down what a first run with
``diffgpu.data.synthetic_4dstem`` and ``diffgpu demo`` got wrong.
"""

from pathlib import Path

import numpy as np
import pytest

import diffgpu

DOCS = Path(__file__).resolve().parents[1] / "docs"


def snippets(page):
    """The ``.. code-block:: python`` blocks of a docs page, dedented, in order."""
    out = []
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        block = []
        for body in lines[i + 1:]:
            if body.strip() and not body.startswith("   "):
                break
            block.append(body[3:])
        out.append("\n".join(block).strip("\n") + "\n")
    return out


def test_calibration_page_snippet_runs(tmp_path, monkeypatch):
    (code,) = snippets("calibration.rst")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "calibration.rst", "exec"), ns)
    s = ns["s"]
    assert s.calibration.center == pytest.approx((130.2, 126.8))
    assert s.calibration.scale == pytest.approx((0.01, 0.01))
    assert s.calibration.units == "1/Å"
    assert s.calibration.mask.shape == (256, 256)
    assert round(s.calibration.wavelength, 5) == 0.02508


def test_synthetic_data_page_snippet_runs():
    (code,) = snippets("synthetic_data.rst")
    ns = {}
    exec(compile(code, "synthetic_data.rst", "exec"), ns)
    s = ns["s"]
    assert round(s.data.nbytes / 1e9) == 102  # "102 GB, lazy": nothing computed
    assert s.metadata.Synthetic.beam_centers.shape == (880, 880, 2)


@pytest.mark.slow
def test_strain_page_snippet_runs(tmp_path, monkeypatch):
    """The worked example's lines, on the example's data at a small size."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffgpu.synthetic_nbed import ring_pattern, synthetic_nbed

    code = snippets("strain_mapping.rst")[0]
    distortion = np.array([[1.01, 0.0], [0.0, 0.99]])
    gold = [2.3546, 2.0391, 1.4419, 1.2296, 1.1773]
    s = synthetic_nbed(nav_shape=(10, 12), sig_shape=(128, 128), distortion=distortion,
                       dose=3e6, lazy=True)
    ns = {"s": s, "beam_centre": s.calibration.center,
          "ring_image": ring_pattern((128, 128), center=(64.7, 62.8), scale=1.35 / 128,
                                     distortion=distortion, d_spacings=gold)}
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a reference region partly strained here
        exec(compile(code, "strain_mapping.rst", "exec"), ns)
    plt.close("all")
    assert (tmp_path / "exx.tif").stat().st_size > 0
    assert abs(ns["cal"].ellipticity - 0.0202) < 2e-3
    assert ns["strain"].data.shape == (10, 12, 4)


def test_synthetic_noise_free_integer_frames_hold_rounded_counts():
    """``noise=False`` stores the expected counts; into uint16 they were truncated (cut
    down by 0.46 counts per pixel on average, the background of 1.9 stored as 1)."""
    kw = dict(nav_shape=(2, 2), sig_shape=(32, 32), noise=False)
    exact = diffgpu.data.synthetic_4dstem(dtype="float32", **kw).data.compute()
    stored = diffgpu.data.synthetic_4dstem(**kw).data.compute()
    assert stored.dtype == np.uint16
    assert np.abs(stored - exact).max() <= 0.5
    assert abs(float(np.mean(stored - exact))) < 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(ring_width=0), "ring_width"),
    (dict(beam_radius=-1), "beam_radius"),
    (dict(beam_counts=-5), "beam_counts"),
    (dict(background=float("nan")), "background"),
    (dict(ring_counts=(40, -1, 15)), "ring_counts"),
    (dict(ring_radii=(10, float("inf"))), "ring_radii"),
    (dict(center=(1,)), "center"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(dtype="complex64"), "dtype"),
    (dict(chunks=(1,)), "chunks"),
])
def test_synthetic_parameters_checked_before_anything_is_computed(kwargs, match):
    """Bad parameters gave NaN-free nonsense (no beam, a divide-by-zero warning per frame),
    complex frames that diffgpu then refuses, or an error from NumPy or dask at compute
    time that named no parameter."""
    with pytest.raises((ValueError, TypeError), match=match):
        diffgpu.data.synthetic_4dstem(nav_shape=(2, 3), sig_shape=(16, 16), **kwargs)


def test_synthetic_chunks_one_number_for_every_scan_axis():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(16, 16), chunks=2)
    assert s.data.chunks[:2] == ((2, 2), (2, 2, 2))


def test_synthetic_metadata_keeps_every_model_parameter():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16), beam_counts=1e4,
                                      background=3.0, noise=False)
    md = s.metadata.Synthetic
    assert md.beam_counts == 1e4 and md.background == 3.0 and md.noise is False
    assert list(md.ring_counts) == [40.0, 25.0, 15.0]


@pytest.mark.slow
def test_demo_runs_on_a_scan_too_small_for_a_plane_fit(tmp_path):
    """``diffgpu demo --nav 1 1`` (or 1 2) stopped with 'too few valid scan positions to
    fit a plane', which says nothing of --nav."""
    from diffgpu.demo import main_job

    path = main_job(str(tmp_path), (1, 2), (32, 32), "cpu", verbose=False)
    assert Path(path).stat().st_size > 0
    assert (tmp_path / "orientation_map.png").stat().st_size > 0


def test_ring_pattern_default_geometry_fits_any_detector():
    """``ring_pattern((128, 128))`` centred its rings at (130.3, 124.8), a 256 x 256
    detector's default: on 128 x 128 only a quarter of each ring was on the detector."""
    from diffgpu.synthetic_nbed import ring_pattern

    for side in (64, 128, 256):
        img = ring_pattern((side, side), dose=None)
        y, x = np.indices(img.shape)
        cx, cy = (img * x).sum() / img.sum(), (img * y).sum() / img.sum()
        assert abs(cx - (side - 1) / 2) < 0.05 * side and abs(cy - (side - 1) / 2) < 0.05 * side
        # every quadrant holds a quarter of the rings (none falls off the detector)
        h, w = side // 2, side // 2
        quads = [img[:h, :w].sum(), img[:h, w:].sum(), img[h:, :w].sum(), img[h:, w:].sum()]
        assert min(quads) > 0.15 * img.sum()
    big = ring_pattern((256, 256), dose=None)  # the 256 x 256 default is unchanged
    same = ring_pattern((256, 256), center=(130.3, 124.8), scale=0.0105, dose=None)
    np.testing.assert_array_equal(big, same)
