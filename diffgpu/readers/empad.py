"""Lazy reader for EMPAD (Electron Microscope Pixel Array Detector) scans: ``.xml`` + ``.raw``.

The EMPAD software writes two files per acquisition. The ``.xml`` file describes it: the name
of the raw file (``<raw_file filename="scan_x256_y256.raw"/>``), the scan
(``<scan_parameters mode="acquire">`` with ``scan_resolution_x`` and ``scan_resolution_y``; older
files: ``<pix_x>``/``<pix_y>``; a series: ``<type>series</type>`` and ``<count>``) and the
microscope (``<iom_measurements>``: ``high_voltage`` in V, ``nominal_camera_length`` in m,
``full_scan_field_of_view``). The ``.raw`` file holds the frames one after another, each
128 x 128 little-endian float32 pixels followed by two rows (2 x 128 float32) of per-frame
metadata, which the reader drops.

:func:`file_reader` hands over a dask array of whole frames, chunked by whole scan rows,
read straight from the file (no copy of the dataset). Use it through :func:`diffgpu.load`
(picked for ``.xml`` files that name a raw file) or through HyperSpy:
``hs.load("scan.xml", file_format=diffgpu.readers.empad, lazy=True)``.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET

import numpy as np

__all__ = ["file_reader", "is_empad", "read_xml", "FRAME_SHAPE", "RAW_FRAME_SHAPE"]

FRAME_SHAPE = (128, 128)
#: each frame in the .raw file: 128 rows of pixels and 2 rows of per-frame metadata
RAW_FRAME_SHAPE = (130, 128)
_DTYPE = np.dtype("<f4")
_CHUNK_BYTES = 32 * 2**20


class EMPADFormatError(OSError):
    """An EMPAD file pair diffgpu cannot read (names the file and the problem)."""


def is_empad(filename):
    """True if ``filename`` is an EMPAD ``.xml`` file (an XML root naming a raw file).

    Examples
    --------
    >>> import tempfile, os
    >>> from diffgpu.readers.empad import is_empad
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.xml")
    >>> _ = open(path, "w").write('<root><raw_file filename="scan_x4_y4.raw"/></root>')
    >>> is_empad(path)
    True
    """
    try:
        with open(filename, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return b"<raw_file" in head


def read_xml(filename):
    """Parse an EMPAD ``.xml`` file.

    Returns
    -------
    dict
        ``raw`` (path of the raw file), ``nav_shape`` (array order: ``(scan rows, scan
        columns)`` or ``(frames,)``), and where present ``beam_energy`` (keV),
        ``camera_length`` (mm), ``scan_step`` (nm), ``q_scale`` (1/nm per pixel), ``date``,
        ``time``.

    Raises
    ------
    OSError
        If the XML cannot be parsed or does not say the raw file or the scan shape.

    Examples
    --------
    >>> import tempfile, os
    >>> from diffgpu.readers.empad import read_xml
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.xml")
    >>> _ = open(path, "w").write(
    ...     '<root><raw_file filename="scan_x3_y2.raw"/><scan_parameters mode="acquire">'
    ...     '<scan_resolution_x>3</scan_resolution_x><scan_resolution_y>2</scan_resolution_y>'
    ...     '</scan_parameters><iom_measurements><high_voltage>300000.0</high_voltage>'
    ...     '</iom_measurements></root>')
    >>> info = read_xml(path)
    >>> info["nav_shape"], info["beam_energy"], os.path.basename(info["raw"])
    ((2, 3), 300.0, 'scan_x3_y2.raw')
    """
    filename = os.fspath(filename)
    try:
        root = ET.parse(filename).getroot()
    except (ET.ParseError, OSError) as err:
        raise EMPADFormatError(f"'{filename}' is not a readable EMPAD XML file: {err}") from err
    raw = root.find("raw_file")
    if raw is None or not raw.get("filename"):
        raise EMPADFormatError(f"'{filename}' does not name its raw file (<raw_file filename=...>)")
    raw_name = raw.get("filename")
    # the software may record an absolute path; the raw file lives beside the XML
    info = {"raw": os.path.join(os.path.dirname(os.path.abspath(filename)),
                                os.path.basename(raw_name.replace("\\", "/")))}

    def number(path, node=root):
        el = node.find(path)
        try:
            return float(el.text) if el is not None and el.text else None
        except ValueError:
            return None

    typ = root.find("type")
    acquire = [e for e in root.findall("scan_parameters") if e.get("mode", "acquire") == "acquire"]
    if typ is not None and (typ.text or "").strip() == "series":
        count = number("count")
        nav = None if count is None else (int(count),)
    elif root.find("scan_parameters/series_count") is not None:
        nav = (int(number("scan_parameters/series_count")),)
    elif acquire and number("scan_resolution_x", acquire[0]) is not None:
        nav = (int(number("scan_resolution_y", acquire[0])),
               int(number("scan_resolution_x", acquire[0])))
    elif number("pix_x") is not None and number("pix_y") is not None:
        nav = (int(number("pix_y")), int(number("pix_x")))
    else:
        m = re.search(r"_x(\d+)_y(\d+)", os.path.basename(raw_name))
        nav = (int(m.group(2)), int(m.group(1))) if m else None
    if nav is None or min(nav) < 1:
        raise EMPADFormatError(f"'{filename}' does not say the scan shape (scan_resolution_x/y, "
                               "pix_x/pix_y or a series count); pass navigation_shape=")
    info["nav_shape"] = nav

    voltage = number("iom_measurements/high_voltage")
    if voltage and voltage > 0:
        info["beam_energy"] = voltage / 1e3
    length = number("iom_measurements/nominal_camera_length")
    if length and length > 0:
        info["camera_length"] = length * 1e3
    pixel = number("iom_measurements/calibrated_pixelsize")  # older files; x 1e9 -> 1/nm
    if pixel and pixel > 0:
        info["q_scale"] = pixel * 1e9
    fov = number("iom_measurements/full_scan_field_of_view/x")
    factor = number("iom_measurements/full_scan_field_of_view/scale_factor")
    if fov is None:  # older files: "(x, y)" in metres
        el = root.find("iom_measurements/optics/get_full_scan_field_of_view")
        try:
            fov = float(ast.literal_eval(el.text)[0]) if el is not None else None
        except (ValueError, SyntaxError, TypeError, IndexError):
            fov = None
        factor = 1.0
    if fov and fov > 0 and len(nav) == 2:
        # the recorded field of view is that of the larger scan side, times scale_factor
        info["scan_step"] = fov / (factor or 1.0) / max(nav) * 1e9
    stamp = root.find("timestamp")
    if stamp is not None and "T" in stamp.get("isoformat", ""):
        info["date"], info["time"] = stamp.get("isoformat").split("T", 1)
    return info


class _RawFrames:
    """Array-like view of the frames in an EMPAD raw file (footer rows dropped)."""

    def __init__(self, path, nav_shape):
        self.path = path
        self.nav_shape = tuple(nav_shape)
        self.shape = self.nav_shape + FRAME_SHAPE
        self.dtype = _DTYPE
        self.ndim = len(self.shape)

    def _read(self, start, stop):
        frame_bytes = int(np.prod(RAW_FRAME_SHAPE)) * _DTYPE.itemsize
        count = (stop - start) * int(np.prod(RAW_FRAME_SHAPE))
        with open(self.path, "rb") as f:
            f.seek(start * frame_bytes)
            raw = np.fromfile(f, dtype=_DTYPE, count=count)
        if raw.size != count:
            raise EMPADFormatError(f"'{self.path}' ended before frame {stop - 1} (truncated?)")
        return raw.reshape((-1,) + RAW_FRAME_SHAPE)[:, :FRAME_SHAPE[0]]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        nav_key = key[:len(self.nav_shape)]
        if len(nav_key) < len(self.nav_shape) or not all(isinstance(k, slice) for k in nav_key):
            return self._read(0, int(np.prod(self.nav_shape))).reshape(self.shape)[key]
        flat = np.arange(int(np.prod(self.nav_shape))).reshape(self.nav_shape)[nav_key]
        if flat.size == 0:
            return np.empty(flat.shape + FRAME_SHAPE, _DTYPE)[(Ellipsis,) + key[len(nav_key):]]
        frames = self._read(int(flat.min()), int(flat.max()) + 1)[flat.ravel() - flat.min()]
        return frames.reshape(flat.shape + FRAME_SHAPE)[(Ellipsis,) + key[len(nav_key):]]


def file_reader(filename, lazy=True, navigation_shape=None, chunks=None, **kwds):
    """Read an EMPAD scan from its ``.xml`` file (the ``.raw`` file beside it holds the data).

    A RosettaSciIO-style reader: ``hs.load(path, file_format=diffgpu.readers.empad)`` and
    :func:`diffgpu.load` call it.

    Parameters
    ----------
    filename : str
        The ``.xml`` file.
    lazy : bool
        The data is always a dask array; HyperSpy computes it unless ``lazy``.
    navigation_shape : tuple of int, optional
        Scan shape in HyperSpy's order ``(x, y)`` (one number for a series), to override
        the XML's (e.g. to read the complete rows of a scan that was stopped early).
    chunks : int, optional
        Frames per dask chunk (whole scan rows where the scan row fits); default about
        32 MiB.

    Returns
    -------
    list of dict
        One signal dictionary.

    Raises
    ------
    OSError
        Naming the file and what is wrong: unreadable XML, the raw file missing, or a raw
        file whose size does not hold the scan's frames (truncated or the wrong file).

    Examples
    --------
    >>> import numpy as np, tempfile, os, diffgpu
    >>> folder = tempfile.mkdtemp()
    >>> _ = open(os.path.join(folder, "scan.xml"), "w").write(
    ...     '<root><raw_file filename="scan_x3_y2.raw"/></root>')
    >>> frames = np.ones((6, 130, 128), "<f4")   # 128 x 128 pixels and 2 metadata rows
    >>> frames.tofile(os.path.join(folder, "scan_x3_y2.raw"))
    >>> s = diffgpu.load(os.path.join(folder, "scan.xml"))
    >>> s
    <LazyDiffractionPatterns, title: scan, dimensions: (3, 2|128, 128)>
    >>> float(s.data.sum().compute())
    98304.0
    """
    import dask.array as da

    filename = os.fspath(filename)
    info = read_xml(filename)
    raw = info["raw"]
    if not os.path.exists(raw):
        raise EMPADFormatError(f"'{filename}': its raw file '{os.path.basename(raw)}' is missing "
                               f"(looked for '{raw}')")
    nav = info["nav_shape"]
    if navigation_shape is not None:
        nav = tuple(int(n) for n in np.atleast_1d(navigation_shape))[::-1]
    n = int(np.prod(nav))
    frame_bytes = int(np.prod(RAW_FRAME_SHAPE)) * _DTYPE.itemsize
    size = os.path.getsize(raw)
    if size < n * frame_bytes or (navigation_shape is None and size != n * frame_bytes):
        held = f"{size // frame_bytes} frames" + (f" and {size % frame_bytes} bytes"
                                                 if size % frame_bytes else "")
        raise EMPADFormatError(
            f"'{raw}' holds {size} bytes ({held} of 130 x 128 float32); the scan "
            f"{tuple(nav[::-1])} needs {n} frames = {n * frame_bytes} bytes"
            + (" (truncated?)" if size < n * frame_bytes else ""))

    per = max(1, int((_CHUNK_BYTES if chunks is None else int(chunks) * frame_bytes)
                     // frame_bytes))
    if len(nav) == 2:
        nav_chunks = (max(1, min(nav[0], per // nav[1])), nav[1]) if per >= nav[1] \
            else (1, per)
    else:
        nav_chunks = (min(per, nav[0]),)
    from dask.base import tokenize

    frames = _RawFrames(raw, nav)
    data = da.from_array(frames, chunks=nav_chunks + FRAME_SHAPE, asarray=False, lock=False,
                         fancy=False, meta=np.empty((0,) * frames.ndim, _DTYPE),
                         name="empad-" + tokenize(raw, os.path.getmtime(raw), size, nav))

    scan_step = info.get("scan_step")
    names = ("y", "x") if len(nav) == 2 else ("frame",)
    axes = [{"name": name, "size": k, "scale": scan_step or 1.0, "offset": 0.0,
             "units": "nm" if scan_step else None, "navigate": True, "index_in_array": i}
            for i, (name, k) in enumerate(zip(names, nav))]
    q = info.get("q_scale")
    for j, name in enumerate(("ky", "kx")):
        axes.append({"name": name, "size": FRAME_SHAPE[j], "scale": q or 1.0, "offset": 0.0,
                     "units": "1/nm" if q else "px", "navigate": False,
                     "index_in_array": len(nav) + j})
    title = os.path.splitext(os.path.basename(filename))[0]
    md = {"General": {"title": title, "original_filename": os.path.basename(filename)},
          "Signal": {"signal_type": "diffraction_patterns"}}
    for key in ("date", "time"):
        if key in info:
            md["General"][key] = info[key]
    tem = {k: info[k] for k in ("beam_energy", "camera_length") if k in info}
    if tem:
        md["Acquisition_instrument"] = {"TEM": tem}
    original = {"empad": {k: v for k, v in info.items()
                          if isinstance(v, (str, float, int, tuple))}}
    return [{"data": data, "axes": axes, "metadata": md, "original_metadata": original}]
