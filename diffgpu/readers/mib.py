"""Lazy reader for Quantum Detectors Merlin ``.mib`` files (Medipix3: single chip and quad).

The format
----------
A ``.mib`` file is a run of frames, each an ASCII header followed by the pixels::

    MQ1,000001,00384,01,0256,0256,U16,   1x1,01,2020-05-18 16:51:49.971626,0.000555,0,0,0,
    1.200000E+2,5.110000E+2,0.0E+0,...(8 thresholds),3RX,175,511,...(DACs of each chip),
    MQ1A,2020-05-18T14:51:49.971626178Z,555000ns,12,<NUL padding to the header size>

Fields, comma separated: ``MQ1``, the frame's sequence number, the header size in bytes
(``00384`` for one chip, ``00768`` for four), the number of chips, frame width and height in
pixels, pixel depth (``U08``, ``U16``, ``U32`` big-endian unsigned integers, or ``R64`` for
raw counter data), sensor layout (chips across x down: ``1x1``, ``2x2`` for a quad, ``Nx1``
such as ``4x1`` for chips in a row; a ``G`` suffix, ``2x2G``, when the frame includes the gaps
between the chips), chip select, time stamp, shutter time in seconds, counter,
colour mode, gain mode, eight thresholds (keV), then for each chip ``3RX`` and its DAC
values; software 0.70 and later add ``MQ1A``, a time stamp to the nanosecond, the exposure
in ns and the counter depth in bits (1, 6, 12 or 24). Pixels follow, ``width x height`` of
them, the bottom row of the detector first. An optional text file ``<name>.hdr`` written
with the acquisition holds ``key:<TAB>value`` lines, among them the number of frames in the
acquisition and the frames per trigger (the scan width for line-triggered scans).

What diffgpu does with it
-------------------------
* **Orientation**: every frame is flipped up/down on reading, so that row 0 is the top row
  of the detector as the Merlin software shows it. RosettaSciIO (``hs.load``) does the
  same, so ``diffgpu.load`` and ``hs.load`` give the same arrays; pass ``flip_rows=False``
  for the order stored in the file (LiberTEM's).
* **Data**: one dask chunk is a contiguous run of whole frames (see
  :mod:`diffgpu.chunking`). A task maps only the bytes of its frames (a memory map opened
  and closed by the task, never the whole file), and decodes them in one pass into a native
  byte order, C-contiguous array (``uint8``, ``uint16`` or ``uint32``: the big-endian
  ``>u2``/``>u4`` of the file are byte-swapped on the way), flipped as above. Memory and
  page mappings held at a time are those of the chunks in flight, whatever the file's size.
* **Navigation shape**: from ``navigation_shape=`` (HyperSpy's order, ``(x, y)`` = (scan
  columns, scan rows), as in ``hs.load``), else from the ``.hdr`` file (``ScanX``/``ScanY``,
  or frames in the acquisition / frames per trigger), else a 1D stack of frames.
* **Several chips**: a ``2x2G`` quad frame (e.g. 514 x 514) holds the gap between the four
  chips as empty rows and columns in its middle, an ``Nx1G`` frame the columns between its
  chips; they are set in the calibration mask (``s.calibration.mask``). A ``2x2`` frame
  (512 x 512) or an ``Nx1`` one (``4x1``: 256 x 1024) has no gap pixels. Only ``2x2`` is a
  quad (``Merlin Quad``); chips in a row are named by their layout (``Merlin 4x1``).
* **Bad files** raise :class:`~diffgpu.readers.errors.DetectorFileError` naming the file
  and the problem: not a ``.mib`` file, a truncated last frame, a header that disagrees
  with the file's size or with the next frames' headers, a navigation shape whose size is
  not the number of frames.

:func:`write_mib` writes such files (as the detector does) for tests, examples and
benchmarks.
"""

from __future__ import annotations

import math
import os
import re
from datetime import datetime, timedelta, timezone
from functools import partial
from types import SimpleNamespace

import numpy as np

from ..sources import StoredFrames, block_runs, register
from .errors import DetectorFileError, navigation_shape_array_order

__all__ = ["file_reader", "inspect", "MIBFile", "write_mib", "DEPTHS", "PLUGIN"]

#: pixel depth in the header -> dtype of the stored pixels (big-endian)
DEPTHS = {"U08": np.dtype(">u1"), "U16": np.dtype(">u2"), "U32": np.dtype(">u4")}
_COUNTER_DEPTH = {"U08": 6, "U16": 12, "U32": 24}  # when the header does not say (pre-MQ1A)
_CHIP = 256  # Medipix3 chips are 256 x 256 pixels


# -- headers ---------------------------------------------------------------------------------

def _fields(raw):
    text = raw.decode("ascii", errors="replace")
    parts = [p.strip(" \x00\r\n") for p in text.split(",")]
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def _number(text, kind=float):
    try:
        return kind(text)
    except ValueError:
        return None


def parse_frame_header(raw):
    """Decode one frame header (bytes) into a dict of named fields.

    Parameters
    ----------
    raw : bytes
        The header, at least as long as its own size field says.

    Returns
    -------
    dict
        ``sequence``, ``header_bytes``, ``chips``, ``width``, ``height``, ``depth``
        (``"U16"``, ...), ``layout``, ``chip_select``, ``timestamp``, ``shutter_s``,
        ``counter``, ``colour_mode``, ``gain_mode``, ``thresholds_keV``, ``dacs`` (one list
        per chip) and, where the header has them, ``timestamp_ns``, ``exposure_ns`` and
        ``counter_depth``.

    Raises
    ------
    ValueError
        If ``raw`` is not a Merlin frame header.

    Examples
    --------
    >>> from diffgpu.readers.mib import parse_frame_header
    >>> h = parse_frame_header(b"MQ1,000001,00384,01,0256,0256,U16,   1x1,01,"
    ...     b"2020-05-18 16:51:49.971626,0.000555,0,0,0,1.2E+2,5.11E+2,0,0,0,0,0,0,3RX,175,511,"
    ...     b"MQ1A,2020-05-18T14:51:49.971626178Z,555000ns,12,\\x00\\x00")
    >>> h["width"], h["depth"], h["exposure_ns"], h["counter_depth"], h["dacs"]
    (256, 'U16', 555000, 12, [[175, 511]])
    """
    parts = _fields(raw)
    if len(parts) < 9 or parts[0] != "MQ1":
        start = raw[:12].decode("ascii", errors="replace")
        raise ValueError(f"not a Merlin frame header (starts {start!r}, expected 'MQ1,')")
    try:
        head = {
            "sequence": int(parts[1]),
            "header_bytes": int(parts[2]),
            "chips": int(parts[3]),
            "width": int(parts[4]),
            "height": int(parts[5]),
        }
    except ValueError as err:
        raise ValueError(f"unreadable Merlin frame header fields {parts[1:6]}: {err}") from None
    head.update(depth=parts[6], layout=parts[7], chip_select=parts[8])
    rest = parts[9:]
    if len(rest) >= 5:
        head.update(timestamp=rest[0], shutter_s=_number(rest[1]), counter=_number(rest[2], int),
                    colour_mode=_number(rest[3], int), gain_mode=_number(rest[4], int))
        rest = rest[5:]
    thresholds, dacs = [], []
    i = 0
    while i < len(rest) and rest[i] not in ("3RX", "MQ1A"):
        value = _number(rest[i])
        if value is not None:
            thresholds.append(value)
        i += 1
    while i < len(rest) and rest[i] == "3RX":
        j = i + 1
        chip = []
        while j < len(rest) and rest[j] not in ("3RX", "MQ1A"):
            value = _number(rest[j], int)
            if value is not None:
                chip.append(value)
            j += 1
        dacs.append(chip)
        i = j
    head["thresholds_keV"] = thresholds
    head["dacs"] = dacs
    if i < len(rest) and rest[i] == "MQ1A":
        ext = rest[i + 1:]
        if len(ext) >= 1:
            head["timestamp_ns"] = ext[0]
        if len(ext) >= 2 and ext[1].endswith("ns"):
            head["exposure_ns"] = _number(ext[1][:-2], int)
        if len(ext) >= 3:
            head["counter_depth"] = _number(ext[2], int)
    return head


def parse_hdr(path):
    """Read a Merlin acquisition header (``.hdr``) file into a dict of strings.

    Examples
    --------
    >>> import os, tempfile
    >>> from diffgpu.readers.mib import parse_hdr
    >>> p = os.path.join(tempfile.mkdtemp(), "a.hdr")
    >>> _ = open(p, "w").write("HDR,\\t\\r\\nFrames in Acquisition (Number):\\t16\\r\\nEnd\\t\\r\\n")
    >>> parse_hdr(p)
    {'Frames in Acquisition (Number)': '16'}
    """
    out = {}
    with open(path, "r", encoding="latin-1") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line or line.startswith("HDR") or line.startswith("End"):
                continue
            key, sep, value = line.partition("\t")
            if not sep:
                key, sep, value = line.partition(":")
            out[key.strip().rstrip(":").strip()] = value.strip()
    return out


# -- the file ------------------------------------------------------------------------------

def _paths(path):
    """(the .mib file, its .hdr file or None) for a path to either."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    if ext.lower() == ".hdr":
        for candidate in (stem + ".mib", stem + ".MIB"):
            if os.path.exists(candidate):
                return candidate, path
        raise DetectorFileError(path, f"no .mib file beside this .hdr file (looked for '{stem}.mib')")
    for candidate in (stem + ".hdr", stem + ".HDR"):
        if os.path.exists(candidate):
            return path, candidate
    return path, None


_LAYOUT = re.compile(r"(\d+|N)x(\d+)G?", re.IGNORECASE)


def _chip_grid(layout, chips=None):
    """``(chips across, chips down)`` of a layout field (``"2x2"``, ``"2x2G"``, ``"4x1"``, or
    ``"Nx1"`` with N the number of chips), or None if it is not of that form."""
    match = _LAYOUT.fullmatch(layout.strip())
    if match is None:
        return None
    across = chips if match.group(1).upper() == "N" else int(match.group(1))
    return None if across is None else (across, int(match.group(2)))


class MIBFile:
    """What the headers of a ``.mib`` file say: frame size, dtype, number of frames, fields.

    Reading it costs three small reads (the first header, and the headers of the second and
    the last frame, to check that every frame has the size the first header says).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.mib`` file, or its ``.hdr`` file.
    whole_frames : bool
        Take the whole frames of a file that ends inside a frame (an acquisition or a copy
        cut short; ``trailing_bytes`` says how many bytes are left over) instead of
        refusing it as truncated. :func:`file_reader` does so when given a
        ``navigation_shape``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DetectorFileError
        If it is not a ``.mib`` file, is truncated (unless ``whole_frames``), or its headers
        disagree with its size.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from diffgpu.readers.mib import MIBFile, write_mib
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.mib")
    >>> write_mib(path, np.zeros((2, 3, 16, 16), "uint16"))
    >>> f = MIBFile(path)
    >>> f.n_frames, f.frame_shape, f.dtype, f.navigation_shape()
    (6, (16, 16), dtype('>u2'), (2, 3))
    """

    def __init__(self, path, whole_frames=False):
        self.path, self.hdr_path = _paths(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no such file: '{self.path}'")
        try:
            with open(self.path, "rb") as f:
                self.file_bytes = os.fstat(f.fileno()).st_size
                first = f.read(1024)
        except OSError as err:
            raise DetectorFileError(self.path, f"cannot be read: {err.strerror or err}") from err
        if self.file_bytes == 0:
            raise DetectorFileError(self.path, "the file is empty")
        try:
            self.header = parse_frame_header(first)
        except ValueError as err:
            raise DetectorFileError(self.path, f"not a Merlin .mib file: {err}") from None
        h = self.header
        self.header_bytes = h["header_bytes"]
        if self.header_bytes < 64 or self.header_bytes > 4096:
            raise DetectorFileError(self.path, f"the header size field says {self.header_bytes} "
                                               "bytes; Merlin headers are 384 or 768 bytes")
        if len(first) >= self.header_bytes:
            self.header = h = parse_frame_header(first[:self.header_bytes])
        self.depth = h["depth"]
        if self.depth == "R64":
            raise DetectorFileError(
                self.path, "holds raw counter data (pixel depth R64); diffgpu reads the "
                "processed depths U08, U16 and U32: save the acquisition from the Merlin "
                "software in a processed format (or read it with LiberTEM)")
        if self.depth not in DEPTHS:
            raise DetectorFileError(self.path, f"unknown pixel depth {self.depth!r} in the header "
                                               f"(expected one of {sorted(DEPTHS)})")
        self.dtype = DEPTHS[self.depth]
        self.frame_shape = (h["height"], h["width"])
        if min(self.frame_shape) < 1:
            raise DetectorFileError(self.path, f"the header gives a frame of {self.frame_shape} pixels")
        self.layout = h["layout"]
        self.pixel_bytes = h["height"] * h["width"] * self.dtype.itemsize
        self.frame_bytes = self.header_bytes + self.pixel_bytes  # header + pixels
        self.n_frames, extra = divmod(self.file_bytes, self.frame_bytes)
        what = (f"frames of {self.frame_bytes:,} bytes ({self.header_bytes}-byte header + "
                f"{h['width']} x {h['height']} {self.depth} pixels, as the first header says)")
        if self.n_frames == 0:
            raise DetectorFileError(self.path, f"{self.file_bytes:,} bytes is less than one frame: "
                                               f"{what}; the file is truncated")
        self.trailing_bytes = extra
        if extra and not whole_frames:
            raise DetectorFileError(
                self.path, f"{self.file_bytes:,} bytes is not a whole number of {what}: "
                f"{self.n_frames:,} whole frames and {extra:,} bytes more. The file is truncated "
                "(an interrupted acquisition or copy) or its header does not match its data; "
                f"if it was cut short, navigation_shape=({self.n_frames},) reads its whole frames")
        self._check_headers()
        self.hdr = parse_hdr(self.hdr_path) if self.hdr_path else None

    def _check_headers(self):
        """The 2nd and last frames must start with a header like the first one's."""
        with open(self.path, "rb") as f:
            for index in sorted({1, self.n_frames - 1} - {0}):
                if index >= self.n_frames:
                    continue
                f.seek(index * self.frame_bytes)
                raw = f.read(self.header_bytes)
                try:
                    other = parse_frame_header(raw)
                except ValueError:
                    raise DetectorFileError(
                        self.path, f"no frame header where frame {index} should start (byte "
                        f"{index * self.frame_bytes:,}, found {raw[:12]!r}): the first header's "
                        f"frame size ({self.frame_bytes:,} bytes) does not match the data") from None
                keys = ("header_bytes", "width", "height", "depth")
                if any(other[k] != self.header[k] for k in keys):
                    a = {k: self.header[k] for k in keys}
                    b = {k: other[k] for k in keys}
                    raise DetectorFileError(self.path, f"frame {index}'s header {b} disagrees with "
                                                       f"the first frame's {a}")

    @property
    def chip_grid(self):
        """``(chips across, chips down)`` of the sensor layout: ``(1, 1)``, ``(2, 2)`` for a
        quad, ``(4, 1)`` for a row of four chips (``"4x1"``, or ``"Nx1"`` with 4 chips);
        None for a layout field of another form."""
        return _chip_grid(self.layout, self.header["chips"])

    @property
    def quad(self):
        """True for a 2 x 2 chip assembly (Merlin Quad: layouts ``2x2`` and ``2x2G``); four
        chips in a row (``4x1``) are not one."""
        return self.chip_grid == (2, 2)

    def gap_mask(self):
        """Detector mask (True = no pixel) of the gaps between the chips that a frame
        includes (layouts ``2x2G``, ``Nx1G``), else None.

        A frame's columns beyond ``256 x`` chips across (rows beyond ``256 x`` chips down)
        are the gaps, shared evenly between the chips: the middle ``width - 512`` columns
        and ``height - 512`` rows of a ``2x2G`` frame. A frame of just the chips' pixels
        (``1x1``, ``2x2``, ``4x1``: 256 x 1024) has none, nor has a layout of another form.
        """
        grid = self.chip_grid
        if grid is None:
            return None
        mask = np.zeros(self.frame_shape, dtype=bool)
        for axis, (chips, size) in enumerate(zip(grid[::-1], self.frame_shape)):
            extra = size - chips * _CHIP
            if chips < 2 or extra <= 0 or extra % (chips - 1):
                continue  # no gap, or none that can be placed between the chips
            gap = extra // (chips - 1)
            for k in range(1, chips):
                start = k * _CHIP + (k - 1) * gap
                where = [slice(None), slice(None)]
                where[axis] = slice(start, start + gap)
                mask[tuple(where)] = True
        return mask if mask.any() else None

    def navigation_shape(self, navigation_shape=None):
        """The scan shape in array order, ``(rows, columns)`` or ``(frames,)``.

        Parameters
        ----------
        navigation_shape : tuple of int, optional
            In HyperSpy's order, ``(x, y)`` = (scan columns, scan rows), as ``hs.load``
            takes it. Default: from the ``.hdr`` file, else one axis of all frames.

        Raises
        ------
        DetectorFileError
            If the shape's size is not the number of frames in the file.
        """
        n = self.n_frames
        if navigation_shape is not None:
            xy = navigation_shape_array_order(navigation_shape)[::-1]
            if math.prod(xy) != n:
                held = f"{n:,}" + (f" whole frames and {self.trailing_bytes:,} bytes of a frame cut "
                                   "short" if self.trailing_bytes else "")
                raise DetectorFileError(
                    self.path, f"navigation_shape {xy} (x, y) needs {math.prod(xy):,} frames but the "
                    f"file holds {held} (a scan cut short? pass navigation_shape=({n},) to read the "
                    "frames as a stack)")
            return xy[::-1]
        if self.hdr:
            shape = self._hdr_shape()
            if shape is not None:
                return shape
        return (n,)

    def _hdr_shape(self):
        hdr, n = self.hdr, self.n_frames
        if "ScanX" in hdr and "ScanY" in hdr:
            shape = (_number(hdr["ScanY"], int), _number(hdr["ScanX"], int))
            if None in shape or math.prod(shape) != n:
                raise DetectorFileError(
                    self.path, f"the .hdr file gives a scan of ScanX x ScanY = {hdr['ScanX']} x "
                    f"{hdr['ScanY']} but the file holds {n:,} frames; pass navigation_shape=")
            return shape
        frames = _number(hdr.get("Frames in Acquisition (Number)", ""), int)
        per_trigger = _number(hdr.get("Frames per Trigger (Number)", ""), int)
        if not frames:  # 0: continuous acquisition of no set length
            return None
        if frames != n:
            raise DetectorFileError(
                self.path, f"the .hdr file says {frames:,} frames in the acquisition but the "
                f".mib file holds {n:,} whole frames (truncated file or interrupted scan? pass "
                f"navigation_shape=({n},) to read the frames as a stack)")
        if per_trigger and per_trigger > 1 and frames % per_trigger == 0:
            return (frames // per_trigger, per_trigger)
        return None

    def fields(self):
        """Header fields worth showing (``diffgpu info``), as a dict."""
        h = self.header
        # one-byte words (U08) have no byte order
        order = "single bytes, no byte order" if self.dtype.itemsize == 1 else "big-endian"
        out = {"pixel depth": f"{self.depth} (stored {self.dtype.str}: {order})",
               "counter depth (bits)": h.get("counter_depth", f"{_COUNTER_DEPTH[self.depth]} (assumed)"),
               "chips / layout": f"{h['chips']} / {self.layout}",
               "header bytes": self.header_bytes,
               "frames in file": self.n_frames,
               **({"bytes after the last whole frame": f"{self.trailing_bytes:,} (cut short)"}
                  if self.trailing_bytes else {}),
               "time stamp": h.get("timestamp_ns", h.get("timestamp")),
               "exposure (ms)": (h["exposure_ns"] / 1e6 if h.get("exposure_ns") is not None
                                 else (h.get("shutter_s") or 0) * 1e3),
               "thresholds (keV)": ", ".join(f"{t:g}" for t in h.get("thresholds_keV", [])),
               "hdr file": self.hdr_path or "none"}
        if self.hdr:
            for key in ("Frames in Acquisition (Number)", "Frames per Trigger (Number)",
                        "Chip Mode  (SPM, CSM, CM, CSCM)", "Gain", "Software Version"):
                if key in self.hdr:
                    out[key] = self.hdr[key]
        return out


def inspect(path):
    """The :class:`MIBFile` of ``path`` (a ``.mib`` or ``.hdr`` file)."""
    return MIBFile(path)


# -- decoding -----------------------------------------------------------------------------

_NATIVE = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


def stored_layout(path, nav_shape, frame_bytes, header_bytes, frame_shape, itemsize,
                  flip_rows=True, file_bytes=None, nav_chunks=None):
    """The :class:`~diffgpu.sources.StoredFrames` of a ``.mib`` file: records of
    ``frame_bytes``, ``header_bytes`` of header, big-endian unsigned pixels, rows bottom-up
    (read top-down when ``flip_rows``)."""
    return StoredFrames(path, 0, frame_bytes, header_bytes // itemsize,
                        _NATIVE[itemsize].newbyteorder(">"), frame_shape, nav_shape,
                        bool(flip_rows), file_bytes, nav_chunks)


def read_frames(path, start, count, frame_bytes, header_bytes, frame_shape, itemsize,
                flip_rows=True, file_bytes=None):
    """Frames ``start .. start + count`` of a ``.mib`` file, decoded: ``(count, rows, cols)``.

    Maps just those frames' bytes (page aligned), decodes them in one pass into a new
    native-endian array (flipped up/down when ``flip_rows``) and unmaps them.
    """
    out = np.empty((count,) + tuple(frame_shape), dtype=_NATIVE[itemsize])
    if count == 0:
        return out
    stored = stored_layout(path, (), frame_bytes, header_bytes, frame_shape, itemsize, flip_rows,
                           file_bytes)
    stored.with_words(start, count, lambda words: stored.decode(words, out))
    return out


def _read_block(block_info=None, *, path, nav_shape, frame_bytes, header_bytes, frame_shape,
                itemsize, flip_rows, file_bytes):
    """One dask block: the frames of a (contiguous where the chunks allow) scan region."""
    loc = block_info[None]["array-location"][:len(nav_shape)]
    shape = tuple(b - a for a, b in loc)
    args = (frame_bytes, header_bytes, frame_shape, itemsize, flip_rows, file_bytes)
    runs = block_runs(loc, nav_shape)  # one read per run of frames that follow in the file
    if len(runs) == 1:
        block = read_frames(path, runs[0][0], runs[0][1], *args)
    else:
        block = np.concatenate([read_frames(path, start, count, *args) for start, count in runs])
    return block.reshape(shape + tuple(frame_shape))


def lazy_frames(mib, nav_shape, chunks=None, flip_rows=True):
    """A dask array ``nav_shape + frame_shape`` of the frames of ``mib`` (a :class:`MIBFile`)."""
    import dask.array as da
    from dask.base import tokenize

    from ..chunking import navigation_chunks

    itemsize = mib.dtype.itemsize
    # (an int: about this many frames per chunk, as diffgpu's other readers take it; until
    # 2026-12-07 it meant scan rows here)
    nav_chunks = navigation_chunks(chunks, nav_shape, mib.pixel_bytes)
    full = tuple(nav_chunks) + tuple((n,) for n in mib.frame_shape)
    stat = os.stat(mib.path)
    name = "mib-" + tokenize(os.path.abspath(mib.path), stat.st_size, stat.st_mtime_ns,
                             nav_shape, full, flip_rows)
    reader = partial(_read_block, path=os.path.abspath(mib.path), nav_shape=tuple(nav_shape),
                     frame_bytes=mib.frame_bytes, header_bytes=mib.header_bytes,
                     frame_shape=mib.frame_shape, itemsize=itemsize, flip_rows=flip_rows,
                     file_bytes=mib.file_bytes)
    dtype = _NATIVE[itemsize]
    data = da.map_blocks(reader, chunks=full, dtype=dtype, name=name,
                         meta=np.empty((0,) * len(full), dtype=dtype))
    # frame-wise operations read the stored words in place, in the chunks asked for if any
    asked = None if chunks is None or chunks == "auto" else nav_chunks
    return register(data, stored_layout(os.path.abspath(mib.path), nav_shape, mib.frame_bytes,
                                        mib.header_bytes, mib.frame_shape, itemsize, flip_rows,
                                        mib.file_bytes, asked))


# -- RosettaSciIO-style reader ----------------------------------------------------------------

def _when(header):
    stamp = header.get("timestamp_ns") or header.get("timestamp") or ""
    match = re.match(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2}(?:\.\d+)?)(Z?)", stamp)
    if not match:
        return {}
    out = {"date": match.group(1), "time": match.group(2)}
    if match.group(3):
        out["time_zone"] = "UTC"
    return out


def file_reader(filename, lazy=False, navigation_shape=None, chunks=None, flip_rows=True,
                **kwargs):
    """Read a Merlin ``.mib`` file (RosettaSciIO's reader interface).

    Used by :func:`diffgpu.load` for ``.mib`` and ``.hdr`` paths; with HyperSpy:
    ``hs.load(path, file_format=diffgpu.readers.mib, lazy=True)``.

    Parameters
    ----------
    filename : str
        The ``.mib`` file or its ``.hdr`` file.
    lazy : bool
        Return a dask array (default False: read everything into memory).
    navigation_shape : tuple of int, optional
        Scan shape in HyperSpy's order ``(x, y)``; default: from the ``.hdr`` file, else a
        1D stack. Given, it also reads the whole frames of a file that ends inside a frame
        (which is otherwise refused as truncated).
    chunks : int, tuple or "auto", optional
        About this many frames per chunk (an int: whole scan rows where they fit, at least
        8 frames), or a dask chunks tuple of the navigation axes (or of all four); default:
        :func:`diffgpu.chunking.frame_chunks`.
    flip_rows : bool
        Flip every frame up/down so that row 0 is the top of the detector (default, as
        RosettaSciIO); False keeps the order stored in the file.

    Returns
    -------
    list of dict
        One signal dictionary (``data``, ``axes``, ``metadata``, ``original_metadata``).

    Examples
    --------
    >>> import numpy as np, os, tempfile, diffgpu
    >>> from diffgpu.readers.mib import write_mib
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.mib")
    >>> frames = np.arange(4 * 3 * 8 * 8, dtype="uint16").reshape(4, 3, 8, 8)
    >>> write_mib(path, frames)
    >>> s = diffgpu.load(path)
    >>> s
    <LazyDiffractionPatterns, title: scan, dimensions: (3, 4|8, 8)>
    >>> bool((s.data.compute() == frames).all()), s.data.dtype
    (True, dtype('uint16'))
    """
    if kwargs:
        raise TypeError(f"unknown keyword arguments for the .mib reader: {sorted(kwargs)} (it takes "
                        "navigation_shape, chunks and flip_rows)")
    # a navigation shape given: the whole frames of a file cut inside a frame are read
    mib = MIBFile(filename, whole_frames=navigation_shape is not None)
    nav_shape = mib.navigation_shape(navigation_shape)
    data = lazy_frames(mib, nav_shape, chunks=chunks, flip_rows=flip_rows)
    if not lazy:
        data = data.compute()

    nav_names = {1: ("frame",), 2: ("y", "x")}.get(len(nav_shape),
                                                   tuple(f"scan{i}" for i in range(len(nav_shape))))
    rows, cols = mib.frame_shape
    axes = [{"size": n, "name": name, "scale": 1.0, "offset": 0.0, "units": "",
             "navigate": True, "index_in_array": i}
            for i, (n, name) in enumerate(zip(nav_shape, nav_names))]
    # pixel units, centre of the detector at the origin until the beam is found
    axes += [{"size": rows, "name": "ky", "scale": 1.0, "offset": -(rows - 1) / 2, "units": "px",
              "navigate": False, "index_in_array": len(nav_shape)},
             {"size": cols, "name": "kx", "scale": 1.0, "offset": -(cols - 1) / 2, "units": "px",
              "navigate": False, "index_in_array": len(nav_shape) + 1}]
    h = mib.header
    exposure_s = (h["exposure_ns"] * 1e-9 if h.get("exposure_ns") is not None
                  else h.get("shutter_s"))
    grid = mib.chip_grid
    name = ("Merlin Quad" if mib.quad else "Merlin" if h["chips"] == 1 or grid is None
            else f"Merlin {grid[0]}x{grid[1]}")
    detector = {"name": name, "pixel_depth": mib.depth,
                "counter_depth": h.get("counter_depth", _COUNTER_DEPTH[mib.depth]),
                "chips": h["chips"], "layout": mib.layout, "flip_rows": bool(flip_rows)}
    if exposure_s is not None:
        detector["exposure_time"] = exposure_s
    if h.get("thresholds_keV"):
        detector["thresholds_keV"] = h["thresholds_keV"]
    metadata = {
        "General": {"title": os.path.splitext(os.path.basename(mib.path))[0],
                    "original_filename": os.path.basename(mib.path), **_when(h)},
        "Signal": {"signal_type": "diffraction_patterns", "quantity": "Counts"},
        "Acquisition_instrument": {"Detector": detector},
    }
    if exposure_s is not None:
        metadata["Acquisition_instrument"]["dwell_time"] = exposure_s
    mask = mib.gap_mask()
    if mask is not None:
        metadata["Diffraction"] = {"mask": mask}
    original = {"frame_header": {k: v for k, v in h.items()},
                "file": {"frames": mib.n_frames, "frame_bytes": mib.frame_bytes,
                         "file_bytes": mib.file_bytes, "trailing_bytes": mib.trailing_bytes}}
    if mib.hdr:
        original["hdr_file"] = dict(mib.hdr)
    return [{"data": data, "axes": axes, "metadata": metadata, "original_metadata": original,
             "mapping": {}}]


# -- writing (tests, examples, benchmarks) -------------------------------------------------------

def _header(seq, depth, shape, chips, layout, timestamp, exposure_ns, counter_depth, header_bytes):
    rows, cols = shape
    when = timestamp
    dacs = ",".join(["3RX," + ",".join(["175", "511"] + ["000"] * 6 + ["100"] * 17 + ["511", "511"])]
                    * chips)
    text = (f"MQ1,{seq:06d},{header_bytes:05d},{chips:02d},{cols:04d},{rows:04d},{depth},"
            f"{layout:>6},{(1 << chips) - 1:02X},"
            f"{when.strftime('%Y-%m-%d %H:%M:%S.%f')},{exposure_ns / 1e9:.6f},0,0,0,"
            + ",".join(["1.200000E+2", "5.110000E+2"] + ["0.000000E+0"] * 6)
            + f",{dacs},MQ1A,{when.strftime('%Y-%m-%dT%H:%M:%S.%f')}000Z,{exposure_ns}ns,"
            f"{counter_depth},")
    raw = text.encode("ascii")
    if len(raw) > header_bytes:
        raise ValueError(f"header of {len(raw)} bytes does not fit in {header_bytes}")
    return raw.ljust(header_bytes, b"\x00")


def write_mib(path, frames, depth=None, quad=False, gap=0, hdr=True, exposure_ns=1_000_000,
              frames_per_write=256, start_time=None, layout=None):
    """Write frames as a Merlin ``.mib`` file, the way the detector does (and a ``.hdr``).

    Parameters
    ----------
    path : str
        The ``.mib`` file to write.
    frames : array-like or dask array
        ``(frames, rows, cols)`` or ``(scan rows, scan cols, rows, cols)``, in the
        orientation :func:`file_reader` returns (row 0 at the top): they are stored bottom
        row first, as the detector stores them. A dask array is written chunk by chunk.
    depth : {"U08", "U16", "U32"}, optional
        Pixel depth; default from the dtype (uint8 -> U08, uint32/64 -> U32, else U16).
    quad : bool
        Write 768-byte quad headers and four chips' fields (frames of 512 x 512, or
        514 x 514 with ``gap=2``).
    gap : int
        Gap pixels between the chips included in the frame (layout ``2x2G``).
    hdr : bool
        Also write ``<name>.hdr`` with the number of frames and the frames per trigger
        (the scan width of a 4D input).
    exposure_ns : int
        Exposure per frame, in ns (written in the headers; frames 1 us apart plus a longer
        fly-back pause at the start of every scan row).
    frames_per_write : int
        Frames encoded and written at a time (bounds the memory this uses).
    start_time : datetime, optional
    layout : str, optional
        The sensor layout written in the headers instead of ``quad`` and ``gap``'s:
        ``"AxB"`` chips across x down, e.g. ``"4x1"`` (a row of four chips, 256 x 1024
        frames) or ``"2x2"``, with ``"G"`` when the frames include the gaps between the
        chips (``"4x1G"``). Several chips get 768-byte headers.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from diffgpu.readers.mib import write_mib
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.mib")
    >>> write_mib(path, np.ones((2, 2, 16, 16), "uint8"))
    >>> os.path.getsize(path), os.path.exists(path[:-4] + ".hdr")
    (2560, True)
    """
    shape = tuple(frames.shape)
    if len(shape) < 3:
        raise ValueError(f"frames must be (frames, rows, cols) or (scan..., rows, cols); got {shape}")
    nav, sig = shape[:-2], shape[-2:]
    n = math.prod(nav)
    if depth is None:
        kind = np.dtype(frames.dtype)
        depth = {1: "U08"}.get(kind.itemsize, "U32" if kind.itemsize >= 4 else "U16")
        if kind.kind == "b":
            depth = "U08"
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}; got {depth!r}")
    dtype = DEPTHS[depth]
    if layout is None:
        layout = ("2x2G" if gap else "2x2") if quad else "1x1"
    elif quad or gap:
        raise ValueError("give the sensor layout either as layout= or as quad= and gap=")
    grid = _chip_grid(layout)
    if grid is None or "N" in layout.upper():
        raise ValueError(f"layout must be 'AxB' chips across x down, e.g. '1x1', '2x2G' or "
                         f"'4x1'; got {layout!r}")
    chips = grid[0] * grid[1]
    header_bytes = 768 if chips > 1 else 384  # (the DAC values of several chips need more)
    counter_depth = _COUNTER_DEPTH[depth]
    start_time = start_time or datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    per_row = nav[-1] if len(nav) >= 2 else n
    record = np.dtype([("header", f"S{header_bytes}"), ("pixels", dtype, sig)])
    is_dask = hasattr(frames, "dask")
    flat = frames.reshape((n,) + sig)
    with open(path, "wb") as f:
        for start in range(0, n, frames_per_write):
            stop = min(n, start + frames_per_write)
            block = flat[start:stop]
            block = np.asarray(block.compute() if is_dask else block)
            out = np.empty(stop - start, dtype=record)
            for k, i in enumerate(range(start, stop)):
                # 1 us per frame, and a 100 us fly-back before every scan row
                t = start_time + timedelta(microseconds=i + 100 * (i // per_row))
                out["header"][k] = _header(i + 1, depth, sig, chips, layout, t, exposure_ns,
                                           counter_depth, header_bytes)
            out["pixels"] = block[:, ::-1, :]  # stored bottom row first
            out.tofile(f)
    if hdr:
        stem = os.path.splitext(path)[0]
        chip_ids = ",".join([f"W000_{c}0" for c in "ABCDEFGH"[:chips]] + ["-"] * (4 - chips))
        lines = ["HDR,\t",
                 f"Time and Date Stamp (day, mnth, yr, hr, min, s):\t{start_time:%d/%m/%Y %H:%M:%S}",
                 f"Chip ID:\t{chip_ids}",
                 "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX",
                 f"Assembly Size (NX1, 2X2):\t{layout:>6}",
                 "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
                 f"Counter Depth (number):\t{counter_depth}",
                 "Gain:\tSLGM",
                 "Active Counters:\tAlternating",
                 "Thresholds (keV):\t1.200000E+2,5.110000E+2,0.000000E+0,0.000000E+0,"
                 "0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0",
                 "Acquisition Type (Normal, Th_scan, Config):\tNormal",
                 f"Frames in Acquisition (Number):\t{n}",
                 f"Frames per Trigger (Number):\t{per_row if len(nav) >= 2 else 1}",
                 "Trigger Start (Positive, Negative, Internal):\tRising Edge",
                 "Trigger Stop (Positive, Negative, Internal):\tRising Edge",
                 f"Readout System:\t{'Merlin Quad' if chips > 1 else 'Merlin'}",
                 "End\t"]
        with open(stem + ".hdr", "w", newline="") as f:
            f.write("\r\n".join(lines) + "\r\n")


#: what :func:`diffgpu.load` hands ``hs.load(file_format=...)``: this reader, under its module's
#: name (HyperSpy records the reader's module name in the signal's metadata)
PLUGIN = SimpleNamespace(file_reader=file_reader, __loader__=SimpleNamespace(name=__name__))
