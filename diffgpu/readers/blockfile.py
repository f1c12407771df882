"""NanoMegas ASTAR blockfiles (``.blo``): RosettaSciIO's reader, checked and chunked for diffgpu.

A blockfile holds a header (scan shape ``NX`` x ``NY``, frame size ``DP_SZ``, offsets, beam
energy, camera length, calibrations), a virtual bright-field image, then from byte
``Data_offset_2`` the frames one after another, each a 6-byte marker and ``DP_SZ`` x ``DP_SZ``
uint8 pixels. RosettaSciIO reads it; this wrapper

- refuses a truncated file, naming it (RosettaSciIO pads missing frames with zeros when it
  reads eagerly, and fails only when the missing bytes are computed when lazy);
- cuts the lazy data into diffgpu's chunks of whole frames
  (:func:`diffgpu.chunking.frame_chunks`).

Use it through :func:`diffgpu.load` (picked for ``.blo``) or through HyperSpy:
``hs.load("scan.blo", file_format=diffgpu.readers.blockfile, lazy=True)``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from .errors import DetectorFileError

__all__ = ["file_reader", "PLUGIN"]

_FRAME_MARKER = 6  # bytes before each frame


def file_reader(filename, lazy=False, chunks=None, endianness="<", **kwds):
    """Read a blockfile (RosettaSciIO's reader interface).

    Parameters
    ----------
    filename : str
    lazy : bool
        Dask arrays read chunk by chunk (:func:`diffgpu.load`'s default), or read it all.
    chunks : int or tuple, optional
        About this many frames per chunk (an int), or dask chunks of the navigation axes (or
        of all four; the frames stay whole); default whole frames in
        :func:`diffgpu.chunking.frame_chunks`'s navigation chunks.
    endianness : str
        Byte order of the header (``"<"``, as ASTAR writes it).

    Raises
    ------
    DetectorFileError
        If the header cannot be read or the file is shorter than its frames need.
    """
    from rsciio.blockfile import file_reader as read_blo
    from rsciio.blockfile._api import get_header_dtype_list

    from ..chunking import frame_chunks, navigation_chunks

    filename = os.fspath(filename)
    header_dtype = np.dtype(get_header_dtype_list(endianness))
    size = os.path.getsize(filename)
    if size < header_dtype.itemsize:
        raise DetectorFileError(filename, f"{size} bytes: shorter than a blockfile header")
    header = np.fromfile(filename, dtype=header_dtype, count=1)[0]
    if bytes(header["ID"]) != b"IMGBLO":
        raise DetectorFileError(filename, "not a blockfile (it does not start with 'IMGBLO')")
    nx, ny, dp = int(header["NX"]), int(header["NY"]), int(header["DP_SZ"])
    offset = int(header["Data_offset_2"])
    need = offset + nx * ny * (_FRAME_MARKER + dp * dp)
    if min(nx, ny) == 0 and dp >= 1 and offset >= header_dtype.itemsize:
        raise DetectorFileError(filename, f"the header announces a scan of {nx} x {ny}: the "
                                          "file holds no frames")
    if min(nx, ny, dp) < 1 or offset < header_dtype.itemsize:
        raise DetectorFileError(filename, f"not a blockfile (header says scan {nx} x {ny}, "
                                          f"frames {dp} x {dp}, data at byte {offset})")
    if size < need:
        have = max(0, size - offset) // (_FRAME_MARKER + dp * dp)
        raise DetectorFileError(
            filename, f"truncated: {size} bytes hold {have} of the {nx * ny} frames of "
                      f"{dp} x {dp} that the header announces ({need} bytes)")
    if chunks is None:
        chunks = frame_chunks((ny, nx), _FRAME_MARKER + dp * dp) + ((dp,), (dp,))
    else:  # as diffgpu's other readers take chunks: about N frames, or the navigation chunks
        chunks = navigation_chunks(chunks, (ny, nx), dp * dp) + ((dp,), (dp,))
    dicts = read_blo(filename, lazy=lazy, chunks=chunks if lazy else "auto",
                     endianness=endianness, **kwds)
    for d in dicts:
        # a header field left at 0 means "not recorded": no beam energy of 0 keV (which has
        # no wavelength) nor a camera length of 0 in the metadata
        header = d.get("original_metadata", {}).get("blockfile_header", {})
        d["mapping"] = {key: rule for key, rule in d.get("mapping", {}).items()
                        if key.split(".", 1)[-1] not in ("Beam_energy", "Camera_length")
                        or float(header.get(key.split(".", 1)[-1], 0) or 0) > 0}
    return dicts


#: what :func:`diffgpu.load` hands ``hs.load(file_format=...)``: this reader under its module's
#: name (HyperSpy records the reader's module name in the signal's metadata)
PLUGIN = SimpleNamespace(file_reader=file_reader, __loader__=SimpleNamespace(name=__name__))
