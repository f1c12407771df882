"""What operations return: data with its axes and metadata, for the signal classes to wrap.

The layers of diffgpu read one way: kernels -> operations (:mod:`diffgpu.azimuthal`,
:mod:`diffgpu.beam`, :mod:`diffgpu.virtual`, :mod:`diffgpu.orientation`, ...) -> signal
classes (:mod:`diffgpu.signals`) -> command line and demo. An operation reads the signal it
is given (data, calibration, axes, metadata) but never imports a signal class: it returns an
:class:`OperationResult`, and the signal method that called it makes the signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OperationResult", "derived_metadata"]


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


# what a result keeps of its input's metadata: the experiment, not the detector's layout
_CARRIED = ("Acquisition_instrument", "Sample")


def derived_metadata(signal, title, keep_all=False, **sections):
    """Metadata of a result made from ``signal``: ``General`` (its title ``"<title> of
    <input's title>"``, or ``title`` alone for an untitled input), the microscope
    (``Acquisition_instrument``: beam energy, camera length) and ``Sample`` of the input,
    then ``sections`` (``Signal=...`` is merged into what there is; the operation's own
    record). ``keep_all``: start from all of the input's metadata instead (a result on the
    same detector or scan: integrals, disks), less the detector's mask.

    Examples
    --------
    >>> import numpy as np, hyperspy.api as hs
    >>> from diffgpu.results import derived_metadata
    >>> s = hs.signals.Signal2D(np.zeros((2, 4, 4)))
    >>> s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 200.0)
    >>> md = derived_metadata(s, "Virtual image", Signal={"signal_type": ""})
    >>> md["General"]["title"], md["Acquisition_instrument"]["TEM"]["beam_energy"]
    ('Virtual image', 200.0)
    """
    source = signal.metadata.as_dictionary()
    before = source.get("General", {}).get("title", "")
    if keep_all:
        md = source
        md.get("Diffraction", {}).pop("mask", None)  # the detector's, not the result's
    else:
        md = {"General": {k: v for k, v in source.get("General", {}).items()
                          if k not in ("title", "mask")}}  # pyxem's detector mask is no result's
        md.update({k: source[k] for k in _CARRIED if k in source})
    md.setdefault("General", {})["title"] = f"{title} of {before}" if before else title
    for key, value in sections.items():
        if key == "Signal":
            md.setdefault("Signal", {}).update(value)
        else:
            md[key] = value
    return md
