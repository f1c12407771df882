"""Gatan DigitalMicrograph ``.dm3``/``.dm4`` files: RosettaSciIO's tag parser, diffgpu's frames.

RosettaSciIO parses the DM tag tree (axes, calibrations, microscope metadata: beam energy
from ``Microscope Info.Voltage``, camera length from ``STEM Camera Length``) and notes
where each image's pixels start in the file. Two things about its lazy data do not suit
frame-wise work, so this reader replaces the data of every stack of frames:

- its dask chunks split the detector axes (e.g. 90 x 38 pixel tiles of 128 x 128 frames);
  here one chunk is a contiguous run of whole frames (:func:`diffgpu.chunking.frame_chunks`);
- it reads the pixels in the machine's byte order even when the file says they are
  big-endian (the byte-order flag in the DM header); here the flag is honoured.

Use it through :func:`diffgpu.load` (picked for ``.dm3`` and ``.dm4``) or through HyperSpy:
``hs.load("scan.dm4", file_format=diffgpu.readers.dm, lazy=True)``.
"""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import numpy as np

from ._raw import RawFrames, lazy_raw
from .errors import DetectorFileError, ReaderArgumentError, navigation_shape_array_order

__all__ = ["file_reader", "byte_order", "PLUGIN"]


def byte_order(filename):
    """``"<"`` or ``">"``: the byte order of the pixel data of a DM3/DM4 file (from its header).

    Raises
    ------
    DetectorFileError
        If the file is not a DM3 or DM4 file.
    """
    with open(filename, "rb") as f:
        head = f.read(16)
    version = struct.unpack(">i", head[:4])[0] if len(head) >= 4 else None
    if version not in (3, 4) or len(head) < (12 if version == 3 else 16):
        raise DetectorFileError(filename, "not a DigitalMicrograph file (the header does not "
                                          f"start with version 3 or 4; found {version})")
    flag = struct.unpack(">i", head[8:12] if version == 3 else head[12:16])[0]
    return "<" if flag == 1 else ">"


def file_reader(filename, lazy=False, chunks=None, navigation_shape=None, **kwds):
    """Read a DM3/DM4 file (RosettaSciIO's reader interface).

    A stack of frames keeps the scan shape the file records, size-1 scan axes included
    (a 1 x N scan is ``(N, 1|...)``, as diffgpu's other readers give it; RosettaSciIO drops
    them).

    Parameters
    ----------
    filename : str
        The ``.dm3`` or ``.dm4`` file.
    lazy : bool
        Dask arrays read chunk by chunk (:func:`diffgpu.load`'s default), or read it all.
    chunks : int or tuple, optional
        Frames per dask chunk or navigation chunks of stacks of frames; default
        :func:`diffgpu.chunking.frame_chunks`.
    navigation_shape : tuple of int, optional
        The scan shape of the stacks of frames in HyperSpy's order ``(x, y)``, for frames
        the file stores as another shape (e.g. a stack of N frames that is a scan); its
        product must be the file's number of frames. Navigation axes of a new shape are
        calibrated with the file's scan step where all its scan axes share one.
    **kwds
        ``order`` and ``optimize``: passed to :func:`rsciio.digitalmicrograph.file_reader`.

    Returns
    -------
    list of dict
        One signal dictionary per image (the thumbnail left out).

    Raises
    ------
    TypeError
        For a keyword this reader does not take.
    ValueError
        For a ``navigation_shape`` that is not positive whole numbers, or given for a file
        without a stack of frames.
    DetectorFileError
        Naming the file and what is wrong: not a DM file, a tag tree that cannot be
        parsed (truncated or corrupt), pixel data that reach past the end of the file, a
        ``navigation_shape`` that does not hold the file's frames.
    """
    from rsciio.digitalmicrograph import file_reader as read_tags

    # checked here: read_tags' own TypeError would be reported as a corrupt file below
    unknown = set(kwds) - {"order", "optimize", "mmap_mode", "print_info"}
    if unknown:
        raise TypeError(f"unknown keyword arguments for the DigitalMicrograph reader: "
                        f"{sorted(unknown)} (it takes navigation_shape, chunks, order and "
                        "optimize)")
    kwds = {k: v for k, v in kwds.items() if k in ("order", "optimize")}
    nav = None if navigation_shape is None else \
        navigation_shape_array_order(navigation_shape)
    filename = os.fspath(filename)
    endian = byte_order(filename)
    try:
        dicts = read_tags(filename, lazy=True, **kwds)
    except Exception as err:
        raise DetectorFileError(filename, f"the DigitalMicrograph tag tree cannot be read "
                                          f"({type(err).__name__}: {err}); truncated or corrupt?") \
            from err
    size = os.path.getsize(filename)
    stacks = 0
    for d in dicts:
        data = d["data"]
        if 0 in data.shape:  # (HyperSpy would divide by the size of its 0-length axis)
            what = "no frames" if 0 in data.shape[:-2] else "an image of no pixels"
            raise DetectorFileError(filename, f"holds {what} (image data of shape "
                                              f"{tuple(data.shape)})")
        image = d["original_metadata"].get("ImageList", {}).get("TagGroup0", {})
        where = image.get("ImageData", {}).get("Data")
        dtype = np.dtype(data.dtype)
        plain = dtype.kind in "biuf" and dtype.names is None
        swapped = image.get("ImageTags", {}).get("Meta Data", {}).get("Data Order Swapped")
        if data.ndim == 4 and swapped is not None and not _true(swapped):
            # GMS's older 4D layout: all scan positions of one detector pixel, then the next
            # pixel's (LiberTEM reads the tag the same way); read as frames, each would be
            # an image of the scan
            raise DetectorFileError(
                filename, "the 4D data are stored transposed (Meta Data 'Data Order Swapped' "
                          "is 0: the scan axes fastest, not the detector's), which diffgpu does "
                          "not read; save the data in C order from DigitalMicrograph, or convert "
                          "it (e.g. LiberTEM's convert_dm4_transposed)")
        if data.ndim >= 3:
            # a stack of frames keeps the file's scan shape: no size-1 scan axis dropped
            d["post_process"] = [f for f in d.get("post_process", [])
                                 if "squeeze" not in getattr(f, "__code__", _NO_CODE).co_names]
        if isinstance(where, dict) and "offset" in where and plain:
            offset = int(where["offset"])
            n_bytes = int(np.prod(data.shape)) * dtype.itemsize
            if offset + n_bytes > size:
                raise DetectorFileError(
                    filename, f"the image data ({n_bytes} bytes from byte {offset}) reach past "
                              f"the end of the file ({size} bytes): truncated?")
            stored = dtype.newbyteorder(endian)
            if data.ndim >= 3 and kwds.get("order") in (None, "C"):
                stacks += 1
                scan = data.shape[:-2]
                if nav is not None and nav != scan:
                    _reshape_navigation(filename, d, nav)
                    scan = nav
                frames = RawFrames(filename, offset, scan, data.shape[-2:], stored)
                d["data"] = lazy_raw(frames, "dm", chunks)
            elif stored != dtype:  # RosettaSciIO read the pixels in the machine's byte order
                d["data"] = data.view(stored)
        if not lazy:
            d["data"] = np.asarray(d["data"].compute() if hasattr(d["data"], "compute")
                                   else d["data"])
    if nav is not None and not stacks:
        raise ReaderArgumentError(
            f"navigation_shape applies to a stack of frames stored in C order; '{filename}' "
            f"holds none (images of shapes {[tuple(d['data'].shape) for d in dicts]})")
    return dicts


_NO_CODE = SimpleNamespace(co_names=())  # post-processing callables without Python code


def _true(value):
    """A DM tag's truth (a bool, a number, or a string such as ``"1"``)."""
    try:
        return bool(int(float(value)))
    except (TypeError, ValueError):
        return str(value).strip().lower() in ("true", "yes")


def _reshape_navigation(filename, d, nav):
    """Give the signal dictionary ``d`` the scan shape ``nav`` (array order) in place."""
    axes = d["axes"]
    n_nav = len(axes) - 2
    frames = int(np.prod([a["size"] for a in axes[:n_nav]]))
    if int(np.prod(nav)) != frames:
        raise DetectorFileError(
            filename, f"the file holds {frames} frames; navigation_shape={nav[::-1]} needs "
                      f"{int(np.prod(nav))}")
    # the file's scan step carries over where its scan axes share one
    steps = {(float(a.get("scale", 1.0)), str(a.get("units", ""))) for a in axes[:n_nav]}
    scale, units = steps.pop() if len(steps) == 1 else (1.0, "")
    names = ("y", "x") if len(nav) == 2 else ("frame",) if len(nav) == 1 else \
        tuple(f"scan{i}" for i in range(len(nav)))
    new = [{"name": name, "size": n, "scale": scale, "offset": 0.0, "units": units,
            "navigate": True, "index_in_array": i} for i, (name, n) in enumerate(zip(names, nav))]
    for j, a in enumerate(axes[n_nav:]):
        new.append(dict(a, index_in_array=len(nav) + j))
    d["axes"] = new


#: what :func:`diffgpu.load` hands ``hs.load(file_format=...)``: this reader under its module's
#: name (HyperSpy records the reader's module name in the signal's metadata)
PLUGIN = SimpleNamespace(file_reader=file_reader, __loader__=SimpleNamespace(name=__name__))
