"""What operations return: data with its axes and metadata, for the signal classes to wrap.

The layers of diffgpu read one way: kernels -> operations (:mod:`diffgpu.azimuthal`,
:mod:`diffgpu.beam`, :mod:`diffgpu.virtual`, :mod:`diffgpu.orientation`, ...) -> signal
classes (:mod:`diffgpu.signals`) -> command line and demo. An operation reads the signal it
is given (data, calibration, axes, metadata) but never imports a signal class: it returns an
:class:`OperationResult`, and the signal method that called it makes the signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OperationResult"]


@dataclass
class OperationResult:
    """An operation's output, before it becomes a signal.

    Attributes
    ----------
    data : array
        NumPy, CuPy or dask array (lazy when the input was).
    axes : list of dict
        HyperSpy axis dictionaries, in array order.
    metadata : dict
        The new signal's metadata (``Signal.signal_type`` included).
    signal_type : str
        diffgpu's signal type of the result (``"polar_patterns"``, ``"radial_profiles"``,
        ``"virtual_images"``, ``"direct_beam_shifts"``, ``"orientation_matches"``) or ``""``
        for HyperSpy's generic signal.
    lazy : bool
        Whether the result is to be a lazy signal.
    original_metadata : dict, optional
        Carried over from the input signal.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.results import OperationResult
    >>> r = OperationResult(np.zeros((3, 8)), axes=[{"size": 3, "navigate": True},
    ...                     {"size": 8, "navigate": False}], metadata={}, signal_type="radial_profiles")
    >>> r.signal_type, r.lazy
    ('radial_profiles', False)
    """

    data: object
    axes: list
    metadata: dict
    signal_type: str
    lazy: bool = False
    original_metadata: dict | None = field(default=None)
