"""Synthetic 4D-STEM data built lazily, chunk by chunk, with the truth kept alongside.

Datasets of any size cost no disk and no memory until computed: every dask
chunk renders its own frames from the model below with a random generator
seeded by the chunk's position, so a chunk is the same whichever worker
makes it, whenever.

Model of one frame (expected counts at each pixel centre, pixel convention of
:mod:`diffgpu.calibration`):

* a direct beam: a disc of radius ``beam_radius`` with a soft (0.5 px) edge,
  ``beam_counts`` electrons in total;
* polycrystalline rings at ``ring_radii`` around the beam, Gaussian in radius
  (``ring_width`` = sigma), peak ``ring_counts`` per pixel, with a weak
  azimuthal texture;
* a diffuse background decaying with radius;
* the beam, rings and background all drift together across the scan: a
  linear descan of ``drift`` pixels end to end plus a small sinusoidal wobble.

Poisson noise is drawn and the result stored as ``uint16`` like a counting
detector (saturating at 65535).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["synthetic_4dstem", "beam_centers", "scattering_map", "orientation_patterns",
           "zone_axis_rotations",
           "grain_map"]


def beam_centers(nav_shape, center, drift=(4.0, 3.0), wobble=0.3):
    """True beam centre ``(x, y)`` in pixels at every scan position.

    Parameters
    ----------
    nav_shape : tuple of int
        Scan shape ``(rows,)`` or ``(rows, columns)``.
    center : tuple of float
        Beam centre ``(x, y)`` of the linear descan at the middle of the scan (the wobble
        moves the beam up to ``wobble`` pixels off it).
    drift : tuple of float
        Linear descan ``(dx, dy)`` in pixels from the first to the last scan
        column (dx) and row (dy).
    wobble : float
        Amplitude in pixels of a smooth sinusoidal deviation from the plane.

    Returns
    -------
    numpy.ndarray
        ``nav_shape + (2,)`` array of ``(x, y)``.

    Examples
    --------
    >>> from diffgpu.data import beam_centers
    >>> beam_centers((4, 5), (64.0, 60.0)).shape
    (4, 5, 2)
    """
    nav_shape = tuple(int(n) for n in nav_shape)
    if len(nav_shape) == 1:
        return beam_centers((1,) + nav_shape, center, drift, wobble)[0]
    if len(nav_shape) != 2:
        raise ValueError(f"nav_shape must have 1 or 2 entries; got {nav_shape}")
    rows, cols = np.indices(nav_shape, dtype=float)
    ny, nx = nav_shape
    u = cols / max(nx - 1, 1) - 0.5  # -0.5 .. 0.5 across the scan
    v = rows / max(ny - 1, 1) - 0.5
    out = np.empty(nav_shape + (2,))
    out[..., 0] = center[0] + drift[0] * u + wobble * np.sin(2 * np.pi * (v + 0.3 * u))
    out[..., 1] = center[1] + drift[1] * v + wobble * np.cos(2 * np.pi * (u - 0.2 * v))
    return out


def scattering_map(nav_shape):
    """Relative scattering strength (0.6 to 1.4) at every scan position: the "sample".

    Rings are brighter and the direct beam dimmer where the sample scatters more,
    so bright-field and dark-field images show contrast: smooth blobs (grains) of a
    few scan pixels.

    Examples
    --------
    >>> from diffgpu.data import scattering_map
    >>> m = scattering_map((16, 16))
    >>> bool(0.6 <= m.min() and m.max() <= 1.4)
    True
    """
    nav_shape = tuple(int(n) for n in nav_shape)
    if len(nav_shape) == 1:
        return scattering_map((1,) + nav_shape)[0]
    rows, cols = np.indices(nav_shape, dtype=float)
    v = 0.5 * np.sin(2 * np.pi * cols / 11.0 + 0.4) * np.cos(2 * np.pi * rows / 9.0) \
        + 0.5 * np.sin(2 * np.pi * (cols + rows) / 17.0)
    return 1.0 + 0.4 * v


def _numbers(values, name, size=None, low=None, strict=False):
    """``values`` as a tuple of finite floats, checked: ``size`` of them, each ``>= low``
    (``> low`` when ``strict``); a ValueError naming ``name`` otherwise."""
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        arr = np.array([np.nan])
    below = low is not None and bool(np.any(arr <= low if strict else arr < low))
    if (size is not None and arr.size != size) or not np.all(np.isfinite(arr)) or below:
        want = f"{size} finite numbers" if size else "finite numbers"
        if low is not None:
            want += f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be {want}; got {values!r}")
    return tuple(float(v) for v in arr)


def _render(centers, strength, sig_shape, ring_radii, ring_width, ring_counts, beam_radius,
            beam_counts, background, noise, dtype, rng):
    """Frames for the given ``(..., 2)`` centres: the model, with Poisson noise."""
    ny, nx = sig_shape
    y = np.arange(ny, dtype=np.float32)[:, None]
    x = np.arange(nx, dtype=np.float32)[None, :]
    flat = centers.reshape(-1, 2).astype(np.float32)
    out = np.empty((flat.shape[0], ny, nx), dtype=dtype)
    disc_area = np.pi * beam_radius**2
    limit = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else None
    strength = strength.reshape(-1)
    for i, (cx, cy) in enumerate(flat):
        dx = x - cx
        dy = y - cy
        r = np.sqrt(dx * dx + dy * dy)
        phi = np.arctan2(dy, dx)
        lam = background * np.exp(-r / (0.25 * max(nx, ny)))
        for k, (rk, ck) in enumerate(zip(ring_radii, ring_counts)):
            texture = 1.0 + 0.3 * np.cos((k + 2) * phi + 0.7 * k)
            lam += strength[i] * ck * texture * np.exp(-0.5 * ((r - rk) / ring_width) ** 2)
        edge = np.exp(np.minimum((r - beam_radius) / 0.5, 60.0))  # soft edge, no overflow
        lam += (1.4 - 0.4 * strength[i]) * (beam_counts / disc_area) / (1.0 + edge)
        frame = rng.poisson(lam) if noise else lam
        if limit is not None:
            # the expected counts to the nearest whole count: a cast alone truncates
            frame = np.clip(frame if noise else np.rint(frame), 0, limit)
        out[i] = frame
    return out.reshape(centers.shape[:-1] + (ny, nx))


def synthetic_4dstem(
    nav_shape=(32, 32),
    sig_shape=(256, 256),
    *,
    center=None,
    ring_radii=None,
    ring_width=1.5,
    ring_counts=None,
    beam_radius=None,
    beam_counts=2.0e5,
    background=2.0,
    drift=(4.0, 3.0),
    wobble=0.3,
    noise=True,
    dtype="uint16",
    chunks="auto",
    seed=0,
    lazy=True,
):
    """A 4D-STEM dataset of ring patterns with a drifting direct beam, built lazily.

    Parameters
    ----------
    nav_shape : tuple of int
        Scan shape ``(rows, columns)`` (or ``(n,)`` for a line scan).
    sig_shape : tuple of int
        Detector shape ``(rows, columns)``.
    center : tuple of float, optional
        Beam centre ``(x, y)`` in pixels of the linear descan at the middle of the scan
        (the wobble moves the beam up to ``wobble`` pixels off it); default just off the
        detector middle, ``(0.5 * nx + 1.3, 0.5 * ny - 2.1)``.
    ring_radii : sequence of float, optional
        Ring radii in pixels; default 0.18, 0.3 and 0.42 of the smaller detector side.
    ring_width : float
        Gaussian sigma of each ring in pixels.
    ring_counts : sequence of float, optional
        Peak expected counts per pixel of each ring; default 40, 25, 15.
    beam_radius : float, optional
        Direct-beam disc radius in pixels; default 3 % of the smaller side (>= 2).
    beam_counts : float
        Total expected counts in the direct beam.
    background : float
        Expected counts per pixel of the diffuse background at the beam.
    drift, wobble : see :func:`beam_centers`.
    noise : bool
        Draw Poisson noise (counts); else store the expected counts (rounded to whole
        counts for an integer ``dtype``).
    dtype : str or numpy.dtype
        Output type, an integer, float or bool dtype; ``uint16`` like a counting detector.
        Integer types saturate at their largest value.
    chunks : "auto", int or tuple of int
        Dask chunks of the navigation axes (the detector is never split): one number for
        every scan axis or one per axis. ``"auto"`` makes diffgpu's chunks of whole frames
        (:func:`diffgpu.chunking.frame_chunks` for 4 threads, whatever the host: about 8 MiB,
        and the same frames on every machine).
    seed : int
        Seed, >= 0; each chunk draws from its own generator seeded by ``(seed, position)``.
    lazy : bool
        Return a lazy signal (default) or compute it now.

    Returns
    -------
    LazyDiffractionPatterns or DiffractionPatterns
        Calibrated in pixels with ``calibration.center`` at ``center``. The truth
        is in ``metadata.Synthetic``: ``beam_centers`` (``nav_shape + (2,)``,
        ``(x, y)`` pixels), ``scattering`` (the sample's relative scattering strength
        per scan position), ``ring_radii`` (pixels) and the model parameters.

    Raises
    ------
    ValueError
        A shape, size, count or ``seed`` out of range or not finite, before anything is
        computed.
    TypeError
        A ``dtype`` that is not an intensity (complex, text, object).

    Examples
    --------
    >>> import diffgpu
    >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(8, 8), sig_shape=(64, 64))
    >>> s
    <LazyDiffractionPatterns, title: Synthetic 4D-STEM, dimensions: (8, 8|64, 64)>
    >>> s.metadata.Synthetic.beam_centers.shape
    (8, 8, 2)
    >>> frame = s.inav[0, 0].data.compute()
    >>> frame.dtype, frame.shape
    (dtype('uint16'), (64, 64))

    A dataset of 100 GB costs nothing until it is computed:

    >>> big = diffgpu.data.synthetic_4dstem(nav_shape=(880, 880), sig_shape=(256, 256))
    >>> round(big.data.nbytes / 1e9)
    102
    """
    import dask.array as da

    from .signals import LazyDiffractionPatterns

    nav_shape = tuple(int(n) for n in nav_shape)
    sig_shape = tuple(int(n) for n in sig_shape)
    if len(nav_shape) not in (1, 2) or min(nav_shape) < 1:
        raise ValueError(f"nav_shape must be 1 or 2 positive sizes; got {nav_shape}")
    if len(sig_shape) != 2 or min(sig_shape) < 4:
        raise ValueError(f"sig_shape must be (rows, columns), each >= 4; got {sig_shape}")
    ny, nx = sig_shape
    side = min(ny, nx)
    if center is None:
        center = (0.5 * nx + 1.3, 0.5 * ny - 2.1)
    if ring_radii is None:
        ring_radii = (0.18 * side, 0.30 * side, 0.42 * side)
    ring_radii = _numbers(ring_radii, "ring_radii", low=0.0)
    if ring_counts is None:
        ring_counts = (40.0, 25.0, 15.0)[: len(ring_radii)] + (15.0,) * max(0, len(ring_radii) - 3)
    ring_counts = _numbers(ring_counts, "ring_counts", low=0.0)
    if len(ring_counts) != len(ring_radii):
        raise ValueError("ring_counts and ring_radii must have the same length")
    if beam_radius is None:
        beam_radius = max(2.0, 0.03 * side)
    # checked here, not in the chunks: a lazy signal would fail only when computed
    center = _numbers(center, "center", size=2)
    drift = _numbers(drift, "drift", size=2)
    (ring_width,) = _numbers([ring_width], "ring_width", low=0.0, strict=True)
    (beam_radius,) = _numbers([beam_radius], "beam_radius", low=0.0, strict=True)
    (beam_counts,) = _numbers([beam_counts], "beam_counts", low=0.0)
    (background,) = _numbers([background], "background", low=0.0)
    (wobble,) = _numbers([wobble], "wobble")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"dtype must be an integer, float or bool dtype (the frames hold "
                        f"counts); got {dtype}")

    centers = beam_centers(nav_shape, center, drift, wobble)
    strength = scattering_map(nav_shape)
    shape = nav_shape + sig_shape
    if isinstance(chunks, str) and chunks == "auto":
        # diffgpu's own chunks of whole frames (two or more per host thread where the data
        # allow): one 32 MiB chunk made the frames on one thread, and every operation after
        from .chunking import frame_chunks

        # chunking fixed for 4 threads, not this host's: each chunk draws its own noise, so
        # the frames are then the same on every machine
        chunks = frame_chunks(nav_shape, math.prod(sig_shape) * dtype.itemsize, workers=4) + \
            ((sig_shape[0],), (sig_shape[1],))
    else:
        if isinstance(chunks, (int, np.integer)):  # the same for every scan axis, as in dask
            chunks = (chunks,) * len(nav_shape)
        if not isinstance(chunks, (tuple, list)) or len(chunks) != len(nav_shape):
            raise ValueError(f"chunks must be 'auto', one number or one per scan axis "
                             f"({len(nav_shape)}: the detector is never split); got {chunks!r}")
        chunks = da.core.normalize_chunks(tuple(chunks) + (-1, -1), shape)
    params = dict(
        sig_shape=sig_shape, ring_radii=tuple(float(r) for r in ring_radii),
        ring_width=float(ring_width), ring_counts=tuple(float(c) for c in ring_counts),
        beam_radius=float(beam_radius), beam_counts=float(beam_counts),
        background=float(background), noise=bool(noise), dtype=dtype,
    )

    def block(block_info=None):
        loc = block_info[None]["array-location"][: len(nav_shape)]
        sl = tuple(slice(a, b) for a, b in loc)
        rng = np.random.default_rng([seed] + [a for a, _ in loc])
        return _render(centers[sl], strength[sl], rng=rng, **params)

    data = da.map_blocks(block, dtype=dtype, chunks=chunks, meta=np.empty((0,) * len(shape), dtype))
    s = LazyDiffractionPatterns(data)
    s.metadata.General.title = "Synthetic 4D-STEM"
    s.calibration.center = center
    s.calibration.units = "px"
    for ax, name in zip(s.axes_manager.navigation_axes, ("x", "y")):
        ax.name = name
    for ax, name in zip(s.axes_manager.signal_axes, ("kx", "ky")):
        ax.name = name
    md = {
        "beam_centers": centers,
        "scattering": strength,
        "ring_radii": list(params["ring_radii"]),
        "ring_width": params["ring_width"],
        "beam_radius": params["beam_radius"],
        "ring_counts": list(params["ring_counts"]),
        "beam_counts": params["beam_counts"],
        "background": params["background"],
        "noise": params["noise"],
        "center": list(map(float, center)),
        "drift": list(map(float, drift)),
        "wobble": float(wobble),
        "seed": int(seed),
    }
    s.metadata.set_item("Synthetic", md)
    if not lazy:
        s.compute(show_progressbar=False)
    return s


def orientation_patterns(phase, rotations, sig_shape=(256, 256), calibration=0.01,
                         accelerating_voltage=200.0, reciprocal_radius=1.2,
                         max_excitation_error=0.05, spot_sigma=1.5, counts=2.0e4,
                         beam_counts=2.0e4, seed=0, noise=True):
    """Spot patterns of a crystal at known orientations (diffsims kinematics, our drawing).

    diffsims computes the spots (positions in 1/Å, kinematic intensities) of
    ``phase`` at every rotation; each spot is drawn as a Gaussian of
    ``spot_sigma`` pixels at column ``x / calibration + cx``, row
    ``y / calibration + cy`` (diffsims' own orientation, the one
    :meth:`~diffgpu.PolarPatterns.get_orientation` expects), with the direct beam at the
    detector middle. Intensities are scaled so the spots hold ``counts`` electrons in
    total, plus ``beam_counts`` in the direct beam, with Poisson noise.

    Parameters
    ----------
    phase : orix.crystal_map.Phase
        With structure and space group (e.g. ``TemplateLibrary.silicon()``).
    rotations : orix.quaternion.Rotation
        One per pattern; the result's scan is one-dimensional (``rotations.size``).

    Returns
    -------
    DiffractionPatterns
        Calibrated in 1/Å, centred; ``metadata.Synthetic.rotations`` holds the true
        rotations as quaternions ``(n, 4)``, ``metadata.Synthetic.n_spots`` the number of
        reflections drawn in each pattern (0 where the orientation excites no allowed
        one: a pattern of the direct beam alone, which shows no crystal; reflections
        weaker than 1e-8 of the phase's strongest, extinct ones at rounding level, are not
        drawn).

    Examples
    --------
    >>> from orix.quaternion import Rotation
    >>> import diffgpu
    >>> s = diffgpu.data.orientation_patterns(diffgpu.TemplateLibrary.silicon(),
    ...                                       Rotation.random(2), sig_shape=(64, 64))
    >>> s.data.shape
    (2, 64, 64)
    """
    from diffsims.generators.simulation_generator import SimulationGenerator

    from .signals import DiffractionPatterns

    ny, nx = sig_shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    gen = SimulationGenerator(accelerating_voltage=accelerating_voltage, minimum_intensity=1e-10)
    sim = gen.calculate_diffraction2d(phase, rotation=rotations, reciprocal_radius=reciprocal_radius,
                                      max_excitation_error=max_excitation_error,
                                      with_direct_beam=False)
    coords = sim.coordinates if rotations.size > 1 else [sim.coordinates]
    rng = np.random.default_rng(seed)
    out = np.zeros((rotations.size, ny, nx), dtype=np.float32)
    y, x = np.indices(sig_shape, dtype=np.float64)
    reach = int(np.ceil(4 * spot_sigma))
    norm = 1.0 / (2 * np.pi * spot_sigma**2)
    # reflections weaker than 1e-8 of the phase's strongest are extinct ones that diffsims keeps
    # at rounding level (its minimum_intensity is relative to each pattern's strongest spot):
    # scaled up to ``counts`` they made a pattern of forbidden spots where an orientation
    # excites no allowed one (as TemplateLibrary leaves them out of its templates)
    top = max((float(np.max(v.intensity)) for v in coords if np.size(v.intensity)), default=0.0)
    n_spots = np.zeros(len(coords), dtype=np.int64)
    for i, vec in enumerate(coords):
        inten = np.asarray(vec.intensity, dtype=float)
        keep = inten >= 1e-8 * top
        n_spots[i] = int(keep.sum())
        xy = np.asarray(vec.data)[keep, :2] / calibration
        inten = inten[keep]
        inten = counts * inten / inten.sum() if inten.sum() > 0 else inten
        spots = list(zip(xy[:, 0] + cx, xy[:, 1] + cy, inten)) + [(cx, cy, beam_counts)]
        for px, py, amp in spots:
            j0, j1 = max(int(px) - reach, 0), min(int(px) + reach + 2, nx)
            i0, i1 = max(int(py) - reach, 0), min(int(py) + reach + 2, ny)
            if j1 <= j0 or i1 <= i0:
                continue
            d2 = (x[i0:i1, j0:j1] - px) ** 2 + (y[i0:i1, j0:j1] - py) ** 2
            out[i, i0:i1, j0:j1] += amp * norm * np.exp(-0.5 * d2 / spot_sigma**2)
    if noise:
        out = rng.poisson(out).astype(np.float32)
    s = DiffractionPatterns(out)
    s.metadata.General.title = f"Simulated {phase.name} patterns"
    s.calibration.center = (cx, cy)
    s.calibration.scale = calibration
    s.calibration.units = "1/Å"
    s.calibration.beam_energy = accelerating_voltage
    s.metadata.set_item("Synthetic.rotations", rotations.data.reshape(-1, 4))
    s.metadata.set_item("Synthetic.phase", phase.name)
    s.metadata.set_item("Synthetic.n_spots", n_spots)  # 0: no reflection excited, no crystal seen
    return s


def zone_axis_rotations(n, directions=((0, 0, 1), (1, 1, 0), (1, 1, 1), (1, 1, 2)), tilt=0.0,
                        seed=0):
    """Rotations that put the beam down crystal zone axes, tilted by up to ``tilt`` degrees.

    Pattern ``i`` looks down ``directions[i % len(directions)]`` (crystal indices), tilted
    off it by an angle uniform in ``[0, tilt]`` about a random axis in the detector plane,
    and turned about the beam by a random angle. In orix's convention, which diffsims and
    :meth:`~diffgpu.OrientationMatches.to_rotations` follow, a rotation's matrix takes laboratory to
    crystal coordinates (crystal symmetries act on the left), so the beam ``z`` lands on
    ``R.to_matrix() @ [0, 0, 1]`` in the crystal: that is ``R = ~r0 * tilt * spin``, with
    ``r0`` taking the zone axis to ``z`` and ``spin`` about ``z`` acting first.

    Parameters
    ----------
    n : int
        How many rotations.
    directions : sequence of 3-tuples
        Crystal directions (cubic indices, Cartesian in the crystal frame).
    tilt : float
        Largest tilt off the zone axis, degrees.
    seed : int

    Returns
    -------
    orix.quaternion.Rotation ``(n,)``

    Examples
    --------
    >>> import numpy as np
    >>> r = zone_axis_rotations(4, tilt=0.0)
    >>> np.round(r.to_matrix()[2] @ [0, 0, 1] * np.sqrt(3), 6).tolist()   # down [111]
    [1.0, 1.0, 1.0]
    """
    from orix.quaternion import Rotation

    rng = np.random.default_rng(seed)
    out = []
    for i in range(int(n)):
        target = np.asarray(directions[i % len(directions)], dtype=np.float64)
        target /= np.linalg.norm(target)
        axis = np.cross(target, [0.0, 0.0, 1.0])
        angle = np.arccos(np.clip(target[2], -1, 1))
        if np.linalg.norm(axis) < 1e-9:  # along z already (or against it)
            axis = np.array([1.0, 0.0, 0.0])
        r0 = Rotation.from_axes_angles(axis, angle)
        a = rng.uniform(0, 2 * np.pi)
        tilt_r = Rotation.from_axes_angles([np.cos(a), np.sin(a), 0],
                                           np.deg2rad(rng.uniform(0, tilt)))
        spin = Rotation.from_axes_angles([0, 0, 1], rng.uniform(0, 2 * np.pi))
        out.append((~r0 * tilt_r * spin).data.reshape(4))
    return Rotation(np.array(out))


def grain_map(phase=None, nav_shape=(16, 16), n_grains=5, sig_shape=(128, 128), calibration=0.02,
              seed=0, orientations=None, **kwargs):
    """A 2D scan over a polycrystal: Voronoi grains of random orientations, spot patterns.

    Every scan position shows the pattern of its grain's orientation (from
    :func:`orientation_patterns`, with its own Poisson noise). ``orientations`` (an orix
    ``Rotation`` of ``n_grains``) sets the grains' orientations, e.g. twins side by side.

    Returns
    -------
    DiffractionPatterns
        Scan ``nav_shape``; ``metadata.Synthetic.rotations`` holds the true rotation of
        every scan position ``(rows * columns, 4)`` and ``metadata.Synthetic.grains`` the
        grain index map.

    Examples
    --------
    >>> import diffgpu
    >>> s = diffgpu.data.grain_map(nav_shape=(4, 4), n_grains=2, sig_shape=(64, 64))
    >>> s.data.shape, s.metadata.Synthetic.grains.shape
    ((4, 4, 64, 64), (4, 4))
    """
    from orix.quaternion import Rotation

    from .templates import TemplateLibrary

    phase = phase or TemplateLibrary.silicon()
    rng = np.random.default_rng(seed)
    rows, cols = nav_shape
    seeds = rng.uniform(0, 1, (n_grains, 2)) * [rows, cols]
    r, c = np.indices(nav_shape)
    grains = np.argmin((r[..., None] - seeds[:, 0]) ** 2 + (c[..., None] - seeds[:, 1]) ** 2, axis=-1)
    if orientations is None:
        state = np.random.get_state()
        np.random.seed(seed)
        orientations = Rotation.random(n_grains)
        np.random.set_state(state)
    elif orientations.size != n_grains:
        raise ValueError(f"orientations: {orientations.size} given for {n_grains} grains")
    per_position = Rotation(orientations.data[grains.ravel()])
    s = orientation_patterns(phase, per_position, sig_shape=sig_shape, calibration=calibration,
                             seed=seed, **kwargs)
    s.data = s.data.reshape(nav_shape + tuple(sig_shape))
    out = type(s)(s.data, metadata=s.metadata.as_dictionary())
    out.calibration.center = s.calibration.center
    out.calibration.scale = calibration
    out.calibration.units = "1/Å"
    out.metadata.set_item("Synthetic.grains", grains)
    out.metadata.General.title = f"Simulated {phase.name} grain map"
    return out
