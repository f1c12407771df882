"""Strain maps: exx, eyy, exy and the lattice rotation at every scan position."""

from __future__ import annotations

import math
import numbers

import numpy as np
from hyperspy._signals.lazy_signal1d import LazySignal1D
from hyperspy._signals.signal1d import Signal1D

from ..device import to_host_array
from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["StrainMap", "LazyStrainMap"]

_FIELDS = ("exx", "eyy", "exy", "theta")


def _warn_unused(limit, cmap, theta_cmap):
    """Warn when the strain plot's own settings were given to HyperSpy's plot, which ignores them."""
    if limit is not None or cmap != "RdBu_r" or theta_cmap != "PiYG":
        import warnings

        warnings.warn("limit, cmap and theta_cmap apply to the strain map's own plot of a line or "
                      "2D scan without other arguments; HyperSpy's plot does not use them",
                      UserWarning, stacklevel=3)


class StrainMap(DeviceMixin, Signal1D):
    """Strain at every scan position: data ``(..., 4)`` of exx, eyy, exy, theta.

    ``exx, eyy, exy`` are the components of the symmetric real-space stretch ``V - I``
    (``F = V R``) in the detector (x, y) frame, or in the frame set by :meth:`to_frame`;
    ``exy`` is the tensor shear (half the engineering shear). Positive ``exx``: the lattice
    is expanded along x. ``theta`` is the lattice rotation in degrees, positive from +x
    towards +y, i.e. clockwise on screen (y points down). Positions where too few disks
    were found are NaN; ``metadata.Strain`` records the reference, basis, calibration and
    the number of such positions (``n_failed``).

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> m = diffgpu.StrainMap(np.zeros((3, 4, 4)))
    >>> m.get_component("exx").data.shape
    (3, 4)
    """

    _signal_type = "strain_map"

    def _host(self):
        data = self.data.compute() if self._lazy else self.data
        return np.asarray(to_host_array(data), dtype=float)

    def _slicer(self, slices, isNavigation=None, out=None):
        """HyperSpy's slicing, with ``metadata.Strain.n_failed`` counted for the slice (for a
        lazy slice it is counted when computed; a single component has none)."""
        result = super()._slicer(slices, isNavigation, out)
        target = out if out is not None else result
        if target.metadata.has_item("Strain.n_failed"):
            # a lazy slice is counted when computed; a component taken out (isig[0]) is a
            # plain HyperSpy signal, for which the strain map's count means nothing
            if target._lazy or not isinstance(target, StrainMap):
                target.metadata.Strain.__delattr__("n_failed")
            else:
                target.metadata.Strain.n_failed = target.n_failed
        return result

    @property
    def n_failed(self):
        """Scan positions with NaN strain (too few disks, a degenerate fit, or a fit whose
        RMS residual exceeds a tenth of the lattice spacing: no lattice fits the disks)."""
        return int((~np.all(np.isfinite(self._host()), axis=-1)).sum())

    def get_component(self, name):
        """One map (``"exx"``, ``"eyy"``, ``"exy"`` or ``"theta"``) as a HyperSpy Signal2D
        (or Signal1D for a line scan), e.g. to save as TIFF; on the host. A lazy strain map
        gives a lazy component (nothing is computed, as :meth:`to_frame`)."""
        if name not in _FIELDS:
            raise ValueError(f"component must be one of {_FIELDS}; got {name!r}")
        from hyperspy.signals import BaseSignal

        axes = [dict(d, navigate=False) for d in self.axes_manager._get_navigation_axes_dicts()]
        if self._lazy:
            from hyperspy.signals import LazySignal

            # a graph step: this component's values only, moved to the host block by block
            img = to_host_array(self.data[..., _FIELDS.index(name)])
            if img.dtype != np.float64:
                img = img.astype(np.float64)
            make = LazySignal
        else:
            img = self._host()[..., _FIELDS.index(name)]
            make = BaseSignal
        out = make(img, axes=axes).transpose(signal_axes=len(axes)) if axes else make(img)
        out.metadata.General.title = f"{name} of {self.metadata.General.title}"
        return out

    def to_frame(self, angle):
        """The same strain in axes turned by ``angle`` degrees (x' from +x towards +y).

        ``angle`` may be ``"g1"`` to align x' with the reference's first lattice vector, as
        the strain sees it: in the corrected frame of the calibration (its affine, elliptical
        correction and pixel scale applied), not in raw detector pixels.

        Raises
        ------
        ValueError
            If ``angle`` is not a finite number of degrees, nor ``"g1"`` with the
            reference in ``metadata.Strain``.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> m = diffgpu.StrainMap(np.array([[0.01, 0.0, 0.0, 0.0]]))
        >>> m.to_frame(90).data.round(6).tolist()
        [[0.0, 0.01, -0.0, 0.0]]
        """
        from ..strain import correction_matrix, rotate_strain

        if isinstance(angle, str):
            if angle != "g1" or not self.metadata.has_item("Strain.reference_g1_px"):
                raise ValueError("angle must be a number of degrees or 'g1' (needs the "
                                 "reference in metadata.Strain)")
            cal = self.metadata.get_item("Strain.calibration", {})
            cal = cal.as_dictionary() if hasattr(cal, "as_dictionary") else dict(cal or {})
            # the strain tensor is in the corrected frame: g1's direction there (an elliptical
            # detector turns it: 1.4 degrees for 10 % ellipticity at 45 degrees)
            gx, gy = correction_matrix(cal) @ np.asarray(self.metadata.Strain.reference_g1_px,
                                                         float)
            # from the frame the data are in now (to_frame of a turned map)
            angle = float(np.degrees(np.arctan2(gy, gx))) - float(
                self.metadata.get_item("Strain.frame_angle_deg", 0.0))
        elif isinstance(angle, (bool, np.bool_)) or not isinstance(angle, numbers.Real):
            raise ValueError(f"angle must be a number of degrees or 'g1'; got {angle!r}")
        angle = float(angle)
        if not math.isfinite(angle):  # NaN would make every strain NaN
            raise ValueError(f"angle must be a finite number of degrees; got {angle!r}")
        data = rotate_strain(self.data, angle)
        out = self._deepcopy_with_new_data(data)
        prev = out.metadata.get_item("Strain.frame_angle_deg", 0.0)
        out.metadata.set_item("Strain.frame_angle_deg", float(prev) + float(angle))
        return out

    def plot(self, *args, limit=None, cmap="RdBu_r", theta_cmap="PiYG", **kwargs):
        """Four maps: exx, eyy, exy on one shared, symmetric colour scale, and theta.

        For a 2D scan this draws four maps in a matplotlib figure (returned), on the scan's
        calibrated axes; for a line scan, exx, eyy and exy against the position in one panel
        and theta in another. ``limit`` sets the strain scale to ``[-limit, limit]``
        (default: the 99th percentile of ``|strain|``); ``cmap`` and ``theta_cmap`` colour
        the maps. Other arguments, or other scans, go to HyperSpy's plot (``limit`` and the
        colour maps are then not used, and a warning says so if they were set).

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> fig = diffgpu.StrainMap(np.zeros((5, 6, 4))).plot()
        >>> len(fig.axes)
        6
        >>> len(diffgpu.StrainMap(np.zeros((7, 4))).plot(limit=0.01).axes)   # a line scan
        2
        """
        nav = self.axes_manager.navigation_dimension
        if nav not in (1, 2) or args or kwargs:
            _warn_unused(limit, cmap, theta_cmap)
            return super().plot(*args, **kwargs)
        import matplotlib.pyplot as plt

        data = self._host()
        strains = data[..., :3]
        finite = np.isfinite(strains)
        if limit is None:
            limit = float(np.percentile(np.abs(strains[finite]), 99)) if finite.any() else 1e-3
            limit = limit or 1e-3
        elif not isinstance(limit, numbers.Real) or not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"limit must be a positive number (strain); got {limit!r}")
        theta = data[..., 3]
        tl = float(np.nanmax(np.abs(theta))) if np.isfinite(theta).any() else 0.1
        tl = tl or 0.1
        axes = self.axes_manager.navigation_axes
        label = [f"{ax.name} ({ax.units})" if ax.units and str(ax.units) != "<undefined>"
                 else str(ax.name) for ax in axes]
        if nav == 1:
            x = axes[0].axis
            fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
            for i, name in enumerate(("exx", "eyy", "exy")):
                ax_s.plot(x, strains[:, i], label=name)
            ax_s.axhline(0, color="0.6", lw=0.8)
            ax_s.set_ylim(-limit, limit)
            ax_s.set_ylabel("strain")
            ax_s.legend()
            ax_t.plot(x, theta, color="C3")
            ax_t.set_ylim(-tl, tl)
            ax_t.set_ylabel("theta (deg, clockwise on screen)")
            for a in (ax_s, ax_t):
                a.set_xlabel(label[0])
        else:
            ax_x, ax_y = axes
            half_x, half_y = ax_x.scale / 2, ax_y.scale / 2
            extent = (ax_x.axis[0] - half_x, ax_x.axis[-1] + half_x,
                      ax_y.axis[-1] + half_y, ax_y.axis[0] - half_y)
            fig, axs = plt.subplots(1, 4, figsize=(14, 3.6), layout="constrained")
            im = None
            for i, name in enumerate(("exx", "eyy", "exy")):
                im = axs[i].imshow(strains[..., i], cmap=cmap, vmin=-limit, vmax=limit,
                                   extent=extent)
                axs[i].set_title(name)
            fig.colorbar(im, ax=list(axs[:3]), shrink=0.8, label="strain")
            im_t = axs[3].imshow(theta, cmap=theta_cmap, vmin=-tl, vmax=tl, extent=extent)
            axs[3].set_title("theta (deg, clockwise on screen)")
            fig.colorbar(im_t, ax=axs[3], shrink=0.8, label="deg")
            axs[0].set_xlabel(label[0])
            axs[0].set_ylabel(label[1])
        fig.suptitle(self.metadata.General.title)
        return fig


class LazyStrainMap(LazyDeviceMixin, LazySignal1D, StrainMap):
    """Lazy (dask-backed) :class:`StrainMap`; :meth:`compute` counts and reports NaN positions."""

    _lazy = True

    def compute(self, *args, **kwargs):
        """Compute as HyperSpy does, then count the positions without strain
        (``metadata.Strain.n_failed``) and warn if there are any."""
        from ..strain import warn_failed

        super().compute(*args, **kwargs)
        arr = np.asarray(to_host_array(self.data), dtype=float)
        n_failed = int((~np.all(np.isfinite(arr), axis=-1)).sum())
        self.metadata.set_item("Strain.n_failed", n_failed)
        warn_failed(n_failed, int(np.prod(arr.shape[:-1])),
                    self.metadata.get_item("Strain.min_disks", 0))

    def plot(self, *args, limit=None, cmap="RdBu_r", theta_cmap="PiYG", **kwargs):
        if self.axes_manager.navigation_dimension in (1, 2) and not args and not kwargs:
            return StrainMap.plot(self, limit=limit, cmap=cmap, theta_cmap=theta_cmap)
        # HyperSpy's lazy plot (its navigator made lazily), not the eager one that
        # StrainMap.plot falls back to
        _warn_unused(limit, cmap, theta_cmap)
        return LazyDeviceMixin.plot(self, *args, **kwargs)

    plot.__doc__ = StrainMap.plot.__doc__
