"""What ``diffgpu info FILE`` prints: how diffgpu reads a detector file, and in what chunks."""

from __future__ import annotations

import math
import os

import numpy as np

from .mapping import stored_regions
from .sources import stored_frames

__all__ = ["describe"]


def _chunks_line(chunks, itemsize):
    counts = [len(c) for c in chunks]
    largest = tuple(max(c) for c in chunks)
    mib = math.prod(largest) * itemsize / 2**20
    return f"{largest} x {math.prod(counts)} chunks (largest {mib:.1f} MiB)"


def _byte_order(dtype):
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1 or dtype.byteorder == "|":
        return f"{dtype.name} (single bytes)"
    order = "big-endian" if dtype.str[0] == ">" else "little-endian"
    native = ", native" if dtype.isnative else ", non-native"
    return f"{dtype.name} ({dtype.str}: {order}{native})"


def _readers(signal):
    """``(the reader that read this file, the reader that first read the data)`` from
    ``General.FileIO`` (a file diffgpu or HyperSpy saved keeps its input's entries, so the
    first is not this file's); None where not recorded."""
    entries = signal.metadata.get_item("General.FileIO", None)
    entries = entries.as_dictionary() if entries is not None else {}
    loads = [entries[k].get("io_plugin") for k in sorted(entries, key=lambda k: int(k))
             if str(k).isdigit() and entries[k].get("operation") == "load"]
    loads = [str(p) for p in loads if p]
    return (loads[-1], loads[0]) if loads else (None, None)


def _companions(signal, path):
    """The files other than ``path`` that hold the frames (a Dectris master file's data files,
    an EMPAD XML's raw file), from what the reader recorded; [] where there are none."""
    om = signal.original_metadata
    files = list(om.get_item("hdf5.files", None) or []) + [om.get_item("empad.raw", None)]
    out = []
    for f in files:
        if isinstance(f, str) and os.path.isfile(f) and f not in out and \
                os.path.abspath(f) != os.path.abspath(path):
            out.append(f)
    return out


# how the array's axes read, by diffgpu's signal type
_SIGNAL_AXES = {"diffraction_patterns": "detector rows, columns", "polar_patterns": "radius, azimuth",
                "radial_profiles": "radius"}


def _array_axes(signal):
    """What the array's axes are, in array order: ``scan rows, scan columns, then detector
    rows, columns`` for 4D-STEM data."""
    am = signal.axes_manager
    nav, sig = am.navigation_dimension, len(am.signal_axes)
    stype = signal.metadata.get_item("Signal.signal_type", "")
    if stype == "virtual_images":  # the scan is the signal, one image per detector
        stack = sig == 1 and am.signal_axes[0].name == "frame"
        first = "detectors" if nav else ""
        then = {2: "scan rows, scan columns", 1: "frames" if stack else "scan positions"}.get(
            sig, "scan axes")
    else:
        stack = nav == 1 and am.navigation_axes[0].name == "frame"
        first = {0: "", 1: "frames" if stack else "scan positions",
                 2: "scan rows, scan columns"}.get(nav, f"{nav} navigation axes (slowest first)")
        names = [a.name if isinstance(a.name, str) else "" for a in
                 sorted(am.signal_axes, key=lambda a: a.index_in_array)]
        then = _SIGNAL_AXES.get(stype) or (", ".join(n or "?" for n in names) or "no signal axes")
    return f"{first}, then {then}" if first else then


def describe(path, navigation_shape=None):
    """Rows ``(what, value)`` describing how diffgpu reads ``path``.

    Format, stored dtype and byte order, the dtype diffgpu's blocks have, the shape
    (navigation | signal, HyperSpy order), the reader's chunks, the chunks diffgpu's
    frame-wise operations use (see :mod:`diffgpu.chunking`), and the file's header fields.

    Parameters
    ----------
    path : str
        Any file :func:`diffgpu.load` reads.
    navigation_shape : tuple of int, optional
        As for :func:`diffgpu.load` (``.mib`` files without a ``.hdr`` file).

    Returns
    -------
    list of (str, str)

    Raises
    ------
    FileNotFoundError, OSError, ValueError
        As :func:`diffgpu.load` (a bad file's error names the file and the problem).

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from diffgpu.fileinfo import describe
    >>> from diffgpu.readers.mib import write_mib
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.mib")
    >>> write_mib(path, np.zeros((4, 6, 32, 32), "uint16"))
    >>> rows = dict(describe(path))
    >>> rows["format"]
    'Merlin .mib (Quantum Detectors), diffgpu.readers.mib'
    >>> rows["stored dtype"], rows["shape"]
    ('uint16 (>u2: big-endian, non-native)', '(6, 4|32, 32)')
    """
    from . import load
    from .chunking import whole_frame_chunks

    path = os.fspath(path)
    kwargs = {} if navigation_shape is None else {"navigation_shape": tuple(navigation_shape)}
    s = load(path, lazy=True, **kwargs)
    signals = s if isinstance(s, list) else [s]
    rows = []
    ext = os.path.splitext(path)[1].lower()
    mib = None
    if ext in (".mib", ".hdr"):
        from .readers.mib import MIBFile

        mib = MIBFile(path, whole_frames=navigation_shape is not None)  # as the reader took it
        rows.append(("format", "Merlin .mib (Quantum Detectors), diffgpu.readers.mib"))
    else:
        plugin, first = _readers(signals[0])
        origin = f" (saved from data read by {first})" if first and first != plugin else ""
        rows.append(("format", f"{ext or '(no extension)'} read by "
                               f"{plugin or 'HyperSpy/RosettaSciIO'}{origin}"))
    rows.append(("file", f"{path} ({os.path.getsize(path) / 1e9:.3g} GB)" if os.path.isfile(path)
                 else path))
    companions = _companions(signals[0], path)
    if companions:  # a master file's data files, an EMPAD XML's raw file: where the frames are
        size = sum(os.path.getsize(f) for f in companions)
        rows.append(("frames in", f"{len(companions)} file{'s' if len(companions) > 1 else ''} "
                                  f"beside it ({size / 1e9:.3g} GB): "
                                  f"{', '.join(os.path.basename(f) for f in companions[:3])}"
                                  f"{', ...' if len(companions) > 3 else ''}"))
    for k, sig in enumerate(signals):
        tag = "" if len(signals) == 1 else f" [{k}]"
        data = sig.data
        stored = mib.dtype if mib is not None else data.dtype
        rows.append(("signal" + tag, f"{type(sig).__name__}: {sig.metadata.General.title}"))
        rows.append(("stored dtype" + tag, _byte_order(stored)))
        in_place = stored_frames(data)
        if np.dtype(stored) != data.dtype:
            rows.append(("blocks dtype" + tag, _byte_order(data.dtype) +
                         (" (decoded where the file stores the frames, a few at a time)"
                          if in_place is not None else
                          " (decoded from the file in one pass per chunk)")))
        am = sig.axes_manager
        nav = ", ".join(str(n) for n in am.navigation_shape)
        rows.append(("shape" + tag, f"({nav}|{', '.join(str(n) for n in am.signal_shape)})"))
        rows.append(("array shape" + tag, f"{tuple(data.shape)} ({_array_axes(sig)})"))
        rows.append(("size" + tag, f"{data.nbytes / 1e9:.3g} GB in memory as {data.dtype.name}"))
        if hasattr(data, "chunks"):
            rows.append(("reader's chunks" + tag, _chunks_line(data.chunks, data.dtype.itemsize)))
            if am.signal_dimension == 2:
                split = len(data.chunks[-1]) > 1 or len(data.chunks[-2]) > 1
                used = whole_frame_chunks(data) if split else data
                note = ("frames split by the reader: rechunked to whole frames" if split
                        else "whole frames: used as they are")
                rows.append(("diffgpu's chunks" + tag,
                             f"{_chunks_line(used.chunks, data.dtype.itemsize)}; {note}"))
                if in_place is not None:
                    _, regions = stored_regions(in_place)
                    frames = data.chunks[-2] + data.chunks[-1]
                    rows.append(("read in place" + tag, "frame-wise operations read the frames "
                                 "where the file stores them, by scan regions of " +
                                 _chunks_line(tuple(regions) + tuple((n,) for n in frames[:1])
                                              + tuple((n,) for n in frames[1:]),
                                              data.dtype.itemsize)))
        mask = sig.metadata.get_item("Diffraction.mask", None)
        if mask is not None:
            rows.append(("detector mask" + tag, f"{int(np.sum(mask))} pixels masked (gap between chips)"
                         if mib is not None else f"{int(np.sum(mask))} pixels masked"))
    if mib is not None:
        rows.append(("navigation from", "navigation_shape=" if navigation_shape is not None else
                     (".hdr file" if mib.hdr and len(signals[0].data.shape) > 3 else
                      "none given: a stack of frames (pass navigation_shape=)")))
        rows += [(f"header: {k}", str(v)) for k, v in mib.fields().items()]
    else:
        om = signals[0].original_metadata.as_dictionary()
        shown = 0
        for key, value in om.items():
            if shown >= 12:
                break
            if isinstance(value, dict):
                rows.append((f"original metadata: {key}", f"{len(value)} entries"))
            else:
                text = str(value)
                rows.append((f"original metadata: {key}", text[:80] + ("..." if len(text) > 80 else "")))
            shown += 1
    return rows
