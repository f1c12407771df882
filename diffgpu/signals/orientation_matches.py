"""Orientation matches: the best templates for every pattern, and maps made from them."""

from __future__ import annotations

import functools

import numpy as np
from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ..device import to_host_array
from ._device import DeviceMixin, LazyDeviceMixin
from ._wrap import as_signal

__all__ = ["OrientationMatches", "LazyOrientationMatches"]


# metadata.Refined arrays with one entry per candidate (the ranks of the matches)
_PER_CANDIDATE = {"candidate_rotations", "candidate_scores", "contrast_scores", "similarity"}


@functools.lru_cache(maxsize=32)
def _phase_list(described):
    """orix phases from ``(name, space group, point group)``: made once (a few ms each, and
    every map and refinement asks for them); not to be changed by callers."""
    from orix.crystal_map import Phase, PhaseList

    # each phase its own colour (orix gives every new Phase tab:blue), tab10's as the phase map
    colours = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink",
                                    "gray", "olive", "cyan")]
    phases = [Phase(name, space_group=sg, color=colours[i % 10]) if sg > 0
              else Phase(name, point_group=pg, color=colours[i % 10])
              for i, (name, sg, pg) in enumerate(described)]
    return phases, PhaseList(phases)


def _indexed_phase(matches, significance=None, min_significance=5.0):
    """The best match's phase of matches ``(..., n_best, 5)``, or -1 (orix's "not indexed")
    where nothing matched: best correlation not above 0 (a blank or all-NaN frame), or, after
    refinement (``significance``, one per position), where the best orientation stands less
    than ``min_significance`` deviations above unrelated ones (vacuum, amorphous material,
    noise: some template always correlates above 0 there)."""
    best = matches[..., 0, :]
    found = best[..., 2] > 0
    if significance is not None:
        found &= np.asarray(significance).reshape(found.shape) >= min_significance
    return np.where(found, best[..., 1], -1).astype(np.int64)


class OrientationMatches(DeviceMixin, Signal2D):
    """The ``n_best`` template matches of every pattern, best first.

    Data ``(..., n_best, 5)``; the five fields are: template index, phase index,
    correlation (cosine-like: 1 for a pattern identical to its template),
    in-plane rotation in degrees, and mirror flag (+1 direct, -1 mirrored). The
    library's rotations and phases are kept in ``metadata.Library``, so the
    orientations can be rebuilt after saving and loading.

    Orientation convention (checked by round trips through diffsims in the tests):
    a pattern matching template rotation ``R`` turned in-plane by ``gamma`` degrees
    (its spots at azimuth ``theta + gamma``) has the orientation ``R * Rz(-gamma)``,
    because diffsims' ``R * Rz(a)`` turns a pattern by ``-a``; a mirrored match
    (spots at ``-theta + gamma``) is ``(R * C2y) * Rz(-gamma)`` with ``C2y = diag(-1, 1,
    -1)``, a half turn about the laboratory's y axis (by Friedel's law a pattern mirrored
    across x is the pattern of the crystal turned so), for crystals of any symmetry.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> m = diffgpu.OrientationMatches(np.zeros((4, 5, 3, 5), dtype="float32"))
    >>> m.axes_manager.signal_shape   # (fields, n_best)
    (5, 3)
    """

    _signal_type = "orientation_matches"

    def _slicer(self, slices, isNavigation=None, out=None):
        """HyperSpy's slicing, plus the refinement's per-position arrays in
        ``metadata.Refined`` (kept for the whole scan otherwise, and then no longer matching
        the sliced matches)."""
        result = super()._slicer(slices, isNavigation, out)
        refined = self.metadata.get_item("Refined")
        if refined is not None:
            target = out if out is not None else result
            n_nav = self.axes_manager.navigation_dimension
            nav = tuple(self.data.shape[:n_nav])
            every = tuple(self._get_array_slices(slices, isNavigation))
            for key, value in refined.as_dictionary().items():
                if isinstance(value, dict):
                    continue
                arr = np.asarray(value)
                if arr.shape[:n_nav] != nav:
                    continue
                # arrays with one entry per candidate follow the slicing of the ranks too
                per_rank = key in _PER_CANDIDATE
                target.metadata.set_item(f"Refined.{key}",
                                         arr[every[:n_nav + 1] if per_rank else every[:n_nav]])
        return result

    def _host_matches(self):
        """The matches in host memory, float64. Lazy matches are computed once per graph (dask
        names a graph by its content), not again by every method that needs them."""
        computed = self._computed_matches()
        if computed is None:
            computed = self._keep_matches(self.data.compute())
        return computed

    def _computed_matches(self):
        """The matches in host memory if they are (eager, or lazy and computed for this
        graph), else None."""
        if not self._lazy:
            return np.asarray(to_host_array(self.data), dtype=np.float64)
        name, computed = getattr(self, "_computed", (None, None))
        return computed if name == self.data.name else None

    def _keep_matches(self, computed):
        """Keep ``computed`` (this lazy graph's result) for :meth:`_host_matches`."""
        computed = np.asarray(to_host_array(computed), dtype=np.float64)
        self._computed = (self.data.name, computed)
        return computed

    def _indexed(self, min_significance=5.0):
        """:func:`_indexed_phase` of these matches: after refinement, positions without a
        crystal seen (``metadata.Refined.significance`` below ``min_significance``) are not
        indexed either."""
        return _indexed_phase(self._host_matches(), self.metadata.get_item("Refined.significance"),
                              min_significance)

    def _phases(self):
        lib = self.metadata.Library
        return _phase_list(tuple((str(name), int(sg), str(pg)) for name, sg, pg in
                                 zip(lib.phase_names, lib.space_groups, lib.point_groups)))

    def to_rotations(self):
        """orix ``Rotation`` of every match: shape ``navigation + (n_best,)``.

        After :meth:`refine`, the refined candidates' rotations (the best match's always).
        """
        from orix.quaternion import Rotation

        from ..orientation import match_quaternions

        m = self._host_matches()
        every = self.metadata.get_item("Refined.candidate_rotations")
        if every is not None:  # the candidates refined below the library's grid
            return Rotation(np.asarray(every).reshape(m.shape[:-1] + (4,)))
        q = match_quaternions(m, np.asarray(self.metadata.Library.rotations))
        rot = Rotation(q.reshape(-1, 4)).reshape(*m.shape[:-1])
        refined = self.metadata.get_item("Refined.rotations")
        if refined is not None:  # (refined before candidates were kept): the best match
            q = rot.data.copy()
            q[..., 0, :] = np.asarray(refined).reshape(q[..., 0, :].shape)
            rot = Rotation(q)
        return rot

    def to_orientations(self, rank=0):
        """orix ``Orientation`` of the ``rank``-th best match (single-phase libraries).

        Examples
        --------
        See :meth:`PolarPatterns.get_orientation`.
        """
        from orix.quaternion import Orientation, Rotation

        phases, _ = self._phases()
        m = self._host_matches()
        if len(phases) > 1 and len(np.unique(m[..., rank, 1])) > 1:
            raise ValueError("the best matches come from several phases: use to_crystal_map()")
        rot = self.to_rotations()
        rot = Rotation(rot.data[..., rank, :])
        phase = phases[int(m.reshape(-1, m.shape[-2], 5)[0, rank, 1])]
        return Orientation(rot, symmetry=phase.point_group)

    def to_crystal_map(self, min_significance=5.0):
        """An orix ``CrystalMap``: best orientations, phases, scores, mirror flags, positions.

        Its phase list is the library's, phases that no position has included
        (``xmap.phases_in_data`` lists those found).

        Properties: ``correlation``, ``mirror`` and ``template`` (all ``n_best`` ranks), and
        with ``n_best >= 2`` the ``reliability`` of :meth:`get_reliability`. Positions where
        nothing matched (best correlation not above 0: an empty or all-NaN frame) get
        phase id -1, orix's "not_indexed"; after :meth:`refine`, so do positions where no
        crystal is seen (vacuum, amorphous material, noise: the best orientation stands less
        than ``min_significance`` deviations above unrelated ones, as in
        :meth:`get_reliability`; ``-numpy.inf`` keeps them indexed). Scans of more than
        two dimensions are refused (a ValueError): orix maps hold lines and 2D scans.
        """
        from orix.crystal_map import CrystalMap

        _, phase_list = self._phases()
        m = self._host_matches()
        nav = m.shape[:-2]
        if len(nav) > 2:  # (its x would be the first axis only: every position on one point)
            raise ValueError(f"an orix CrystalMap holds a line or a 2D scan; these matches have "
                             f"{len(nav)} scan dimensions {self.axes_manager.navigation_shape}: "
                             "make one map per 2D slice, e.g. matches.inav[:, :, 0]"
                             ".to_crystal_map()")
        n_best = m.shape[-2]
        rot = self.to_rotations().reshape(-1, n_best)
        flat = m.reshape(-1, n_best, 5)
        axes = self.axes_manager.navigation_axes
        coords = {}
        if len(nav) >= 1:
            grids = np.meshgrid(*[ax.axis for ax in axes[::-1]], indexing="ij")  # row-major
            names = ("y", "x") if len(nav) == 2 else ("x",)
            for name, grid in zip(names, grids):
                coords[name] = grid.ravel()
        props = {"correlation": flat[:, :, 2] if n_best > 1 else flat[:, 0, 2],
                 "mirror": flat[:, :, 4] if n_best > 1 else flat[:, 0, 4],
                 "template": flat[:, :, 0] if n_best > 1 else flat[:, 0, 0]}
        if n_best >= 2:  # how clearly the best orientation wins (see get_reliability)
            props["reliability"] = self.get_reliability(
                min_significance=min_significance).data.ravel()
        unit = axes[0].units if axes and isinstance(axes[0].units, str) else "px"
        phase_id = self._indexed(min_significance).reshape(-1)
        xmap = CrystalMap(rotations=rot, phase_id=phase_id, phase_list=phase_list.deepcopy(),
                          prop=props, scan_unit=unit, **coords)
        # orix drops the phases no position has: a library phase absent from this scan
        # (or region) went missing, and maps of one library had different phase lists
        every = phase_list.deepcopy()
        if (phase_id == -1).any():
            every.add_not_indexed()
        xmap.phases = every
        return xmap

    def refine(self, polar, library, gamma=None, smooth=1.0, step=0.5, min_step=0.02,
               accelerating_voltage=None, max_excitation_error=None, candidates=3, margin=0.1,
               intensity_exponent=None, fit_center=True):
        """Refine every best match below the library's angular grid, and settle close calls.

        From each pattern's best match the crystal is turned in steps of ``step`` degrees
        about the laboratory x, y and z axes, keeping turns that raise the score and halving
        the step when none does, down to ``min_step``. The score compares the pattern with
        diffsims' kinematic spot model at the trial orientation (see
        :mod:`diffgpu.kernels.refine`). On simulated Si with a 1-degree library the median
        error fell from 1.0 to about 0.2 degrees (benchmarks/RESULTS.md).

        Where another orientation among the first ``candidates`` matches (more than 5
        degrees from the best, up to symmetry: a near-twin, another phase with similar
        rings), or the best-ranked such match among all ``n_best``, scored within ``margin``
        of the best, it is refined too, and the candidate whose refined spot model fits the
        pattern better becomes the best match: positions, intensities and excitation errors
        of the full pattern decide, not the template's coarse grid.
        ``metadata.Refined.changed_match`` marks where that changed the best match. Matches
        within 5 degrees of the best are not refined: they converge to its optimum.

        For :meth:`get_reliability`, refinement also records, for every candidate, its score
        on the pattern less its rings' background (``contrast_scores``) and how alike its
        noiseless pattern is to the best's (``similarity``), and looks for a twin that no
        template match can list: an orientation that maps the best's spots onto themselves
        without being a crystal symmetry (exactly down <111>, a cubic crystal turned 60
        degrees about the beam is the same template at another in-plane angle). Found twins
        are refined too (``twin_rotations``, ``twin_similarity``, ...). Patterns are compared
        at the spots' width, estimated from the sample (``parameters["spot_width"]``), or
        the radial bins' where wider.

        Parameters
        ----------
        polar : PolarPatterns or LazyPolarPatterns
            The patterns that were matched (same scan and calibration). Lazy patterns are
            read chunk by chunk; lazy matches not computed yet are computed in the same
            pass (each chunk of patterns made once for both). Device-resident patterns are
            refined on their GPU: only the candidates' matrices and scores cross, a block at
            a time (and a sample of up to 32 patterns, once, for ``intensity_exponent``);
            the result is in host memory.
        library : TemplateLibrary or diffsims Simulation2D
            The library the matches come from (its phases give the spot model), as it was
            given to ``get_orientation`` (a simulation's library is made once and reused).
            Its rotations and phases must be those recorded in ``metadata.Library``.
        gamma : float, optional
            Intensity scaling, as in matching (default: the one used for matching).
        smooth : float
            Gaussian smoothing of the polar patterns, in bins, >= 0 (1 bin: refined errors on
            simulated near-zone Si 0.08-0.16 degrees at 64-256 bins, against 0.11-0.19 with
            0.5; ``benchmarks/NOTES.md``).
        step, min_step : float
            First and last step of the search, degrees: positive, ``min_step <= step``.
        accelerating_voltage, max_excitation_error : float, optional
            Override the library's simulation parameters (kV, 1/Å): positive; None (default)
            keeps the library's.
        candidates : int
            Matches (of the ``n_best`` found, best first) that may be refined where they
            are another orientation within ``margin``. Besides them the best-ranked match of
            another orientation is always refined (the alternative that
            :meth:`get_reliability` weighs, which may also become the best match): with 1,
            the best and that one.
        margin : float
            A candidate is refined where its correlation is at least ``1 - margin`` times
            the best's.
        intensity_exponent : float, optional
            How the patterns' spot intensities scale with kinematic ones (``a`` in
            ``pattern ~ intensity ** a``): 0.5 for patterns raised to ``** 0.5`` before
            matching. Default: estimated from up to 32 of the patterns at their best matches
            (:func:`diffgpu.kernels.refine.estimate_exponent`); the model's spots are then
            weighted like the patterns' (``** (a * gamma)``), which keeps the refined tilt
            unbiased. Recorded in ``metadata.Refined.parameters``.
        fit_center : bool
            Estimate where the patterns' centre lies from the one they were integrated about
            (the offset common to the sample of up to 32 patterns, at their refined
            orientations: ``diffgpu.kernels.refine.estimate_center_offset``) and, where
            it is a quarter of a radial bin or more, resample every polar pattern about the
            estimated centre before refining: a centre one pixel off doubled the refined
            errors. ``parameters["center_offset"]`` (x, y in 1/Å) and
            ``parameters["recentred"]`` record it.

        Returns
        -------
        OrientationMatches
            In memory: the same matches, with ``metadata.Refined.rotations`` (the refined
            best orientations, used by :meth:`to_orientations`, :meth:`to_crystal_map` and
            the maps), ``metadata.Refined.candidate_rotations`` (every candidate, refined
            where it was; :meth:`to_rotations`) and ``metadata.Refined.score``.

        Raises
        ------
        ValueError
            Another scan or library than the matches', a parameter out of its range, or
            polar patterns that matching would refuse.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> from orix.quaternion import Orientation, Rotation
        >>> si = diffgpu.TemplateLibrary.silicon()
        >>> lib = diffgpu.TemplateLibrary.from_phase(si, resolution=2.0, reciprocal_radius=1.2)
        >>> truth = Rotation.random(8)
        >>> s = diffgpu.data.orientation_patterns(si, truth, sig_shape=(128, 128),
        ...                                       calibration=0.02)
        >>> polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28))
        >>> matches = polar.get_orientation(lib, n_best=2)
        >>> refined = matches.refine(polar, lib)
        >>> t = Orientation(truth, symmetry=si.point_group)
        >>> def error(m):
        ...     return t.angle_with(m.to_orientations(), degrees=True)
        >>> bool(np.median(error(refined)) < np.median(error(matches)))
        True
        """
        from ..orientation import refine_orientations

        return as_signal(refine_orientations(self, polar, library, gamma, smooth, step, min_step,
                                             accelerating_voltage, max_excitation_error,
                                             candidates, margin, intensity_exponent,
                                             fit_center))

    def get_reliability(self, min_misorientation=5.0, indistinguishable=0.995, min_significance=5.0):
        """How clearly the best match beats the best *different* orientation: a scan map in [0, 1].

        The alternative is the best-ranked match whose orientation is more than
        ``min_misorientation`` degrees away from the best one (up to crystal symmetry; a
        match of another phase always counts).

        *Matches as found* (before :meth:`refine`): ``1 - c_alt / c_best`` from the matching
        correlations. Near 0, two distinct orientations fit the pattern about equally well,
        whether or not their patterns truly differ.

        *After* :meth:`refine`, which refines the close candidates against the full spot
        model, the map separates the two cases:

        - **0: truly ambiguous.** The alternative's noiseless pattern is indistinguishable
          from the best's (their correlation, ``metadata.Refined.similarity``, is at least
          ``indistinguishable``): no pattern can decide between them (near some zone axes a
          twin predicts the same spots; see the docs, "What a pattern cannot tell").
        - **Above 0: resolved**, by how much: ``(1 - s_alt / s_best) / (1 - rho)``, where
          ``s`` are the two orientations' scores on the pattern less its rings' background
          (``metadata.Refined.contrast_scores``; refined orientations where refined) and
          ``rho`` the correlation of their noiseless patterns: the margin as a fraction of
          the margin a noiseless pattern of the best orientation would give. Near 1 the
          pattern looks like the best orientation's and not like the alternative's; near 0
          it lies halfway between two patterns that do differ.

        - Where none of the ``n_best`` matches (nor a twin) is another orientation, the
          alternative is the best-scoring of 128 fixed orientations unrelated to the best (a
          larger ``n_best`` looks further among the templates).
        - **0: no crystal seen.** The best orientation's contrast score stands less than
          ``min_significance`` standard deviations above those of the unrelated orientations
          (``metadata.Refined.significance``): the pattern does not show its spots (vacuum,
          amorphous material, noise), although some template always matches best. Simulated
          Si patterns stood at least 5.9 deviations above (500 to 20,000 counts in their
          spots); vacuum, amorphous rings and shot noise at most 4.5 (against the 16 used
          before the evening of 2026-12-07: 5.5-16 deviations and 1-3 on a few frames, overlapping on
          more). Vacuum frames with almost no counts besides the direct beam can stand 5-10
          deviations above, and a phase missing from the library is not detected
          (docs/orientation_mapping.rst). :meth:`to_crystal_map`
          and the phase and IPF maps leave these positions not indexed.

        Before refinement, when none of the ``n_best`` matches is far enough away, the last
        one's correlation is used, so the value is a lower bound. Needs ``n_best >= 2``;
        lazy matches are computed.

        Parameters
        ----------
        min_misorientation : float
            Degrees: matches closer than this to the best count as the same orientation.
        indistinguishable : float
            After refinement: alternatives whose noiseless pattern correlates at least this
            well with the best's make the pattern ambiguous (reliability 0).
        min_significance : float
            After refinement: patterns whose best orientation stands out less than this from
            unrelated ones show no crystal (reliability 0). 5 (4 before the evening of 2026-12-07, with 16
            unrelated orientations, which let noise and crystals overlap).

        Returns
        -------
        hyperspy.signals.Signal2D or Signal1D
            The map, with the scan's axes; after refinement ``metadata.Reliability`` gives
            the numbers of ambiguous positions and of positions without a crystal seen.

        Examples
        --------
        Two patterns exactly down <111> (a crystal turned 60 degrees about the beam gives the
        same spots) and two at random orientations:

        >>> import numpy as np, diffgpu
        >>> from orix.quaternion import Rotation
        >>> si = diffgpu.TemplateLibrary.silicon()
        >>> lib = diffgpu.TemplateLibrary.from_phase(si, resolution=3.0, reciprocal_radius=1.2)
        >>> np.random.seed(1)
        >>> truth = Rotation(np.concatenate([
        ...     diffgpu.data.zone_axis_rotations(2, [(1, 1, 1)]).data, Rotation.random(2).data]))
        >>> s = diffgpu.data.orientation_patterns(si, truth, sig_shape=(128, 128),
        ...                                       calibration=0.02)
        >>> polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28))
        >>> matches = polar.get_orientation(lib, n_best=5)
        >>> bool(np.all(matches.get_reliability().data < 0.1))   # margins: all close calls
        True
        >>> matches.refine(polar, lib).get_reliability().data.round(2).tolist()
        [0.0, 0.0, 1.0, 1.0]
        """
        import hyperspy.api as hs

        from ..orientation import distinct_candidates

        m = self._host_matches()
        n_best = m.shape[-2]
        if n_best < 2:
            raise ValueError("reliability compares the best match with the next ones: match with "
                             "n_best >= 2 (e.g. 5)")
        phases, _ = self._phases()
        flat = m.reshape(-1, n_best, 5)
        refined = self.metadata.get_item("Refined.similarity") is not None
        rot = self.to_rotations().data.reshape(-1, n_best, 4)
        if refined:  # the twin found by refinement joins the candidates as one more
            twin = np.asarray(self.metadata.Refined.twin_rotations).reshape(-1, 4)
            has_twin = np.isfinite(twin[:, 0])
            rot = np.concatenate([rot, np.where(has_twin[:, None], twin, rot[:, 0])[:, None]],
                                 axis=1)
            flat = np.concatenate([flat, flat[:, :1]], axis=1)
        far = distinct_candidates(rot, flat[:, :, 1], phases, min_misorientation)
        if refined:
            far[:, -1] &= has_twin
        none_far = ~far.any(axis=1)
        # no distinct match among the n_best: the last bounds them all
        far[:, n_best - 1] |= none_far
        rows = np.arange(len(flat))
        with np.errstate(divide="ignore", invalid="ignore"):
            if refined:
                R = self.metadata.Refined
                score = np.concatenate([np.asarray(R.contrast_scores).reshape(-1, n_best),
                                        np.asarray(R.twin_contrast_scores).reshape(-1, 1)],
                                       axis=1)
                sim = np.concatenate([np.asarray(R.similarity).reshape(-1, n_best),
                                      np.asarray(R.twin_similarity).reshape(-1, 1)], axis=1)
                alt = np.where(far, score, -np.inf).argmax(axis=1)
                s_best = score[:, 0]
                margin = 1 - score[rows, alt] / np.where(s_best > 0, s_best, np.nan)
                rho = sim[rows, alt]
                # any other orientation predicting the same pattern makes it ambiguous
                ambiguous = (far & (sim >= indistinguishable)).any(axis=1) & ~none_far
                margin = np.where(ambiguous, 0.0, margin / np.maximum(1 - rho, 1e-12))
                margin[none_far] = 1.0  # no other orientation at all (results before 12/2026)
                significance = R.get_item("significance")
                unseen = np.zeros(len(flat), bool)
                if significance is not None:  # (results refined before 2026-12-07 lack it)
                    unseen = ~(np.asarray(significance).reshape(-1) >= min_significance)
                    margin[unseen] = 0.0
            else:
                c_best = flat[:, 0, 2]
                margin = 1 - flat[rows, far.argmax(axis=1), 2] / np.where(c_best > 0, c_best,
                                                                          np.nan)
        rel = np.clip(np.nan_to_num(margin, nan=0.0), 0, 1)
        rel = rel.reshape(m.shape[:-2]).astype(np.float32)
        axes = self.axes_manager._get_navigation_axes_dicts()
        for ax in axes:
            ax["navigate"] = False
        cls = hs.signals.Signal2D if rel.ndim == 2 else hs.signals.Signal1D
        out = cls(rel, axes=axes)
        out.metadata.General.title = f"Reliability of {self.metadata.General.title}".strip()
        if refined:
            out.metadata.set_item("Reliability.ambiguous", int((ambiguous & ~unseen).sum()))
            out.metadata.set_item("Reliability.no_crystal", int(unseen.sum()))
            out.metadata.set_item("Reliability.min_significance", float(min_significance))
            out.metadata.set_item("Reliability.indistinguishable", float(indistinguishable))
        return out

    def get_phase_map(self, min_significance=5.0):
        """The phase of the best match at every position, as an image of phase indices.

        The phase names are in ``metadata.Phases.names`` (index ``i`` is
        ``names[i]``), the fraction of positions of each in ``metadata.Phases.fractions``.
        Positions where nothing matched (best correlation not above 0: a blank or all-NaN
        frame) and, after :meth:`refine`, where no crystal is seen (significance below
        ``min_significance``: vacuum, amorphous material, noise) are -1, "not indexed", as
        in :meth:`to_crystal_map`; their fraction is ``metadata.Phases.not_indexed`` (the
        phases' fractions and it add up to 1).

        Returns
        -------
        hyperspy.signals.Signal2D (a 2D scan) or Signal1D (a line scan)

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> from orix.quaternion import Rotation
        >>> si = diffgpu.TemplateLibrary.silicon()
        >>> ge = diffgpu.TemplateLibrary.silicon(5.658)
        >>> ge.name = "Ge"
        >>> lib = diffgpu.TemplateLibrary.from_phase([si, ge], resolution=5.0, reciprocal_radius=1.0)
        >>> s = diffgpu.data.orientation_patterns(ge, Rotation.random(4), sig_shape=(128, 128),
        ...                                       calibration=0.02, reciprocal_radius=1.0)
        >>> polar = s.get_azimuthal_integral2d(npt=48, npt_azim=180, radial_range=(0, 1.1),
        ...                                    mean=True)
        >>> phases = polar.get_orientation(lib).get_phase_map()
        >>> phases.metadata.Phases.names, phases.data.tolist()
        (['Si', 'Ge'], [1, 1, 1, 1])
        """
        import hyperspy.api as hs

        phases, _ = self._phases()
        index = self._indexed(min_significance)
        axes = [dict(ax.get_axis_dictionary(), navigate=False)
                for ax in self.axes_manager.navigation_axes[::-1]]
        cls = hs.signals.Signal2D if index.ndim == 2 else hs.signals.Signal1D
        out = cls(index, axes=axes) if axes else cls(index.reshape(1))
        names = [p.name for p in phases]
        out.metadata.General.title = f"Phases of {self.metadata.General.title}".strip()
        out.metadata.set_item("Phases.names", names)
        out.metadata.set_item("Phases.fractions",
                              [float(np.mean(index == i)) for i in range(len(names))])
        out.metadata.set_item("Phases.not_indexed", float(np.mean(index < 0)))
        return out

    def plot_phase_map(self, ax=None, min_significance=5.0):
        """Plot the phase of the best match at every position, one colour per phase, black
        where nothing matched or no crystal is seen (not indexed: see :meth:`get_phase_map`).

        Returns the matplotlib axes.
        """
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        phase_map = self.get_phase_map(min_significance)
        names = list(phase_map.metadata.Phases.names)
        index = np.atleast_2d(phase_map.data)
        colours = plt.get_cmap("tab10").colors[:max(len(names), 1)]
        cmap = ListedColormap(colours)
        cmap.set_under("black")  # not indexed (-1)
        if ax is None:
            _, ax = plt.subplots()
        ax.imshow(index, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        fractions = phase_map.metadata.Phases.fractions
        handles = [Patch(color=c, label=f"{n} ({f:.0%})")
                   for c, n, f in zip(colours, names, fractions)]
        missing = phase_map.metadata.Phases.not_indexed
        if missing > 0:
            handles.append(Patch(color="black", label=f"not indexed ({missing:.0%})"))
        ax.legend(handles=handles, loc="upper right", fontsize="small")
        ax.set_title("Phase map")
        return ax

    def plot_ipf_map(self, direction="z", ax=None, min_significance=5.0):
        """Plot the best orientations coloured by the inverse pole figure of ``direction``.

        With several phases, each position is coloured with the key of its own phase's
        Laue group. ``direction`` is the laboratory axis, ``"x"``, ``"y"`` or ``"z"`` (the
        beam). Positions where nothing matched or, after :meth:`refine`, no crystal is seen
        (not indexed: see :meth:`get_phase_map`) are black. Returns the matplotlib axes.
        """
        import matplotlib.pyplot as plt
        from orix.plot import IPFColorKeyTSL
        from orix.quaternion import Orientation
        from orix.vector import Vector3d

        axes = {"x": Vector3d.xvector, "y": Vector3d.yvector, "z": Vector3d.zvector}
        if not isinstance(direction, str) or direction not in axes:
            raise ValueError(f"direction must be one of 'x', 'y' or 'z' (the laboratory axis "
                             f"whose inverse pole figure colours the map); got {direction!r}")
        vec = axes[direction]()
        phases, _ = self._phases()
        # positions where nothing matched stay black, as in plot_phase_map (-1: not indexed)
        index = self._indexed(min_significance).ravel()
        rot = self.to_rotations().data[..., 0, :].reshape(-1, 4)  # row-major, unlike flatten()
        rgb = np.zeros((index.size, 3))
        for i, phase in enumerate(phases):
            own = index == i
            if own.any():
                ori = Orientation(rot[own], symmetry=phase.point_group)
                rgb[own] = IPFColorKeyTSL(phase.point_group.laue,
                                          direction=vec).orientation2color(ori)
        nav = self.axes_manager.navigation_shape[::-1]
        if ax is None:
            _, ax = plt.subplots()
        ax.imshow(rgb.reshape(nav + (3,)) if len(nav) == 2 else rgb.reshape(1, -1, 3))
        ax.set_title(f"IPF-{direction} orientation map")
        return ax

    def plot_match(self, polar, library, index=(), rank=0, ax=None):
        """Plot the polar pattern at scan ``index`` with its matched template's spots.

        ``index`` is in array order (``(row, column)`` of a 2D scan, an int for a line scan,
        ``()`` for a single pattern); ``library`` as given to ``get_orientation``.
        Returns the matplotlib axes.
        """
        import matplotlib.pyplot as plt

        from ..orientation import _as_library, _polar_calibration

        library = _as_library(library)
        index = (int(index),) if np.isscalar(index) else tuple(int(i) for i in index)
        nav = self.axes_manager.navigation_dimension
        if len(index) != nav:
            raise ValueError(f"index must give {nav} scan coordinates (array order); got {index}")
        m = self._host_matches()[index][rank]
        pattern = polar.data[index]  # (array order, as the matches)
        data = np.asarray(to_host_array(pattern.compute() if hasattr(pattern, "compute")
                                        else pattern))
        # the axes as matching reads them: the spots (1/Å, degrees from the templates' grid)
        # are drawn in the axes' own units, on their azimuth range
        cal = _polar_calibration(polar)
        az, rad = cal.azimuth, cal.radius
        if ax is None:
            _, ax = plt.subplots()
        ax.imshow(data, aspect="auto", origin="lower", vmax=np.nanpercentile(data, 99.5),
                  extent=[az.low_value - az.scale / 2, az.high_value + az.scale / 2,
                          rad.low_value - rad.scale / 2, rad.high_value + rad.scale / 2])
        r, theta, _ = library.spots[int(m[0])]
        start = (az.offset - az.scale / 2) * cal.to_degrees  # the axis's first edge, degrees
        theta = (m[4] * theta + m[3] - start) % 360 + start
        ax.scatter(theta / cal.to_degrees, r / cal.to_angstrom, s=40, facecolors="none",
                   edgecolors="r")
        names = [a.name if isinstance(a.name, str) else n
                 for a, n in ((az, "azimuth"), (rad, "radius"))]
        ax.set(xlabel=f"{names[0]} ({az.units})", ylabel=f"{names[1]} ({rad.units})",
               title=f"template {int(m[0])}, {m[3]:.1f} deg, {'mirror' if m[4] < 0 else 'direct'}, "
                     f"score {m[2]:.3f}")
        return ax


class LazyOrientationMatches(LazyDeviceMixin, LazySignal2D, OrientationMatches):
    """Lazy (dask-backed) :class:`OrientationMatches`."""

    _lazy = True
