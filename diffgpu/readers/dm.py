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
from .errors import DetectorFileError

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


def file_reader(filename, lazy=False, chunks=None, **kwds):
    """Read a DM3/DM4 file (RosettaSciIO's reader interface; its keywords pass through).

    Parameters
    ----------
    filename : str
        The ``.dm3`` or ``.dm4`` file.
    lazy : bool
        Dask arrays read chunk by chunk (:func:`diffgpu.load`'s default), or read it all.
    chunks : int or tuple, optional
        Frames per dask chunk or navigation chunks of stacks of frames; default
        :func:`diffgpu.chunking.frame_chunks`.
    **kwds
        Passed to :func:`rsciio.digitalmicrograph.file_reader` (``optimize``, ...).

    Returns
    -------
    list of dict
        One signal dictionary per image (the thumbnail left out).

    Raises
    ------
    DetectorFileError
        Naming the file and what is wrong: not a DM file, a tag tree that cannot be
        parsed (truncated or corrupt), pixel data that reach past the end of the file.
    """
    from rsciio.digitalmicrograph import file_reader as read_tags

    filename = os.fspath(filename)
    endian = byte_order(filename)
    try:
        dicts = read_tags(filename, lazy=True, **kwds)
    except Exception as err:
        raise DetectorFileError(filename, f"the DigitalMicrograph tag tree cannot be read "
                                          f"({type(err).__name__}: {err}); truncated or corrupt?") \
            from err
    size = os.path.getsize(filename)
    for d in dicts:
        data = d["data"]
        image = d["original_metadata"].get("ImageList", {}).get("TagGroup0", {})
        where = image.get("ImageData", {}).get("Data")
        dtype = np.dtype(data.dtype)
        plain = dtype.kind in "biuf" and dtype.names is None
        if isinstance(where, dict) and "offset" in where and plain:
            offset = int(where["offset"])
            n_bytes = int(np.prod(data.shape)) * dtype.itemsize
            if offset + n_bytes > size:
                raise DetectorFileError(
                    filename, f"the image data ({n_bytes} bytes from byte {offset}) reach past "
                              f"the end of the file ({size} bytes): truncated?")
            stored = dtype.newbyteorder(endian)
            if data.ndim >= 3 and kwds.get("order") in (None, "C"):
                frames = RawFrames(filename, offset, data.shape[:-2], data.shape[-2:], stored)
                d["data"] = lazy_raw(frames, "dm", chunks)
            elif stored != dtype:  # RosettaSciIO read the pixels in the machine's byte order
                d["data"] = data.view(stored)
        if not lazy:
            d["data"] = np.asarray(d["data"].compute() if hasattr(d["data"], "compute")
                                   else d["data"])
    return dicts


#: what :func:`diffgpu.load` hands ``hs.load(file_format=...)``: this reader under its module's
#: name (HyperSpy records the reader's module name in the signal's metadata)
PLUGIN = SimpleNamespace(file_reader=file_reader, __loader__=SimpleNamespace(name=__name__))
