"""The compiled template renderer against a direct NumPy formulation of the same spots."""

import numpy as np
import pytest

from diffgpu.kernels.render import render_spots

pytest.importorskip("diffsims")


def _numpy_render(spots, radii, n_azim, sigma, gamma, normalize):
    """Every spot a Gaussian in the detector plane, summed over the whole grid (no cut-off)."""
    theta = (np.arange(n_azim) + 0.5) * 360.0 / n_azim - 180.0
    rr, tt = np.meshgrid(radii, np.deg2rad(theta), indexing="ij")
    out = np.zeros((len(spots), radii.size, n_azim))
    for i, (r, t, inten) in enumerate(spots):
        for rs, ts, w in zip(r, np.deg2rad(t), np.maximum(inten, 0) ** gamma):
            d2 = rr**2 + rs**2 - 2 * rr * rs * np.cos(tt - ts)
            out[i] += w * np.exp(-0.5 * d2 / sigma**2)
    if normalize:
        out /= np.maximum(np.sqrt((out**2).sum(axis=(1, 2))), 1e-300)[:, None, None]
    return out


@pytest.mark.parametrize("n_azim,normalize", [(360, True), (90, False), (720, True)])
def test_library_rendering_equals_numpy(n_azim, normalize):
    from diffgpu.templates import TemplateLibrary

    lib = TemplateLibrary.from_phase(TemplateLibrary.silicon(), resolution=6.0,
                                     reciprocal_radius=1.2)
    radii = np.linspace(0.01, 1.25, 48)
    sigma = 0.03
    pick = np.arange(0, len(lib), 7)
    got = lib.render_polar(radii, n_azim, sigma, gamma=0.4, normalize=normalize, templates=pick)
    want = _numpy_render([lib.spots[j] for j in pick], radii, n_azim, sigma, 0.4, normalize)
    scale = want.max(axis=(1, 2), keepdims=True)
    # the renderer draws each spot to 3 sigma: beyond that a Gaussian is below 1.2% of its peak
    assert np.abs(got - want).max() <= 0.012 * scale.max()
    assert np.abs(got - want).mean() <= 1e-4 * scale.max()


def test_spots_wrap_around_the_azimuth_and_reach_all_angles_near_the_centre():
    radii = np.linspace(0.005, 0.995, 100)
    # one spot at -179 degrees (its Gaussian wraps to +180) and one so close to the centre
    # that its 3-sigma reach covers every azimuth
    out = render_spots(np.array([0, 1, 2]), np.array([0.5, 0.02]), np.array([-179.0, 0.0]),
                       np.ones(2), np.array([0, 1]), radii, 360, 0.02)
    assert out[0, 50, 359] > 0.5 * out[0, 50, 0] > 0  # the last bin (+179.5 deg) is lit
    assert (out[1, 0] > 0).all()  # every azimuth at the smallest radius
