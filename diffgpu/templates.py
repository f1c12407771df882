"""Template libraries for orientation mapping: from diffsims simulations or an orix phase.

A library keeps, for every template, its diffraction spots in polar form (radius in
1/Å, azimuth in degrees, intensity), the rotation that made it and its phase. For
matching it is rendered once onto the polar grid of the data (the radial axis of a
:class:`~diffgpu.PolarPatterns` signal and its number of azimuthal bins), Fourier
transformed along azimuth, and cut to the low frequencies that carry the signal.

Conventions
-----------
diffsims gives spot coordinates ``(x, y)`` in 1/Å in the detector plane and draws
them (``Simulation2D.get_diffraction_pattern``) at column ``x / calibration + cx``,
row ``y / calibration + cy``: the same orientation as diffgpu's pixel coordinates, so
a spot's azimuth is ``atan2(y, x)`` as in :mod:`diffgpu.geometry` (diffgpu expects
patterns in this orientation; pyxem's simulated datasets are flipped up/down). A
pattern that matches template ``i`` rotated in-plane by ``gamma`` degrees has its
spots at azimuth ``theta_i + gamma``; mirrored, at ``-theta_i + gamma``.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import numpy as np

from .kernels.render import render_spots

__all__ = ["TemplateLibrary", "library_for", "check_symmetry"]

# Libraries made from diffsims simulations passed to get_orientation, by id of the simulation:
# (content digest, library). An entry goes when its simulation is garbage-collected, and is
# replaced when the simulation's content no longer matches the digest.
_FROM_SIMULATION: dict = {}
_FROM_SIMULATION_LOCK = threading.Lock()


def _simulation_parts(simulation):
    phases = simulation.phases
    if isinstance(phases, (np.ndarray, list, tuple)):
        return list(phases), list(simulation.rotations), list(simulation.coordinates)
    return [phases], [simulation.rotations], [simulation.coordinates]


def _hash_array(h, a):
    try:  # the array's own buffer when it is contiguous (no copy, no conversion)
        h.update(a)
    except (BufferError, TypeError, ValueError):
        h.update(np.ascontiguousarray(a))
    h.update(str(getattr(a, "dtype", "")).encode())


def _simulation_digest(simulation):
    """A digest of everything :meth:`TemplateLibrary.from_simulation` reads (a few ms for
    1,081 templates: the spot arrays are hashed where they lie, not copied)."""
    h = hashlib.blake2b(digest_size=16)
    for phase, rot, coords in zip(*_simulation_parts(simulation)):
        group = getattr(getattr(phase, "point_group", None), "name", None)
        h.update(f"{getattr(phase, 'name', '')}|{group}|".encode())
        _hash_array(h, rot.data)
        coords = [coords] if not isinstance(coords, (np.ndarray, list, tuple)) else coords
        h.update(len(coords).to_bytes(8, "little"))
        update = h.update
        for vec in coords:  # ~8 ms for 1,081 templates: attribute access and hashing only
            data, inten = vec.data, vec.intensity
            try:
                update(data)
                update(inten)
            except (BufferError, TypeError, ValueError):  # not contiguous: hash a copy
                _hash_array(h, data)
                _hash_array(h, inten)
    h.update(repr(getattr(simulation, "reciporical_radius", None)).encode())
    return h.digest()


def library_for(simulation):
    """The :class:`TemplateLibrary` of a diffsims ``Simulation2D``, made once per simulation.

    Passing the same simulation to ``get_orientation`` again reuses the library and the
    templates it prepared for matching (pyxem's way of calling, without the cost of
    preparing the library on every call). The cache lives as long as the simulation
    object, and a simulation whose rotations, spots or phases changed gets a new library.

    Examples
    --------
    >>> from orix.sampling import get_sample_reduced_fundamental
    >>> from diffsims.generators.simulation_generator import SimulationGenerator
    >>> from diffgpu.templates import TemplateLibrary, library_for
    >>> si = TemplateLibrary.silicon()
    >>> rots = get_sample_reduced_fundamental(resolution=10, point_group=si.point_group)
    >>> sim = SimulationGenerator(200).calculate_diffraction2d(si, rotation=rots,
    ...                                                        with_direct_beam=False)
    >>> library_for(sim) is library_for(sim)
    True
    """
    digest = _simulation_digest(simulation)
    key = id(simulation)
    with _FROM_SIMULATION_LOCK:
        entry = _FROM_SIMULATION.get(key)
        if entry is not None and entry[0] == digest:
            return entry[1]
    library = TemplateLibrary.from_simulation(simulation)
    try:  # forget it with the simulation, so that a new object with the same id starts afresh
        weakref.finalize(simulation, _FROM_SIMULATION.pop, key, None)
    except TypeError:  # cannot be weakly referenced: no way to know its lifetime, so no cache
        return library
    with _FROM_SIMULATION_LOCK:
        _FROM_SIMULATION[key] = (digest, library)
    return library


def check_symmetry(phase, radius=1.0):
    """Refuse a phase whose point group is not a symmetry of its own structure.

    orix takes the point group from the space group's number in its own setting (a
    monoclinic 2/m with its two-fold axis along z, the c axis), while the structure's atoms
    and lattice may be in another (P2_1/c with b the unique axis: its two-fold along y in
    orix's crystal frame, x along a, z along c*). The library would then sample the wrong
    fundamental zone and every orientation would be reduced by the wrong symmetry: on
    simulated P2_1/c patterns a third of them came out 180 degrees off. Here every proper
    rotation of the point group must map the reciprocal lattice within ``radius`` (1/Å)
    onto itself with the same kinematic intensities (Friedel's law covers the improper
    ones).

    Raises
    ------
    ValueError
        Naming the phase, its point group and a rotation that is not a symmetry.

    Examples
    --------
    >>> check_symmetry(TemplateLibrary.silicon())
    """
    from diffsims.utils.sim_utils import get_kinematical_intensities
    from orix.quaternion import Rotation
    from orix.vector import Miller
    from scipy.spatial import cKDTree

    if phase.structure is None or len(phase.structure) == 0 or phase.point_group is None:
        return
    # every reflection within radius: |h| = |g . a| <= radius |a| (a box of whole shells,
    # unlike a d-spacing search's, which cut hexagonal shells short)
    lat = phase.structure.lattice
    top = [int(np.ceil(radius * x)) for x in (lat.a, lat.b, lat.c)]
    hkl = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in top], indexing="ij"),
                   axis=-1).reshape(-1, 3)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    g = Miller(hkl=hkl, phase=phase).data
    inside = np.linalg.norm(g, axis=1) <= radius
    hkl, g = hkl[inside], g[inside]
    if not len(g):
        return
    f2 = np.asarray(get_kinematical_intensities(phase.structure, hkl, 1 / np.linalg.norm(g, axis=1),
                                                prefactor=1, scattering_params="lobato"))
    tree = cKDTree(g)
    tol = 1e-6 * max(radius, 1.0)
    # (a reflection on the radius may be in or out by rounding: its image is looked up only)
    inner = np.linalg.norm(g, axis=1) <= radius * (1 - 1e-6)
    for op in phase.point_group.proper_subgroup.to_matrix():
        dist, at = tree.query(g[inner] @ op.T)
        same = np.isclose(f2[at], f2[inner], rtol=1e-4, atol=1e-6 * f2.max())
        if np.all(dist <= tol) and np.all(same):
            continue
        axis = Rotation.from_matrix(op).axis.data.reshape(3)
        angle = np.rad2deg(Rotation.from_matrix(op).angle.reshape(-1)[0])
        raise ValueError(
            f"the point group of phase {phase.name!r} ({phase.point_group.name}, from its space "
            f"group) is not a symmetry of its structure: its {angle:.0f} degree rotation about "
            f"{np.round(axis, 3).tolist()} (orix's crystal frame: x along a, z along c*) moves "
            "reflections to where there are none or others of different intensity. orix puts "
            "a monoclinic phase's two-fold axis along c: give the lattice and atoms in the "
            "setting whose unique axis is c (alpha = beta = 90 degrees), not b")


def _without_extinct(spots, floor=1e-8):
    """One phase's templates ``[(3, n_i)]`` without the spots weaker than ``floor`` times the
    phase's strongest: the extinct reflections that diffsims keeps at rounding-level
    intensities (1e-19 of an allowed one) where an orientation excites no allowed one (its
    ``minimum_intensity`` is relative to each pattern's strongest spot). Normalised for
    matching, such a template was as strong as any and matched real patterns (an fcc Cu
    pattern best at 0.18), with orientations that no spot supports."""
    top = max((float(s[2].max()) for s in spots if s.shape[1]), default=0.0)
    return [s[:, s[2] >= floor * top] for s in spots]


class TemplateLibrary:
    """Diffraction templates: spots, rotations and phases (one or several phases).

    Build it with :meth:`from_simulation` (a diffsims ``Simulation2D``) or
    :meth:`from_phase` (an orix ``Phase`` and an angular resolution).

    Attributes
    ----------
    phases : list of orix.crystal_map.Phase
    rotations : orix.quaternion.Rotation
        One per template (``size == len(self)``).
    phase_index : numpy.ndarray of int
        Phase of every template (index into ``phases``).
    reciprocal_radius : float
        Largest spot radius simulated, 1/Å.

    Examples
    --------
    >>> from diffgpu.templates import TemplateLibrary
    >>> lib = TemplateLibrary.from_phase(TemplateLibrary.silicon(), resolution=4.0)
    >>> len(lib) > 10, lib.phases[0].name
    (True, 'Si')
    """

    def __init__(self, spots, rotations, phase_index, phases, reciprocal_radius):
        self.spots = spots  # list of (r [1/Å], theta [deg], intensity) arrays per template
        self.rotations = rotations
        self.phase_index = np.asarray(phase_index, dtype=np.int64)
        self.phases = list(phases)
        self.reciprocal_radius = float(reciprocal_radius)
        if len(self.spots) == 0:
            raise ValueError("the template library is empty")
        if not any(np.shape(t)[-1] for t in self.spots):
            raise ValueError(f"no template of the library has a spot (within {reciprocal_radius:g}"
                             " 1/Å and above the minimum intensity): raise reciprocal_radius or "
                             "lower minimum_intensity")
        if self.rotations.size != len(self.spots) or self.phase_index.size != len(self.spots):
            raise ValueError("templates, rotations and phase indices differ in number")
        for p in self.phases:
            if p.point_group is None:
                raise ValueError(f"phase {p.name!r} has no symmetry (space or point group); "
                                 "orientations need it")
        self._cache = {}  # flat spot arrays, kinematic models
        self._render_cache = {}  # matching's prepared template spectra (one geometry at a time)
        # simulation parameters, for refinement (from_phase sets them; diffsims defaults)
        self.accelerating_voltage = 200.0
        self.max_excitation_error = 0.05

    def __len__(self):
        return len(self.spots)

    def __repr__(self):
        names = ", ".join(p.name for p in self.phases)
        return (f"<TemplateLibrary: {len(self)} templates of {names}, spots to "
                f"{self.reciprocal_radius:g} 1/Å>")

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_simulation(cls, simulation):
        """A library from a diffsims ``Simulation2D`` (one phase or several).

        A phase whose point group is not a symmetry of its structure (a monoclinic
        structure with b the unique axis: orix puts the two-fold along c) is refused, with
        a ValueError: see :func:`~diffgpu.templates.check_symmetry`.

        Examples
        --------
        >>> from orix.sampling import get_sample_reduced_fundamental
        >>> from diffsims.generators.simulation_generator import SimulationGenerator
        >>> from diffgpu.templates import TemplateLibrary
        >>> si = TemplateLibrary.silicon()
        >>> rots = get_sample_reduced_fundamental(resolution=5, point_group=si.point_group)
        >>> sim = SimulationGenerator(200).calculate_diffraction2d(si, rotation=rots,
        ...                                                        with_direct_beam=False)
        >>> len(TemplateLibrary.from_simulation(sim)) == rots.size
        True
        """
        phases, _, _ = _simulation_parts(simulation)
        for p in phases:  # (from_phase checks its phases before simulating)
            check_symmetry(p, min(float(getattr(simulation, "reciporical_radius", 1.0) or 1.0),
                                  1.0))
        return cls._from_simulation(simulation)

    @classmethod
    def _from_simulation(cls, simulation):
        from orix.quaternion import Rotation

        phases, rotations, coordinates = _simulation_parts(simulation)
        spots, quats, index = [], [], []
        for i, (phase, rot, coords) in enumerate(zip(phases, rotations, coordinates)):
            coords = [coords] if not isinstance(coords, (np.ndarray, list, tuple)) else list(coords)
            own = []
            for vec in coords:
                xy = np.asarray(vec.data)[:, :2]
                inten = np.asarray(vec.intensity, dtype=float)
                r = np.hypot(xy[:, 0], xy[:, 1])
                keep = r > 1e-9  # the direct beam carries no orientation
                theta = np.rad2deg(np.arctan2(xy[keep, 1], xy[keep, 0]))
                own.append(np.stack([r[keep], theta, inten[keep]]))
            spots += _without_extinct(own)
            quats.append(rot.data.reshape(-1, 4))
            index.append(np.full(len(coords), i))
        rotations = Rotation(np.concatenate(quats))
        radius = getattr(simulation, "reciporical_radius", None) or max(
            float(s[0].max()) if s.shape[1] else 0.0 for s in spots)
        return cls(spots, rotations, np.concatenate(index), phases, radius)

    @classmethod
    def from_phase(cls, phase, resolution=1.0, accelerating_voltage=200.0, reciprocal_radius=1.5,
                   max_excitation_error=0.05, minimum_intensity=1e-10, phase_list=None):
        """Simulate a library over the reduced fundamental zone of ``phase`` with diffsims.

        Parameters
        ----------
        phase : orix.crystal_map.Phase or list of them
            With a structure (atoms and lattice) and a space group.
        resolution : float
            Angular spacing of the orientations, degrees (orix
            ``get_sample_reduced_fundamental``): 1 degree gives 1,081 templates for a
            cubic m-3m phase.
        accelerating_voltage : float
            kV.
        reciprocal_radius : float
            Largest spot radius to simulate, 1/Å: at most the radius the data cover.
        max_excitation_error : float
            1/Å; roughly the inverse thickness.
        minimum_intensity : float
            Spots weaker than this fraction of the strongest are left out.

        Raises
        ------
        ValueError
            A parameter out of its range, a phase without a structure, or a phase whose
            point group is not a symmetry of its structure (:func:`~diffgpu.templates.check_symmetry`).

        Examples
        --------
        >>> from diffgpu.templates import TemplateLibrary
        >>> lib = TemplateLibrary.from_phase(TemplateLibrary.silicon(), resolution=4.0)
        >>> lib.reciprocal_radius
        1.5
        """
        from diffsims.generators.simulation_generator import SimulationGenerator
        from orix.sampling import get_sample_reduced_fundamental

        for name, value in (("resolution", resolution), ("accelerating_voltage", accelerating_voltage),
                            ("reciprocal_radius", reciprocal_radius),
                            ("max_excitation_error", max_excitation_error)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if not 0 <= minimum_intensity < 1:
            raise ValueError("minimum_intensity is a fraction of the strongest spot, in [0, 1); "
                             f"got {minimum_intensity!r}")
        phases = phase if isinstance(phase, (list, tuple)) else [phase]
        for p in phases:
            if p.structure is None or len(p.structure) == 0:
                raise ValueError(f"phase {p.name!r} has no structure (atoms); diffsims needs "
                                 "one to simulate intensities")
            check_symmetry(p, min(float(reciprocal_radius), 1.0))
        gen = SimulationGenerator(accelerating_voltage=accelerating_voltage,
                                  minimum_intensity=minimum_intensity)
        rots = [get_sample_reduced_fundamental(resolution=resolution, point_group=p.point_group)
                for p in phases]
        try:
            sim = gen.calculate_diffraction2d(phases if len(phases) > 1 else phases[0],
                                              rotation=rots if len(phases) > 1 else rots[0],
                                              reciprocal_radius=reciprocal_radius,
                                              max_excitation_error=max_excitation_error,
                                              with_direct_beam=False)
        except ValueError as e:  # diffsims takes the maximum of an orientation's empty spots
            if "zero-size array" not in str(e):
                raise
            raise ValueError(f"some orientations excite no reflection within reciprocal_radius="
                             f"{reciprocal_radius:g} 1/Å (max_excitation_error="
                             f"{max_excitation_error:g} 1/Å): raise reciprocal_radius (to the "
                             "radius the data cover) or max_excitation_error") from None
        lib = cls._from_simulation(sim)
        lib.reciprocal_radius = float(reciprocal_radius)
        lib.accelerating_voltage = float(accelerating_voltage)
        lib.max_excitation_error = float(max_excitation_error)
        return lib

    @staticmethod
    def silicon(a=5.431):
        """An orix ``Phase`` of diamond-cubic silicon (Fd-3m), for examples and tests."""
        from diffpy.structure import Atom, Lattice, Structure
        from orix.crystal_map import Phase

        xyz = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5], [0.25, 0.25, 0.25],
               [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]]
        structure = Structure(atoms=[Atom("Si", p) for p in xyz], lattice=Lattice(a, a, a, 90, 90, 90))
        return Phase("Si", space_group=227, structure=structure)

    def kinematic_model(self, phase_index=0, accelerating_voltage=None, max_excitation_error=None):
        """The spot model of one phase for refinement: ``(g, f2, k, max_excitation_error,
        reciprocal_radius)``.

        ``g`` ``(N, 3)`` are the reciprocal lattice vectors (crystal frame, 1/Å) within the
        library's ``reciprocal_radius``, ``f2`` their kinematic intensities (diffsims,
        Lobato scattering factors; extinct ones left out), ``k = 1 / wavelength``.

        Examples
        --------
        >>> from diffgpu.templates import TemplateLibrary
        >>> lib = TemplateLibrary.from_phase(TemplateLibrary.silicon(), resolution=4.0,
        ...                                  reciprocal_radius=1.0)
        >>> g, f2, k, smax, radius = lib.kinematic_model()
        >>> g.shape[1], bool(np.all(np.linalg.norm(g, axis=1) <= 1.0 + 1e-9)), round(k, 2)
        (3, True, 39.87)
        """
        from diffsims.crystallography._diffracting_vector import DiffractingVector
        from diffsims.utils.sim_utils import get_electron_wavelength, get_kinematical_intensities

        voltage = float(accelerating_voltage or self.accelerating_voltage)
        smax = float(max_excitation_error or self.max_excitation_error)
        key = ("kinematic", phase_index, voltage)
        if key not in self._cache:
            phase = self.phases[phase_index]
            recip = DiffractingVector.from_min_dspacing(phase, min_dspacing=1 / self.reciprocal_radius,
                                                        include_zero_vector=False)
            f2 = get_kinematical_intensities(phase.structure, recip.hkl, recip.gspacing, prefactor=1,
                                             scattering_params="lobato")
            keep = f2 > 1e-8 * f2.max()
            self._cache[key] = (np.asarray(recip.data).reshape(-1, 3)[keep], np.asarray(f2)[keep],
                                1.0 / get_electron_wavelength(voltage))
        g, f2, k = self._cache[key]
        return g, f2, k, smax, self.reciprocal_radius

    # -- rendering for matching ----------------------------------------------------
    def key(self):
        """A digest identifying this library's content."""
        h = hashlib.blake2b(digest_size=12)
        h.update(self.rotations.data.tobytes())
        for s in self.spots:
            h.update(np.ascontiguousarray(s).tobytes())
        return h.hexdigest()

    def _flat_spots(self, gamma=None):
        """All templates' spots as flat arrays ``(offsets, r, theta, intensity)``, made once;
        with ``gamma``, the last is ``intensity ** gamma`` (kept for the last gamma asked)."""
        flat = self._cache.get("flat_spots")
        if flat is None:
            counts = [s.shape[1] for s in self.spots]
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            cat = np.concatenate([np.asarray(s, dtype=np.float64).reshape(3, -1) for s in self.spots],
                                 axis=1)
            flat = self._cache["flat_spots"] = (offsets, cat[0], cat[1], cat[2])
        if gamma is None:
            return flat
        # the weights of every spot, once per gamma: made for each slice drawn, they cost
        # 0.8 s in the first call with 25,651 templates (141 slices x 1.2 million powers)
        weights = self._cache.get("spot_weights")
        if weights is None or weights[0] != gamma:
            weights = self._cache["spot_weights"] = (gamma, np.power(np.maximum(flat[3], 0), gamma))
        return flat[:3] + (weights[1],)

    def render_polar(self, radii, n_azim, spot_sigma, gamma=0.5, normalize=True, templates=None):
        """Templates drawn on a polar grid: ``(n_templates, n_radii, n_azim)`` float32.

        ``templates`` (a slice or index array) draws only some of them.

        Each spot is a Gaussian of ``spot_sigma`` (1/Å, in the detector plane) at its
        (radius, azimuth), scaled by ``intensity ** gamma``; with ``normalize`` every
        template has unit L2 norm, so that large and small templates compete fairly.
        """
        chosen = np.arange(len(self))[templates] if templates is not None else np.arange(len(self))
        offsets, r, t, w = self._flat_spots(gamma)
        return render_spots(offsets, r, t, w, chosen, np.asarray(radii, dtype=float), n_azim,
                            spot_sigma, normalize)
