"""Lazy reader for plain HDF5 stacks of frames, including Dectris Arina / EIGER master files.

Dectris detectors (Arina for 4D-STEM, EIGER) write a small *master* file ``<name>_master.h5``
whose group ``entry/data`` holds ``data_000001``, ``data_000002``, ... as external links to
data files ``<name>_data_000001.h5``, ... Each data file holds one dataset ``entry/data/data``
of shape ``(frames, rows, columns)`` (uint8, uint16 or uint32), chunked one frame per chunk
(or a few) and compressed with bitshuffle + LZ4 (HDF5 filter 32008), which h5py reads once
:mod:`hdf5plugin` is imported. The master file also carries the detector's description
(``entry/instrument/detector``: pixel size, detector distance, beam centre, bad-pixel mask,
``detectorSpecific/photon_energy``; ``entry/instrument/beam/incident_wavelength``), which
becomes the signal's calibration. An ARINA acquisition also leaves the scan system's metadata
beside the master file, in ``<name>.h5`` (attributes of ``STEM Metadata``: scan size
``NumPixelsX`` x ``NumPixelsY``, step ``Pixel Size`` in nm, ``High Tension`` in V, ``Camera
Length`` in m), read where present.

The same reader takes any HDF5 file with a stack of frames ``(frames, rows, columns)`` or a
4D dataset ``(scan rows, scan columns, rows, columns)``: it picks the dataset (or takes
``dataset=``), and hands over a dask array of whole frames whose chunks are whole multiples
of the HDF5 chunks along the frames where the scan shape allows, so that no compressed chunk
is decoded twice. Bitshuffle/LZ4 chunks of whole frames are read from the file directly and
decoded by hdf5plugin's bitshuffle library with the GIL released (see :func:`_read_direct`);
h5py reads everything else.

Use it through :func:`diffgpu.load` (it is picked for ``.h5`` files other than HyperSpy's and
EMD's) or through HyperSpy: ``hs.load(path, file_format=diffgpu.readers.hdf5, lazy=True)``.
"""

from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace

import h5py

try:  # registers bitshuffle/LZ4 and other filters with h5py: imported before any read
    import hdf5plugin  # noqa: F401
except ImportError:  # a declared dependency; without it only compressed reads fail, saying why
    hdf5plugin = None
import numpy as np

from ._raw import _read_region
from .errors import DetectorFileError, navigation_shape_array_order

__all__ = ["file_reader", "find_frames", "sniff", "PLUGIN"]

_DATA_LINK = re.compile(r"^data_\d{6}$")
_DETECTOR = "entry/instrument/detector"


def sniff(filename):
    """Which reader an HDF5 file needs: RosettaSciIO's ``"HSPY"`` or ``"EMD"`` for files those
    formats wrote, else this module's :data:`PLUGIN` (also for files that are not HDF5, so
    that the error comes from here and names the problem).

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os
    >>> from diffgpu.readers import hdf5
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("frames", data=np.zeros((6, 8, 8), "uint16"))
    >>> hdf5.sniff(path) is hdf5.PLUGIN
    True
    """
    try:
        f = h5py.File(filename, "r")
    except OSError:
        return PLUGIN
    with f:
        attrs = f.attrs
        fmt = attrs.get("file_format", b"")
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        if fmt.lower() == "hyperspy":
            return "HSPY"
        if "version_major" in attrs and "version_minor" in attrs:  # Berkeley EMD
            return "EMD"
    return PLUGIN


def find_frames(filename, dataset=None):
    """Find the frames in an HDF5 file: a list of ``(file, dataset path, n_frames)`` parts.

    Parameters
    ----------
    filename : str
        A Dectris ``*_master.h5`` file, one of its data files, or any HDF5 file.
    dataset : str, optional
        Path of the dataset inside the file; by default ``entry/data/data_NNNNNN`` links of a
        master file, else ``entry/data/data``, else the only dataset with 3 or 4 dimensions.

    Returns
    -------
    parts : list of (str, str, int)
        Data file, dataset path in it and its number of frames, in frame order.
    shape : tuple of int
        Shape of one part without its first axis (``(rows, columns)`` for a stack of frames,
        ``(scan columns, rows, columns)`` for a 4D dataset).
    dtype : numpy.dtype
    hdf5_chunk : int
        Frames per HDF5 chunk along the first axis (scan rows for a 4D dataset).

    Raises
    ------
    OSError
        Naming the file and what is wrong: not HDF5, no frames, a missing external data
        file, data files that disagree in frame shape or dtype.

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os
    >>> from diffgpu.readers.hdf5 import find_frames
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("frames", data=np.zeros((6, 8, 8), "uint16"), chunks=(2, 8, 8))
    >>> parts, shape, dtype, chunk = find_frames(path)
    >>> parts[0][1:], shape, dtype, chunk
    (('frames', 6), (8, 8), dtype('uint16'), 2)
    """
    filename = os.fspath(filename)
    try:
        f = h5py.File(filename, "r")
    except OSError as err:
        raise DetectorFileError(filename, f"not a readable HDF5 file ({err})") from err
    with f:
        if dataset is not None:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise DetectorFileError(filename, f"no dataset '{dataset}' in the file")
            paths = [dataset]
        elif "entry/data" in f and isinstance(f["entry/data"], h5py.Group) and any(
                _DATA_LINK.match(k) for k in f["entry/data"]):
            paths = [f"entry/data/{k}" for k in sorted(f["entry/data"]) if _DATA_LINK.match(k)]
        elif "entry/data/data" in f and isinstance(f["entry/data/data"], h5py.Dataset):
            paths = ["entry/data/data"]
        else:
            found = []
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                         and obj.ndim in (3, 4) else None)
            if len(found) != 1:
                what = "no dataset" if not found else f"{len(found)} datasets ({', '.join(found)})"
                raise DetectorFileError(
                    filename, f"{what} with 3 or 4 dimensions; pass dataset='path/in/file' "
                              "to say which one holds the frames")
            paths = found
        parts = []
        for path in paths:
            parts.append(_resolve(f, path, filename))
    shapes = {p[3] for p in parts}
    dtypes = {p[4] for p in parts}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise DetectorFileError(
            filename, f"its data files disagree: frame shapes {sorted(shapes)}, "
                      f"dtypes {sorted(str(d) for d in dtypes)}")
    shape, dtype = parts[0][3], parts[0][4]
    if len(shape) not in (2, 3):
        raise DetectorFileError(filename, f"dataset '{parts[0][1]}' has {len(shape) + 1} "
                                          "dimensions; frames need 3 (frames, rows, columns) or 4")
    chunk = math.lcm(*[p[5] for p in parts])
    return [p[:3] for p in parts], shape, dtype, chunk


def _resolve(f, path, filename):
    """(data file, dataset path, n, shape[1:], dtype, chunk frames) of one dataset or link."""
    link = f.get(path, getlink=True)
    target_file, target_path = filename, path
    if isinstance(link, h5py.ExternalLink):
        target_path = link.path
        target_file = os.path.join(os.path.dirname(os.path.abspath(filename)), link.filename)
        if not os.path.exists(target_file):
            raise DetectorFileError(
                filename, f"'{path}' links to the data file '{link.filename}', which is "
                          f"missing (looked for '{target_file}')")
    try:
        dset = f[path]
    except (KeyError, OSError) as err:
        raise DetectorFileError(filename, f"cannot open '{path}' (in '{target_file}'): {err}") \
            from err
    if not isinstance(dset, h5py.Dataset):
        raise DetectorFileError(filename, f"'{path}' is not a dataset")
    if dset.ndim < 3:
        raise DetectorFileError(filename, f"dataset '{path}' has shape {dset.shape}; frames "
                                          "need 3 dimensions (frames, rows, columns) or 4")
    if not (np.issubdtype(dset.dtype, np.number) or dset.dtype == bool):
        raise DetectorFileError(filename, f"dataset '{path}' holds {dset.dtype}, not numbers")
    chunk = dset.chunks[0] if dset.chunks else 1
    return (target_file, target_path, int(dset.shape[0]), tuple(dset.shape[1:]), dset.dtype,
            int(chunk))


class _Frames:
    """Array-like view of frames spread over HDF5 datasets (what dask's ``from_array`` needs).

    Holds file names only, so it pickles to cluster workers; every read opens the file.
    """

    def __init__(self, parts, nav_shape, frame_shape, dtype, source=None, direct=None):
        self.source = source  # the file the user opened (a master file links to the parts)
        self.parts = [(f, p, n) for f, p, n in parts]
        # per part: the stored chunks' (offsets, sizes, frames per chunk) for direct reading
        # of bitshuffle/LZ4 data (see _direct_index), or None to read through h5py
        self.direct = list(direct) if direct is not None else [None] * len(self.parts)
        self.starts = np.cumsum([0] + [n for _, _, n in parts])
        self.nav_shape = tuple(nav_shape)
        self.frame_shape = tuple(frame_shape)
        self.shape = self.nav_shape + self.frame_shape
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def _read(self, start, stop):
        """Frames ``start:stop`` (flat frame index) as one array."""
        out = np.empty((stop - start,) + self.frame_shape, dtype=self.dtype)
        for i, (fname, path, n) in enumerate(self.parts):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a >= b:
                continue
            fa, fb = a - self.starts[i], b - self.starts[i]  # frames in this part
            try:
                if self.direct[i] is not None:
                    _read_direct(fname, self.direct[i], fa, fb, out[a - start:b - start])
                    continue
                with h5py.File(fname, "r") as f:
                    dset = f[path]
                    if dset.ndim == 3:
                        dset.read_direct(out, source_sel=np.s_[fa:fb],
                                         dest_sel=np.s_[a - start:b - start])
                    else:  # a 4D dataset: read whole scan rows, keep the frames asked for
                        ncol = dset.shape[1]
                        r0, r1 = fa // ncol, -(-fb // ncol)
                        rows = dset[r0:r1].reshape((-1,) + self.frame_shape)
                        out[a - start:b - start] = rows[fa - r0 * ncol:fb - r0 * ncol]
            except OSError as err:
                via = (f" (linked from '{os.path.basename(self.source)}')"
                       if self.source and os.path.abspath(self.source) != os.path.abspath(fname)
                       else "")
                hint = (" (the data are compressed with an HDF5 filter; install hdf5plugin)"
                        if hdf5plugin is None and "filter" in str(err).lower() else "")
                raise DetectorFileError(fname, f"could not read frames {a}-{b - 1} of "
                                               f"'{path}'{via}: {err}{hint}") from err
        return out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        nav_key = key[:len(self.nav_shape)]
        if len(nav_key) < len(self.nav_shape) or not all(isinstance(k, slice) for k in nav_key):
            return self._read(0, int(np.prod(self.nav_shape))).reshape(self.shape)[key]
        ranges = [k.indices(n) for k, n in zip(nav_key, self.nav_shape)]
        if any(step != 1 for _, _, step in ranges):
            return self[tuple(slice(None) for _ in ranges)][key]
        frames, shape = _read_region(self._read, ranges, self.nav_shape, self.frame_shape,
                                     self.dtype)
        return frames.reshape(shape + self.frame_shape)[(Ellipsis,) + key[len(nav_key):]]


# -- direct reading of bitshuffle/LZ4 chunks ---------------------------------------------------
# Through h5py every chunk is decoded in HDF5's filter pipeline under h5py's global lock, so
# one thread decodes at a time whatever the number of dask threads. For the Dectris layout
# (one filter, bitshuffle with LZ4) the reader instead reads the stored chunk bytes itself
# (their offsets come from the HDF5 chunk index, read once at load) and decodes them with the
# bitshuffle library hdf5plugin ships (the same compiled code the filter runs), called through
# ctypes, which releases the GIL: every dask thread decodes at once.

_BSHUF = []  # [function or None], looked up once per process


def _bshuf_decompress_lz4():
    """hdf5plugin's ``bshuf_decompress_lz4`` as a ctypes function, or None where unavailable."""
    if not _BSHUF:
        fn = None
        if hdf5plugin is not None:
            import ctypes
            import glob

            for lib in sorted(glob.glob(os.path.join(os.path.dirname(hdf5plugin.__file__),
                                                     "plugins", "*h5bshuf*"))):
                try:
                    fn = ctypes.CDLL(lib).bshuf_decompress_lz4
                except (OSError, AttributeError):
                    continue
                # int64_t bshuf_decompress_lz4(const void* in, void* out, size_t size,
                #                              size_t elem_size, size_t block_size)
                fn.restype = ctypes.c_int64
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                               ctypes.c_size_t, ctypes.c_size_t]
                break
        _BSHUF.append(fn)
    return _BSHUF[0]


def _direct_index(fname, path):
    """``(offsets, sizes, frames per chunk)`` of the stored chunks of a 3D bitshuffle/LZ4
    dataset whose chunks are whole frames, or None (then h5py reads it)."""
    if _bshuf_decompress_lz4() is None:
        return None
    try:
        with h5py.File(fname, "r") as f:
            d = f[path]
            if d.ndim != 3 or d.chunks is None or tuple(d.chunks[1:]) != tuple(d.shape[1:]):
                return None
            plist = d.id.get_create_plist()
            if plist.get_nfilters() != 1:
                return None
            fid, _, cd, _ = plist.get_filter(0)
            # cd_values: (major, minor, element size, block size, compression: 2 = LZ4)
            if fid != 32008 or len(cd) < 5 or cd[4] != 2 or cd[2] != d.dtype.itemsize:
                return None
            k = int(d.chunks[0])
            n = -(-d.shape[0] // k)
            offsets = np.full(n, -1, np.int64)
            sizes = np.zeros(n, np.int64)
            skipped = []

            def note(info):
                c = info.chunk_offset[0] // k
                offsets[c], sizes[c] = info.byte_offset, info.size
                if info.filter_mask:
                    skipped.append(c)

            d.id.chunk_iter(note)
    except (OSError, KeyError, AttributeError, TypeError, ValueError):
        return None  # no chunk index in this HDF5 version, or anything unusual: h5py reads it
    if skipped or (offsets < 0).any():
        return None  # chunks never written (fill value) or stored unfiltered
    return offsets, sizes, k


def _read_direct(fname, index, fa, fb, out):
    """Frames ``fa:fb`` of a dataset indexed by :func:`_direct_index` into ``out``."""
    offsets, sizes, k = index
    decode = _bshuf_decompress_lz4()
    frame_bytes = out[0].nbytes if len(out) else 0
    elem = out.dtype.itemsize
    ca, cb = fa // k, -(-fb // k)
    lo = int(offsets[ca:cb].min())
    hi = int((offsets[ca:cb] + sizes[ca:cb]).max())
    with open(fname, "rb") as f:
        if hi - lo <= 2 * int(sizes[ca:cb].sum()) + 65536:  # stored one after another: one read
            f.seek(lo)
            raw = np.zeros(hi - lo + 64, np.uint8)  # read into, not read and then padded (a copy)
            raw = raw[:f.readinto(memoryview(raw)[:hi - lo]) + 64]
            where = offsets[ca:cb] - lo
        else:
            pieces = []
            for c in range(ca, cb):
                f.seek(int(offsets[c]))
                pieces.append(f.read(int(sizes[c])))
            where = np.cumsum([0] + [len(p) for p in pieces[:-1]])
            raw = np.frombuffer(b"".join(pieces) + bytes(64), np.uint8)
    if len(raw) - 64 < int((where + sizes[ca:cb]).max()):
        raise OSError(f"the file ends inside the stored chunks of frames {fa}-{fb - 1}")
    whole = out if k == 1 else None
    for j, c in enumerate(range(ca, cb)):
        s0, size = int(where[j]), int(sizes[c])
        total = int.from_bytes(raw[s0:s0 + 8].tobytes(), "big")
        block = int.from_bytes(raw[s0 + 8:s0 + 12].tobytes(), "big")
        if size < 12 or total != k * frame_bytes or block <= 0 or block % elem:
            raise OSError(f"chunk {c} is not bitshuffle/LZ4 data of {k} frames "
                          f"(its header says {total} bytes, blocks of {block})")
        f0, f1 = c * k, c * k + k  # frames in this chunk
        if whole is not None:
            dest = out[f0 - fa:f1 - fa]
        else:
            dest = np.empty((k,) + out.shape[1:], out.dtype)
        used = decode(raw.ctypes.data + s0 + 12, dest.ctypes.data, total // elem, elem,
                      block // elem)
        if used != size - 12:
            raise OSError(f"chunk {c} (frames {f0}-{f1 - 1}) cannot be decoded "
                          f"(bitshuffle/LZ4 error {used})")
        if whole is None:
            a, b = max(f0, fa), min(f1, fb)
            out[a - fa:b - fa] = dest[a - f0:b - f0]


def _nav_chunks(nav_shape, frame_bytes, hdf5_chunk, target_bytes):
    """Chunks of the navigation axes: whole frames, whole HDF5 chunks, about ``target_bytes``.

    >>> _nav_chunks((64, 64), 2**17, 1, 2**25)   # 256 frames of 128 KiB: 4 scan rows
    (4, 64)
    >>> _nav_chunks((1000,), 2**17, 10, 2**25)   # a 1D stack: 250 frames, 25 HDF5 chunks
    (250,)
    """
    per = max(1, int(target_bytes // max(frame_bytes, 1)))  # frames per chunk wanted
    whole = max(hdf5_chunk, per // hdf5_chunk * hdf5_chunk)  # ... in whole HDF5 chunks
    if len(nav_shape) == 1:
        return (min(whole, nav_shape[0]),)
    rest = int(np.prod(nav_shape[1:]))  # frames in one step of the first (slowest) axis
    if per < rest and len(nav_shape) == 2:  # part of one scan row per chunk
        return (1, min(whole, rest))
    rows = max(1, per // rest)
    unit = hdf5_chunk // math.gcd(hdf5_chunk, rest)  # rows that fill whole HDF5 chunks
    if unit <= rows:
        rows = rows // unit * unit
    return (min(rows, nav_shape[0]),) + tuple(nav_shape[1:])


def _triggers(filename, n_frames):
    """``(ntrigger, nimages)`` from a Dectris master file when they are several triggers (scan
    rows) of ``nimages`` frames (scan columns) that make up all ``n_frames``; else None."""
    try:
        with h5py.File(filename, "r") as f:
            spec = f.get(f"{_DETECTOR}/detectorSpecific")
            if not isinstance(spec, h5py.Group) or "ntrigger" not in spec or "nimages" not in spec:
                return None
            rows, cols = int(spec["ntrigger"][()]), int(spec["nimages"][()])
    except (OSError, TypeError, ValueError, KeyError):
        return None
    return (rows, cols) if rows > 1 and cols > 1 and rows * cols == n_frames else None


def _read_calibration(filename):
    """Calibration and original metadata from a Dectris master file (empty where absent)."""
    cal, original = {}, {}
    try:
        f = h5py.File(filename, "r")
    except OSError:
        return cal, original
    with f:
        def scalar(path):
            if path in f and isinstance(f[path], h5py.Dataset) and f[path].size == 1:
                value = f[path][()]
                value = value.item() if hasattr(value, "item") else value
                return value.decode() if isinstance(value, bytes) else value
            return None

        det = f.get(_DETECTOR)
        if isinstance(det, h5py.Group):
            for group in (det, det.get("detectorSpecific")):
                if isinstance(group, h5py.Group):
                    for key, obj in group.items():
                        if isinstance(obj, h5py.Dataset) and obj.size == 1:
                            original[key] = scalar(obj.name)
            mask = det.get("detectorSpecific/pixel_mask")
            if isinstance(mask, h5py.Dataset) and mask.ndim == 2:
                cal["mask"] = np.asarray(mask[()]) != 0
        wavelength = scalar("entry/instrument/beam/incident_wavelength")  # Å
        if wavelength is not None:
            original["incident_wavelength"] = wavelength
        pixel = scalar(f"{_DETECTOR}/x_pixel_size")  # m
        distance = scalar(f"{_DETECTOR}/detector_distance")  # m
        cx, cy = scalar(f"{_DETECTOR}/beam_center_x"), scalar(f"{_DETECTOR}/beam_center_y")
        photon = scalar(f"{_DETECTOR}/detectorSpecific/photon_energy")  # eV
        scan = _scan_metadata(filename)
        if scan:
            original["STEM Metadata"] = scan
        wavelength = _electron_wavelength(wavelength, photon, scan.get("High Tension"), cal)
        if _positive(wavelength) and "beam_energy" not in cal:
            from ..calibration import beam_energy_from_wavelength

            cal["beam_energy"] = beam_energy_from_wavelength(float(wavelength))
        if _positive(distance):
            cal["camera_length"] = float(distance) * 1e3  # mm, HyperSpy's unit
        elif _positive(scan.get("Camera Length")):  # the microscope's, in m
            cal["camera_length"] = float(scan["Camera Length"]) * 1e3
        if _positive(scan.get("Pixel Size")):  # the scan step, in nm
            cal["scan_step"] = float(scan["Pixel Size"])
        rows, cols = scan.get("NumPixelsY"), scan.get("NumPixelsX")
        if _positive(rows) and _positive(cols) and rows == int(rows) and cols == int(cols):
            cal["scan_shape"] = (int(rows), int(cols))
        if _positive(wavelength) and _positive(distance) and _positive(pixel):
            # scattering angle per pixel / wavelength = reciprocal distance per pixel (small angles)
            cal["scale"] = float(pixel) / float(distance) / float(wavelength)
        if cx is not None and cy is not None and (cx, cy) != (0, 0):
            cal["center"] = (float(cx), float(cy))
        count_time = scalar(f"{_DETECTOR}/count_time")
        if _positive(count_time):
            cal["exposure"] = float(count_time)
    return cal, original


# h c in eV Å: a photon's wavelength from its energy, as the detector records it
_HC_EV_ANGSTROM = 12398.419843320026


def _electron_wavelength(wavelength, photon_energy, high_tension, cal):
    """The electron wavelength (Å) to calibrate with, and ``cal["beam_energy"]`` (keV) where
    the file states the beam energy rather than the wavelength.

    Dectris detectors keep ``detectorSpecific/photon_energy`` (eV) and
    ``beam/incident_wavelength`` linked as a photon's, wavelength = h c / energy; an electron
    detector (ARINA, QUADRO, SINGLA) is set to the beam energy, so the wavelength it records
    is a photon's of that energy (0.0413 Å at 300 keV), not the electron's (0.0197 Å). A
    wavelength that is not the photon's of the recorded energy (or recorded alone) was set as
    an electron's and is kept. The scan system's high tension (V), where recorded, comes
    first.
    """
    from ..calibration import electron_wavelength

    if _positive(high_tension):
        energy = float(high_tension) / 1e3
    elif _positive(photon_energy) and (not _positive(wavelength) or abs(
            float(wavelength) * float(photon_energy) / _HC_EV_ANGSTROM - 1) < 1e-3):
        energy = float(photon_energy) / 1e3
    else:
        return wavelength
    cal["beam_energy"] = energy
    return electron_wavelength(energy)


def _scan_metadata(filename):
    """What the scan system recorded beside an ARINA acquisition ``<name>_master.h5``: the
    numeric attributes of the group ``STEM Metadata`` in ``<name>.h5`` (``NumPixelsX``,
    ``NumPixelsY``, ``Pixel Size`` in nm, ``High Tension`` in V, ``Camera Length`` in m, ...),
    or ``{}`` where there is no such file or group."""
    if not filename.endswith("_master.h5"):
        return {}
    path = filename[:-len("_master.h5")] + ".h5"
    if not os.path.isfile(path):
        return {}
    try:
        with h5py.File(path, "r") as f:
            group = f.get("STEM Metadata")
            if not isinstance(group, (h5py.Group, h5py.Dataset)):
                return {}
            out = {}
            for key, value in group.attrs.items():
                value = np.asarray(value)
                if value.size == 1 and value.dtype.kind in "biuf":
                    out[key] = value.item()
            return out
    except (OSError, KeyError, TypeError, ValueError):
        return {}  # not an HDF5 file, or unreadable: the scan is calibrated without it


def _positive(value):
    try:
        return value is not None and float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def file_reader(filename, lazy=False, navigation_shape=None, dataset=None, chunks=None, **kwds):
    """Read frames from an HDF5 file (a Dectris Arina / EIGER master file or any stack).

    This is a RosettaSciIO-style reader: ``hs.load(path, file_format=diffgpu.readers.hdf5)``
    and :func:`diffgpu.load` call it.

    Parameters
    ----------
    filename : str
        ``*_master.h5`` (its data files are found through the external links), a data file,
        or any HDF5 file holding a stack of frames.
    lazy : bool
        A dask array read chunk by chunk (:func:`diffgpu.load`'s default), or read it all.
    navigation_shape : tuple of int, optional
        Scan shape in HyperSpy's order ``(x, y)`` = (scan columns, scan rows); one number
        for a 1D stack. By default a 4D dataset keeps its shape; an ARINA scan's metadata
        file beside the master file gives the scan where it holds all the frames; a Dectris
        master file whose ``detectorSpecific/ntrigger`` triggers of ``nimages`` frames each make up all the
        frames is a scan of ``ntrigger`` rows of ``nimages``; else a square number of frames
        becomes a square scan, and anything else a 1D stack.
    dataset : str, optional
        Path of the dataset in the file (see :func:`find_frames`).
    chunks : int or tuple, optional
        About this many frames per dask chunk, as for diffgpu's other readers (whole scan
        rows where they fit, at least 8 frames; :func:`diffgpu.chunking.chunks_of_frames`),
        rounded to whole HDF5 chunks; or dask's chunks of the navigation axes (or of all
        axes; the frames stay whole), taken as given; by default
        :func:`diffgpu.chunking.frame_chunks`'s choice, rounded to whole HDF5 chunks.

    Returns
    -------
    list of dict
        One signal dictionary (``data``, ``axes``, ``metadata``, ``original_metadata``).

    Raises
    ------
    OSError
        Naming the file and what is wrong (see :func:`find_frames`); a navigation shape that
        does not match the number of frames.

    Examples
    --------
    >>> import h5py, hdf5plugin, numpy as np, tempfile, os, diffgpu
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("entry/data/data", data=np.ones((12, 16, 16), "uint16"),
    ...                          chunks=(1, 16, 16), **hdf5plugin.Bitshuffle(cname="lz4"))
    >>> s = diffgpu.load(path, navigation_shape=(4, 3))
    >>> s
    <LazyDiffractionPatterns, title: scan, dimensions: (4, 3|16, 16)>
    >>> int(s.data.sum().compute())
    3072
    """
    import dask.array as da

    from ..chunking import navigation_chunks

    unknown = set(kwds) - {"mmap_mode", "print_info"}
    if unknown:
        raise TypeError(f"unknown keyword arguments for the HDF5 reader: {sorted(unknown)}")
    filename = os.fspath(filename)
    parts, shape, dtype, hdf5_chunk = find_frames(filename, dataset)
    _check_not_empty(filename, parts, shape)
    if len(shape) == 3:  # a 4D dataset: (scan rows, scan columns, rows, columns)
        file_nav = (sum(n for _, _, n in parts), shape[0])
        frame_shape = shape[1:]
        parts = [(f, p, n * shape[0]) for f, p, n in parts]  # counted in frames from here on
    else:
        file_nav = None
        frame_shape = shape
    n_frames = sum(n for _, _, n in parts)
    cal, original = _read_calibration(filename)
    if navigation_shape is not None:
        nav = navigation_shape_array_order(navigation_shape)
        if int(np.prod(nav)) != n_frames:
            raise DetectorFileError(
                filename, f"the file holds {n_frames} frames; navigation_shape="
                          f"{nav[::-1]} needs {int(np.prod(nav))}")
    elif file_nav is not None:
        nav = file_nav
    elif math.prod(cal.get("scan_shape", (0,))) == n_frames:
        nav = cal["scan_shape"]  # the scan system's record beside an ARINA master file
    elif _triggers(filename, n_frames) is not None:
        nav = _triggers(filename, n_frames)  # (triggers, frames per trigger): scan rows, columns
    elif math.isqrt(n_frames) ** 2 == n_frames and n_frames > 1:
        nav = (math.isqrt(n_frames),) * 2
    else:
        nav = (n_frames,)
    if file_nav is not None:
        hdf5_chunk = 1  # frames of a 4D dataset are read by whole scan rows anyway
    direct = [_direct_index(f, p) for f, p, _ in parts] if file_nav is None else None
    frames = _Frames(parts, nav, frame_shape, dtype, source=filename, direct=direct)
    frame_bytes = int(np.prod(frame_shape)) * dtype.itemsize
    if isinstance(chunks, str) and chunks == "auto":
        chunks = None
    if isinstance(chunks, (tuple, list)):
        # dask's chunks of the navigation axes, as asked (a compressed chunk split between two
        # dask chunks is decoded by both: correct, only slower)
        nav_chunks = navigation_chunks(chunks, nav, frame_bytes)
    elif hdf5_chunk == 1:  # diffgpu's choice, or about N frames as the other readers cut them
        nav_chunks = navigation_chunks(chunks, nav, frame_bytes)
    else:  # whole HDF5 chunks, about as many frames as diffgpu's choice (or the caller's: at
        # least 8 frames, whole scan rows where they fit, as the other readers take chunks=N)
        per = math.prod(c[0] for c in navigation_chunks(chunks, nav, frame_bytes))
        nav_chunks = _nav_chunks(nav, frame_bytes, hdf5_chunk, per * frame_bytes)
    data = da.from_array(frames, chunks=tuple(nav_chunks) + tuple(frame_shape), asarray=False,
                         lock=False, fancy=False, meta=np.empty((0,) * len(frames.shape), dtype),
                         name=f"hdf5-frames-{_token(filename, parts)}")
    if not lazy:
        data = data.compute()

    scale = cal.get("scale", 1.0)
    units = "1/Å" if "scale" in cal else "px"
    # the beam centre the detector recorded, else the middle of the detector
    center = cal.get("center", ((frame_shape[1] - 1) / 2, (frame_shape[0] - 1) / 2))
    axes = []
    names = {1: ("frame",), 2: ("y", "x")}.get(len(nav), [f"scan{i}" for i in range(len(nav))])
    step = cal.get("scan_step") if len(nav) == 2 else None  # a scan's step, not a stack's
    for i, n in enumerate(nav):
        axes.append({"name": names[i], "size": n, "scale": step or 1.0, "offset": 0.0,
                     "units": "nm" if step else "", "navigate": True,
                     "index_in_array": i})
    for j, (name, n, c) in enumerate(zip(("ky", "kx"), frame_shape, center[::-1])):
        axes.append({"name": name, "size": n, "scale": scale, "offset": -c * scale,
                     "units": units, "navigate": False, "index_in_array": len(nav) + j})
    title = os.path.splitext(os.path.basename(filename))[0]
    title = title[:-len("_master")] if title.endswith("_master") else title
    md = {"General": {"title": title, "original_filename": os.path.basename(filename)},
          "Signal": {"signal_type": "diffraction_patterns"},
          "Acquisition_instrument": {"Detector": {"name": "Dectris (HDF5)"}}}
    tem = {}
    if "beam_energy" in cal:
        tem["beam_energy"] = cal["beam_energy"]
    if "camera_length" in cal:
        tem["camera_length"] = cal["camera_length"]
    if "exposure" in cal:
        md["Acquisition_instrument"]["Detector"]["exposure_time"] = cal["exposure"]
    if tem:
        md["Acquisition_instrument"]["TEM"] = tem
    if "mask" in cal and cal["mask"].shape == tuple(frame_shape) and cal["mask"].any():
        md["Diffraction"] = {"mask": cal["mask"]}
    original = {"hdf5": {"files": [p[0] for p in parts], "dataset": [p[1] for p in parts],
                         "hdf5_chunk_frames": hdf5_chunk},
                **({"detector": original} if original else {})}
    return [{"data": data, "axes": axes, "metadata": md, "original_metadata": original}]


def _check_not_empty(filename, parts, shape):
    """A dataset of 0 frames (or of frames of 0 pixels) is a file with nothing to read: said
    here, not found later as a signal of navigation size 0 that operations cannot use."""
    if sum(n for _, _, n in parts) and math.prod(shape):
        return
    names = ", ".join(f"'{p}'" for _, p, _ in parts)
    frames = sum(n for _, _, n in parts) * (shape[0] if len(shape) == 3 else 1)
    what = "no frames" if not frames else "frames of no pixels"
    if len(parts) == 1:
        problem = f"the dataset {names} holds {what} (shape {(parts[0][2],) + tuple(shape)})"
    else:
        problem = f"the datasets {names} hold {what} (frame shape {tuple(shape)})"
    raise DetectorFileError(filename, problem)


def _token(filename, parts):
    from dask.base import tokenize

    stats = [(p[0], os.path.getmtime(p[0]), os.path.getsize(p[0])) for p in parts]
    return tokenize(os.path.abspath(filename), stats, parts)


#: what :func:`diffgpu.load` hands ``hs.load(file_format=...)``: this reader under its module's
#: name (HyperSpy records the reader's module name in the signal's metadata)
PLUGIN = SimpleNamespace(file_reader=file_reader, __loader__=SimpleNamespace(name=__name__))
