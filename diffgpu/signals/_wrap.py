"""Operation results (:class:`~diffgpu.results.OperationResult`) made into signals."""

from __future__ import annotations


def _classes():
    from .beam_shifts import DirectBeamShifts, LazyDirectBeamShifts
    from .orientation_matches import LazyOrientationMatches, OrientationMatches
    from .polar_patterns import LazyPolarPatterns, PolarPatterns
    from .radial_profiles import LazyRadialProfiles, RadialProfiles

    return {"polar_patterns": (PolarPatterns, LazyPolarPatterns),
            "radial_profiles": (RadialProfiles, LazyRadialProfiles),
            "direct_beam_shifts": (DirectBeamShifts, LazyDirectBeamShifts),
            "orientation_matches": (OrientationMatches, LazyOrientationMatches)}


def _virtual_image_classes():
    """Virtual images by signal dimension (the scan's navigation dimension)."""
    from .virtual_images import (LazyVirtualImages, LazyVirtualProfiles, VirtualImages,
                                 VirtualProfiles)

    return {2: (VirtualImages, LazyVirtualImages), 1: (VirtualProfiles, LazyVirtualProfiles)}


def signal_class(signal_type, signal_dimension, lazy):
    """diffgpu's class for a signal type (lazy or not), or None where HyperSpy's generic
    class is used. ``virtual_images`` has one class per signal dimension:
    :class:`~diffgpu.VirtualImages` (2) and :class:`~diffgpu.VirtualProfiles` (1).

    Examples
    --------
    >>> from diffgpu.signals._wrap import signal_class
    >>> signal_class("virtual_images", 1, lazy=True).__name__
    'LazyVirtualProfiles'
    >>> signal_class("virtual_images", 3, lazy=False) is None
    True
    """
    if signal_type == "virtual_images":
        pair = _virtual_image_classes().get(signal_dimension)
    else:
        pair = _classes().get(signal_type)
    return None if pair is None else pair[1 if lazy else 0]


def as_signal(result, replace=None):
    """The signal of ``result``: diffgpu's class for its signal type (lazy or not), or
    HyperSpy's class for its dimensions (``Signal1D``, ``Signal2D``, ``BaseSignal``; the
    same eagerly and lazily) for ``signal_type=""``.

    With ``replace=signal``, that signal becomes the result in place (HyperSpy's
    ``inplace=True``) and None is returned.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.results import OperationResult
    >>> from diffgpu.signals._wrap import as_signal
    >>> r = OperationResult(np.zeros((3, 8), "float32"), axes=[{"size": 3, "navigate": True},
    ...                     {"size": 8, "navigate": False}], metadata={}, signal_type="radial_profiles")
    >>> as_signal(r)
    <RadialProfiles, title: , dimensions: (3|8)>
    """
    kwargs = {"axes": result.axes, "metadata": result.metadata}
    if result.original_metadata is not None:
        kwargs["original_metadata"] = result.original_metadata
    signal_dimension = sum(1 for ax in result.axes if not ax.get("navigate", False))
    cls = signal_class(result.signal_type, signal_dimension, result.lazy)
    if cls is not None:
        out = cls(result.data, **kwargs)
    else:
        from hyperspy.signals import BaseSignal

        out = BaseSignal(result.data, **kwargs)
        # HyperSpy's class for the dimensions (Signal1D, ...), as as_lazy() assigns it: the
        # same kind of signal eagerly and lazily
        out._assign_subclass()
        if result.lazy and not out._lazy:
            # the result's own chunks: HyperSpy's default ("auto" for rechunking) divides
            # by the bytes of one signal, and a zero-size result raised ZeroDivisionError
            chunks = getattr(result.data, "chunks", None)
            out = out.as_lazy(chunks=chunks if isinstance(chunks, tuple) else None)
    if replace is not None:
        replace.__class__ = out.__class__
        replace.__dict__ = out.__dict__
        return None
    return out
