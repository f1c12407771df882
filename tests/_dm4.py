"""A small writer of Gatan DigitalMicrograph 4 (``.dm4``) files, for tests.

DM4 is a tree of tags. The file starts with three big-endian numbers: the version (int32, 4),
the size of the tag tree (int64) and the byte order of the data (int32, 1 = little-endian).
Then the root tag group: ``is_sorted`` (uint8), ``is_open`` (uint8), number of tags (int64).
Every tag starts with its kind (uint8: 20 = group, 21 = data), the length of its name
(big-endian uint16), the name, and the tag's size in bytes (big-endian int64). A group then
holds ``is_sorted``, ``is_open`` and its number of tags, followed by the tags. A data tag
holds the delimiter ``%%%%``, the length of its type description (int64), the description
(int64 codes, big-endian) and the value in the data byte order. Type codes: 2 int16, 3 int32,
4 uint16, 5 uint32, 6 float32, 7 float64, 8 bool, 9 int8, 10 uint8, 11 int64, 12 uint64,
15 struct, 18 string, 20 array (description ``20, element type, length``).

An image lives in ``ImageList`` (a group of unnamed groups, one per image) under
``ImageData``: ``Data`` (an array), ``DataType`` (the image type code: 1 int16, 2 float32,
6 uint8, 7 int32, 9 int8, 10 uint16, 11 uint32, 12 float64, 14 bool, 23 RGBA),
``Dimensions`` (the sizes, fastest-varying first) and ``Calibrations`` (``Dimension``: an
origin in pixels, a scale and units for each dimension; ``Brightness``). The microscope's
state is in ``ImageTags`` (``Microscope Info``: ``Voltage`` in V, ``STEM Camera Length``,
``Illumination Mode``). A DM file also carries a thumbnail, listed in ``Thumbnails``.
A 4D-STEM dataset ``(scan rows, scan columns, rows, columns)`` in C order has the
dimensions ``columns, rows, scan columns, scan rows``.
"""

import struct

import numpy as np

# numpy dtype -> (image DataType, array element type code)
_IMAGE_TYPES = {
    np.dtype("int16"): (1, 2), np.dtype("float32"): (2, 6), np.dtype("uint8"): (6, 10),
    np.dtype("int32"): (7, 3), np.dtype("int8"): (9, 9), np.dtype("uint16"): (10, 4),
    np.dtype("uint32"): (11, 5), np.dtype("float64"): (12, 7), np.dtype("bool"): (14, 8),
}
_SIMPLE = {"h": 2, "i": 3, "H": 4, "I": 5, "f": 6, "d": 7}


class _Group:
    def __init__(self, items=()):
        self.items = list(items)  # (name, value) with value a _Group, _Data, str or number


class _Data:
    def __init__(self, info, payload):
        self.info = info  # list of int64 type codes
        self.payload = payload  # bytes, in the data byte order


def _value(v, endian):
    """A tag value from a Python value: str -> uint16 array, float -> float32, int -> int32."""
    if isinstance(v, (_Group, _Data)):
        return v
    if isinstance(v, str):
        chars = np.frombuffer(v.encode("utf-16-le"), "<u2").astype(endian + "u2")
        return _Data([20, 4, len(chars)], chars.tobytes())
    if isinstance(v, tuple):  # (struct format char, value)
        code, x = v
        return _Data([_SIMPLE[code]], struct.pack(endian + code, x))
    if isinstance(v, bool):
        return _Data([8], struct.pack("B", v))
    if isinstance(v, int):
        return _Data([3], struct.pack(endian + "i", v))
    return _Data([6], struct.pack(endian + "f", float(v)))


def _encode_group(group, endian, root=False):
    body = b""
    for name, v in group.items:
        v = _value(v, endian)
        name_b = name.encode("latin-1")
        if isinstance(v, _Group):
            inner = _encode_group(v, endian)
            entry = struct.pack(">BH", 20, len(name_b)) + name_b
            body += entry + struct.pack(">q", len(inner)) + inner
        else:
            inner = b"%%%%" + struct.pack(">q", len(v.info)) + \
                struct.pack(f">{len(v.info)}q", *v.info) + v.payload
            entry = struct.pack(">BH", 21, len(name_b)) + name_b
            body += entry + struct.pack(">q", len(inner)) + inner
    return struct.pack(">BBq", 1 if root else 0, 0, len(group.items)) + body


def _image(data, scales, origins, units, endian):
    """The ImageList entry of one image; scales/origins/units in array (C) order."""
    data = np.asarray(data)
    dtype = data.dtype.newbyteorder("=")
    image_type, element = _IMAGE_TYPES[dtype]
    raw = np.ascontiguousarray(data, dtype=dtype.newbyteorder("<" if endian == "<" else ">"))
    dims = _Group([("", ("I", n)) for n in data.shape[::-1]])  # fastest first
    cal = _Group([("", _Group([("Origin", o), ("Scale", s), ("Units", u)]))
                  for s, o, u in zip(scales[::-1], origins[::-1], units[::-1])])
    image_data = _Group([
        ("Calibrations", _Group([
            ("Brightness", _Group([("Origin", 0.0), ("Scale", 1.0), ("Units", "Counts")])),
            ("Dimension", cal),
            ("DisplayCalibratedUnits", True)])),
        ("Data", _Data([20, element, data.size], raw.tobytes())),
        ("DataType", image_type),
        ("Dimensions", dims),
        ("PixelDepth", dtype.itemsize),
    ])
    return image_data


def write_dm4(path, data, signal_scale=1.0, signal_units="", signal_origin=(0.0, 0.0),
              nav_scale=1.0, nav_units="", voltage=None, camera_length=None, endian="<",
              meta_data=None):
    """Write ``data`` (``(scan rows, scan columns, rows, columns)`` or a stack of frames) as
    a DM4 file the way DigitalMicrograph lays it out (a thumbnail first, then the dataset).

    ``signal_origin`` is the pixel ``(x, y)`` where the calibrated detector coordinate is 0
    (DM's ``Origin``); ``voltage`` in V and ``camera_length`` in mm go to ``Microscope Info``;
    ``meta_data`` (name -> value) to the image's ``Meta Data`` tags (``Format``, ``Data Order
    Swapped``, ...).
    """
    data = np.asarray(data)
    nav = data.ndim - 2
    scales = [nav_scale] * nav + [signal_scale] * 2
    origins = [0.0] * nav + [float(signal_origin[1]), float(signal_origin[0])]
    units = [nav_units] * nav + [signal_units] * 2
    thumb = np.zeros((8, 8), "uint32")  # RGBA thumbnail, as DM writes one
    thumb_data = _Group([
        ("Calibrations", _Group([("Dimension", _Group([
            ("", _Group([("Origin", 0.0), ("Scale", 1.0), ("Units", "")])) for _ in range(2)]))])),
        ("Data", _Data([20, 5, thumb.size], thumb.astype(endian + "u4").tobytes())),
        ("DataType", 23),
        ("Dimensions", _Group([("", ("I", 8)), ("", ("I", 8))])),
        ("PixelDepth", 4),
    ])
    microscope = [("Illumination Mode", "STEM"), ("Imaging Mode", "DIFFRACTION"),
                  ("Name", "diffgpu test microscope")]
    if voltage is not None:
        microscope.append(("Voltage", ("d", float(voltage))))
    if camera_length is not None:
        microscope.append(("STEM Camera Length", ("f", float(camera_length))))
    image_tags = _Group([("Microscope Info", _Group(microscope)),
                         ("Session Info", _Group([("Operator", "test")]))]
                        + ([("Meta Data", _Group(list(meta_data.items())))] if meta_data else []))
    images = _Group([
        ("", _Group([("ImageData", thumb_data), ("ImageTags", _Group()), ("Name", "")])),
        ("", _Group([("ImageData", _image(data, scales, origins, units, endian)),
                     ("ImageTags", image_tags), ("Name", "4D scan"),
                     ("UniqueID", _Group([("", ("I", 1)), ("", ("I", 2)), ("", ("I", 3)),
                                          ("", ("I", 4))]))])),
    ])
    root = _Group([
        ("ApplicationBounds", _Group([("", ("i", 0)), ("", ("i", 0)), ("", ("i", 800)),
                                      ("", ("i", 1200))])),
        ("DocumentObjectList", _Group()),
        ("ImageList", images),
        ("Image Behavior", _Group([("ViewDisplayID", 8)])),
        ("InImageMode", True),
        ("Thumbnails", _Group([("", _Group([("ImageIndex", 0), ("SourceSize_Pixels", _Group(
            [("", 8), ("", 8)]))]))])),
    ])
    tree = _encode_group(root, endian, root=True) + b"\x00" * 8  # DM4 files end with 8 zeros
    header = struct.pack(">iqi", 4, len(tree), 1 if endian == "<" else 0)
    with open(path, "wb") as f:
        f.write(header + tree)
