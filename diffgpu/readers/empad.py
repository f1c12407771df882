"""Lazy reader for EMPAD (Electron Microscope Pixel Array Detector) scans: ``.xml`` + ``.raw``.

The EMPAD software writes two files per acquisition. The ``.xml`` file describes it: the name
of the raw file (``<raw_file filename="scan_x256_y256.raw"/>``), the scan
(``<scan_parameters mode="acquire">`` with ``scan_resolution_x`` and ``scan_resolution_y``; older files:
``<pix_x>``/``<pix_y>``, which win over ``<scan_parameters>`` where both are given; a series:
``<type>series</type>`` and ``<count>``) and the microscope (``<iom_measurements>``:
``high_voltage`` in V, ``nominal_camera_length`` in m, ``full_scan_field_of_view``). The
``.raw`` file holds the frames one after another, each 128 x 128 little-endian float32 pixels
followed by two rows (2 x 128 float32) of per-frame metadata, which the reader drops.

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

from types import SimpleNamespace

import numpy as np

from ._raw import RawFrames, lazy_raw
from .errors import DetectorFileError, ReaderArgumentError, navigation_shape_array_order

__all__ = ["file_reader", "is_empad", "read_xml", "FRAME_SHAPE", "RAW_FRAME_SHAPE", "PLUGIN"]

FRAME_SHAPE = (128, 128)
#: each frame in the .raw file: 128 rows of pixels and 2 rows of per-frame metadata
RAW_FRAME_SHAPE = (130, 128)
_DTYPE = np.dtype("<f4")


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
        raise DetectorFileError(filename, f"not a readable EMPAD XML file ({err})") from err
    raw = root.find("raw_file")
    if raw is None or not raw.get("filename"):
        raise DetectorFileError(filename, "the XML does not name its raw file "
                                          "(<raw_file filename=...>)")
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

    def whole(path, node=root):
        """The whole number of element ``path``; None where there is no such element."""
        el = node.find(path)
        if el is None:
            return None
        value = number(path, node)
        if value is None or value != int(value):
            raise DetectorFileError(filename, f"<{path}> is {(el.text or '').strip()!r}, not a "
                                              "whole number: the scan shape cannot be read")
        return int(value)

    def scan(x, y, node=root):
        """``(rows, columns)`` from the elements ``x`` and ``y``: both, or an error."""
        sizes = whole(x, node), whole(y, node)
        if None in sizes:
            given, missing = (x, y) if sizes[1] is None else (y, x)
            raise DetectorFileError(filename, f"the XML gives <{given}> but not <{missing}>: "
                                              "the scan shape cannot be read")
        return sizes[1], sizes[0]

    def has(*paths, node=root):
        return any(node.find(p) is not None for p in paths)

    typ = root.find("type")
    acquire = [e for e in root.findall("scan_parameters") if e.get("mode", "acquire") == "acquire"]
    if typ is not None and (typ.text or "").strip() == "series":
        count = whole("count")
        nav = None if count is None else (count,)
    elif has("scan_parameters/series_count"):
        nav = (whole("scan_parameters/series_count"),)
    elif has("pix_x", "pix_y"):
        # older files: the frames recorded; their <scan_parameters> may hold the scan
        # generator's resolution instead (128 x 128 beside pix_x = pix_y = 4)
        nav = scan("pix_x", "pix_y")
    elif acquire and has("scan_resolution_x", "scan_resolution_y", node=acquire[0]):
        nav = scan("scan_resolution_x", "scan_resolution_y", acquire[0])
    else:
        m = re.search(r"_x(\d+)_y(\d+)", os.path.basename(raw_name))
        nav = (int(m.group(2)), int(m.group(1))) if m else None
    if nav is None:
        raise DetectorFileError(filename, "the XML does not say the scan shape "
                                          "(scan_resolution_x/y, pix_x/pix_y or a series count)")
    # every other scan shape the file records, for a raw file that holds another number of
    # frames than the first says (some hold the "search" scan's, not the "acquire" one's)
    others = []
    search = [e for e in root.findall("scan_parameters") if e.get("mode") == "search"]
    for node in acquire + search:
        try:
            others.append(scan("scan_resolution_x", "scan_resolution_y", node))
        except DetectorFileError:
            pass
    m = re.search(r"_x(\d+)_y(\d+)", os.path.basename(raw_name))
    if m:
        others.append((int(m.group(2)), int(m.group(1))))
    info["other_shapes"] = [o for o in dict.fromkeys(others) if o != nav and min(o) >= 1]
    if min(nav) < 1:
        scan = " x ".join(str(n) for n in nav[::-1])
        raise DetectorFileError(filename, f"the XML gives a scan of {scan} frames: the "
                                          "acquisition holds no frames")
    info["nav_shape"] = nav

    # older files name the microscope's readings by its API calls, as elements with a dot in
    # their names: <optics.get_cameralength>, <source.get_voltage>, ...
    voltage = number("iom_measurements/high_voltage")
    if voltage is None:
        voltage = number("iom_measurements/source.get_voltage")
    if voltage and voltage > 0:
        info["beam_energy"] = voltage / 1e3
    length = number("iom_measurements/nominal_camera_length")
    if length is None:
        length = number("iom_measurements/optics.get_cameralength")
    if length and length > 0:
        info["camera_length"] = length * 1e3
    pixel = number("iom_measurements/calibrated_pixelsize")  # older files; x 1e9 -> 1/nm
    if pixel and pixel > 0:
        info["q_scale"] = pixel * 1e9
    fov = number("iom_measurements/full_scan_field_of_view/x")
    factor = number("iom_measurements/full_scan_field_of_view/scale_factor")
    if fov is None:  # older files: "(x, y)" in metres
        el = root.find("iom_measurements/optics.get_full_scan_field_of_view")
        el = root.find("iom_measurements/optics/get_full_scan_field_of_view") if el is None else el
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


def file_reader(filename, lazy=False, navigation_shape=None, chunks=None, q_calibration=None,
                **kwds):
    """Read an EMPAD scan from its ``.xml`` file (the ``.raw`` file beside it holds the data).

    A RosettaSciIO-style reader: ``hs.load(path, file_format=diffgpu.readers.empad)`` and
    :func:`diffgpu.load` call it.

    Parameters
    ----------
    filename : str
        The ``.xml`` file.
    lazy : bool
        A dask array read chunk by chunk (:func:`diffgpu.load`'s default), or read it all.
    navigation_shape : tuple of int, optional
        Scan shape in HyperSpy's order ``(x, y)`` (one number for a series), to override
        the XML's (e.g. to read the complete rows of a scan that was stopped early).
    chunks : int or tuple, optional
        Frames per dask chunk, or navigation chunks; default
        :func:`diffgpu.chunking.frame_chunks` (whole frames, whole scan rows where they fit).
    q_calibration : float, optional
        The detector's scale in 1/nm per pixel, as RosettaSciIO's EMPAD reader takes it
        (newer EMPAD software records none); by default the XML's
        ``calibrated_pixelsize`` where present, else pixels.

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
    unknown = set(kwds) - {"mmap_mode", "print_info"}
    if unknown:
        raise TypeError(f"unknown keyword arguments for the EMPAD reader: {sorted(unknown)}")
    filename = os.fspath(filename)
    info = read_xml(filename) if navigation_shape is None else _read_xml_lenient(filename)
    raw = info["raw"]
    if not os.path.exists(raw):
        raise DetectorFileError(filename, f"its raw file '{os.path.basename(raw)}' is missing "
                                          f"(looked for '{raw}')")
    nav = info.get("nav_shape")
    if navigation_shape is not None:
        nav = navigation_shape_array_order(navigation_shape)
    n = int(np.prod(nav))
    stride = int(np.prod(RAW_FRAME_SHAPE)) * _DTYPE.itemsize
    size = os.path.getsize(raw)
    fits = [o for o in info.get("other_shapes", []) if int(np.prod(o)) * stride == size]
    if navigation_shape is None and size != n * stride and fits:
        # the raw file holds another scan the XML records (its "search" scan; the scan its
        # name gives): the recorded field of view spans that scan's larger side
        if info.get("scan_step") and len(fits[0]) == 2:
            info["scan_step"] *= max(nav) / max(fits[0])
        nav, n = fits[0], int(np.prod(fits[0]))
    if size < n * stride or (navigation_shape is None and size != n * stride):
        held = f"{size // stride} frames" + (f" and {size % stride} bytes" if size % stride else "")
        raise DetectorFileError(
            raw, f"(the raw file of '{os.path.basename(filename)}') holds {size} bytes "
                 f"({held} of 130 x 128 float32); the scan "
                 f"{tuple(nav[::-1])} (x, y) needs {n} frames = {n * stride} bytes"
                 + (" (truncated?)" if size < n * stride else "; pass navigation_shape= to "
                    "read the first frames only"))
    data = lazy_raw(RawFrames(raw, 0, nav, FRAME_SHAPE, _DTYPE, stride=stride), "empad", chunks)
    if not lazy:
        data = data.compute()

    scan_step = info.get("scan_step")
    names = ("y", "x") if len(nav) == 2 else ("frame",)
    axes = [{"name": name, "size": k, "scale": scan_step or 1.0, "offset": 0.0,
             "units": "nm" if scan_step else None, "navigate": True, "index_in_array": i}
            for i, (name, k) in enumerate(zip(names, nav))]
    if q_calibration is not None:
        try:
            ok = float(q_calibration) > 0 and np.isfinite(float(q_calibration))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ReaderArgumentError(f"q_calibration must be a positive number (1/nm per pixel); "
                                      f"got {q_calibration!r}")
        info["q_scale"] = float(q_calibration)
    q = info.get("q_scale") or 1.0
    for j, name in enumerate(("ky", "kx")):
        # the origin at the middle of the detector until the beam is found
        axes.append({"name": name, "size": FRAME_SHAPE[j], "scale": q,
                     "offset": -(FRAME_SHAPE[j] - 1) / 2 * q,
                     "units": "1/nm" if "q_scale" in info else "px", "navigate": False,
                     "index_in_array": len(nav) + j})
    title = os.path.splitext(os.path.basename(filename))[0]
    md = {"General": {"title": title, "original_filename": os.path.basename(filename)},
          "Signal": {"signal_type": "diffraction_patterns"},
          "Acquisition_instrument": {"Detector": {"name": "EMPAD"}}}
    for key in ("date", "time"):
        if key in info:
            md["General"][key] = info[key]
    tem = {k: info[k] for k in ("beam_energy", "camera_length") if k in info}
    if tem:
        md["Acquisition_instrument"]["TEM"] = tem
    original = {"empad": {k: v for k, v in info.items()
                          if isinstance(v, (str, float, int, tuple))}}
    return [{"data": data, "axes": axes, "metadata": md, "original_metadata": original}]


def _read_xml_lenient(filename):
    """read_xml, where the scan shape may be missing (the caller gives it)."""
    try:
        return read_xml(filename)
    except DetectorFileError as err:
        if "scan shape" not in err.problem:
            raise
    root = ET.parse(filename).getroot()
    name = root.find("raw_file").get("filename")
    return {"raw": os.path.join(os.path.dirname(os.path.abspath(filename)),
                                os.path.basename(name.replace("\\", "/")))}


#: what :func:`diffgpu.load` hands ``hs.load(file_format=...)``: this reader under its module's
#: name (HyperSpy records the reader's module name in the signal's metadata)
PLUGIN = SimpleNamespace(file_reader=file_reader, __loader__=SimpleNamespace(name=__name__))
