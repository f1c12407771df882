"""Reading data into diffgpu's signal classes."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import yaml

from .readers.errors import DetectorFileError, ReaderArgumentError

__all__ = ["load", "as_diffraction_patterns"]

_SIGNAL_TYPES = {
    # signal dimension -> diffgpu signal type used when a file does not name one of ours
    2: "diffraction_patterns",
    1: "radial_profiles",
}
# every signal type diffgpu registers, read from the registration itself
_OURS = tuple(sorted({spec["signal_type"] for spec in yaml.safe_load(
    (Path(__file__).parent / "hyperspy_extension.yaml").read_text())["signals"].values()}))


def as_diffraction_patterns(signal, copy=False):
    """Turn any HyperSpy (or pyxem) 2D signal into :class:`~diffgpu.DiffractionPatterns`.

    Data (lazy stays lazy, no copy unless asked), axes calibration, metadata
    and original metadata are kept; the result is a new signal object. pyxem's spellings of
    the detector's units (``$A^{-1}$``, ``k_A^-1``, ``nm$^{-1}$``, ...) become ``1/Å`` and
    ``1/nm``, which diffgpu's operations read.

    A signal whose signal type says it is something else than patterns on a detector
    (pyxem's ``polar_diffraction`` or ``virtual_dark_field``, diffgpu's ``polar_patterns``,
    ``virtual_images``, ...) is refused: its axes are no detector's. Signal types taken: none
    (``""``), pyxem's ``diffraction``, ``electron_diffraction`` and ``insitu_diffraction``,
    and ``diffraction_patterns``.

    Parameters
    ----------
    signal : hyperspy.signal.BaseSignal
        A signal with two signal dimensions (``Signal2D`` or a subclass).
    copy : bool
        Copy the data too (default: share it with ``signal``).

    Returns
    -------
    DiffractionPatterns or LazyDiffractionPatterns

    Raises
    ------
    TypeError
        If ``signal`` is not a HyperSpy signal.
    ValueError
        If it does not have exactly two signal dimensions, or is of another signal type
        (``signal.set_signal_type("")`` first takes its data as patterns anyway).

    Examples
    --------
    >>> import numpy as np, hyperspy.api as hs, diffgpu
    >>> raw = hs.signals.Signal2D(np.zeros((4, 64, 64)))
    >>> raw.axes_manager.signal_axes[0].scale = 0.1
    >>> s = diffgpu.as_diffraction_patterns(raw)
    >>> type(s).__name__, s.axes_manager.signal_axes[0].scale
    ('DiffractionPatterns', 0.1)
    """
    from hyperspy.signal import BaseSignal

    if not isinstance(signal, BaseSignal):
        raise TypeError(f"expected a HyperSpy signal; got {type(signal).__name__}")
    ndim = signal.axes_manager.signal_dimension
    if ndim != 2:
        raise ValueError(
            f"diffraction patterns need 2 signal dimensions (detector rows, columns); "
            f"this signal has {ndim} (signal shape {signal.axes_manager.signal_shape})"
        )
    _check_patterns_type(signal.metadata.get_item("Signal.signal_type", ""), "this signal",
                         "call signal.set_signal_type('') first to take its data as patterns "
                         "anyway", also=("diffraction_patterns",))
    return _as_patterns(signal, copy)


def _as_patterns(signal, copy=False):
    """:func:`as_diffraction_patterns` whatever the signal type of ``signal`` (2D)."""
    data = signal.data.copy() if copy else signal.data
    new = signal._deepcopy_with_new_data(data, copy_variance=True)
    new.set_signal_type("diffraction_patterns")
    for axis in new.axes_manager.signal_axes:
        axis.units = _RECIPROCAL_UNITS.get(axis.units, axis.units)
    return new


# pyxem's spellings of the detector's reciprocal lengths (k, not q = 2 pi k) -> diffgpu's
_RECIPROCAL_UNITS = {**dict.fromkeys(("$A^{-1}$", r"$\AA^{-1}$", "$Å^{-1}$", "A^-1", "Å^-1",
                                      "A-1", "Å-1", "k_A^-1"), "1/Å"),
                     **dict.fromkeys(("nm$^{-1}$", "$nm^{-1}$", "nm^-1", "nm-1", "k_nm^-1"),
                                     "1/nm")}


def load(path, lazy=True, signal_type=None, **kwargs):
    """Load a detector or software file as a diffgpu signal (lazily by default).

    diffgpu's own readers (:mod:`diffgpu.readers`) take Merlin ``.mib``, Dectris Arina /
    EIGER and other HDF5 stacks (``.h5``), EMPAD ``.xml`` + ``.raw``, DigitalMicrograph
    ``.dm3``/``.dm4`` and blockfiles ``.blo``, in chunks of whole frames; RosettaSciIO reads
    every other format (``.hspy``, ``.zspy``, EMD, NeXus ``.nxs``, ...). See the
    "Reading detector and software files" page of the documentation.

    Parameters
    ----------
    path : str or pathlib.Path
        The file (for EMPAD the ``.xml`` file; for Dectris the ``*_master.h5`` file).
    lazy : bool
        Keep the data on disk and read it chunk by chunk as needed (default).
    signal_type : str, optional
        Force one of diffgpu's signal types; by default a file saved by
        diffgpu keeps its type and any other 2D signal becomes
        ``"diffraction_patterns"`` (1D: ``"radial_profiles"``), where the file names no
        signal type or pyxem's ``"diffraction"``, ``"electron_diffraction"`` or
        ``"insitu_diffraction"``. A file of another signal type (pyxem's
        ``"beam_shift"``, ``"polar_diffraction"``, ``"virtual_dark_field"``, ...) is refused
        unless ``signal_type`` is given.
    **kwargs
        Passed to :func:`hyperspy.api.load` and the reader (``navigation_shape=(x, y)``,
        ``chunks=``, ``dataset=`` for HDF5, ``file_format=`` to choose the reader, ...).
        ``chunks`` (about N frames per chunk, or dask's chunks of the navigation axes; the
        frames stay whole) also applies to the formats RosettaSciIO reads (``.hspy``,
        ``.zspy``, EMD, NeXus, ...): their lazy data are rechunked after opening.

    Returns
    -------
    DiffractionPatterns, PolarPatterns, RadialProfiles (or their Lazy classes)
        A list of them if the file holds several signals.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    IsADirectoryError
        If ``path`` is a directory but not a ``.zspy`` (zarr) store.
    OSError
        If no reader could read it; the message names the file and the reason.
    ValueError
        :class:`~diffgpu.readers.errors.DetectorFileError` for a file that holds no frames,
        a ``.zspy`` path that is a file (what its first bytes look like is named), or a
        file a reader finds bad. Also if the data cannot be one of diffgpu's signals (e.g. 3
        signal dimensions, or another signal type, see ``signal_type``), or
        ``chunks`` is a number but not a positive whole number of frames, or a tuple that is
        not dask's chunks of the navigation axes;
        :class:`~diffgpu.readers.errors.ReaderArgumentError` for a ``navigation_shape`` of the
        wrong form.
    TypeError
        For a keyword one of diffgpu's readers does not take.

    Examples
    --------
    >>> import diffgpu, tempfile, os
    >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32))
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.zspy")
    >>> s.save(path, show_progressbar=False)
    >>> diffgpu.load(path)
    <LazyDiffractionPatterns, title: Synthetic 4D-STEM, dimensions: (4, 4|32, 32)>
    """
    import hyperspy.api as hs

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: '{path}'")
    if os.path.isdir(path):  # a .zspy store, perhaps named with a trailing slash
        path = path.rstrip("/" + os.sep) or path
        _check_store(path)
    elif os.path.getsize(path) == 0:
        raise DetectorFileError(path, "the file is empty (0 bytes)")
    elif os.path.splitext(path)[1].lower() == ".zspy":  # zarr's error: "FSPathExistNotDir: %r"
        looks = _looks_like(path)
        raise DetectorFileError(path, "is a file, not a .zspy store (a .zspy is a directory, as "
                                      "HyperSpy and diffgpu write it)"
                                + (f"; it looks like {looks}" if looks else ""))
    if isinstance(kwargs.get("chunks"), (int, float, np.number)):  # (bool included)
        from .chunking import check_chunk_frames

        check_chunk_frames(kwargs["chunks"])  # frames per chunk: a ValueError, not an OSError
    ours = False
    if "file_format" not in kwargs and "reader" not in kwargs:
        reader = _reader_for(path)
        if reader is not None:
            kwargs["file_format"] = reader
            ours = not isinstance(reader, str)
        else:
            _check_extension(path)
            _check_not_empad_xml(path)
    # the path names one file (checked above), not HyperSpy's glob pattern: "scan[1].hspy"
    # would match scan1.hspy, another file, or nothing
    kwargs.setdefault("escape_square_brackets", True)
    if os.path.splitext(path)[1].lower() == ".nxs":
        kwargs.setdefault("nxdata_only", True)  # the NXdata signals, not every axis dataset
    # RosettaSciIO's readers take no chunks (.hspy, .zspy) or chunks of every axis: diffgpu's
    # chunks of whole frames are cut once the file is open
    rechunk = None if ours else kwargs.pop("chunks", None)
    try:
        with _own_reader_errors(ours):
            loaded = hs.load(path, lazy=lazy, **kwargs)
    except (DetectorFileError, ReaderArgumentError):
        raise  # already names the file and what is wrong with it, or the argument
    except TypeError as err:
        if ours:
            raise  # diffgpu's readers: a keyword they do not take, not the file's fault
        raise OSError(f"could not read '{path}': {type(err).__name__}: {err}") from err
    except Exception as err:
        raise OSError(f"could not read '{path}': {type(err).__name__}: {err}") from err
    if isinstance(loaded, list):
        # several signals (DM images, NeXus NXdata groups): the ones diffgpu can take
        usable = [s for s in loaded if _signal_dimension(s) in _SIGNAL_TYPES]
        if usable and len(usable) < len(loaded):
            loaded = usable[0] if len(usable) == 1 else usable
    for s in loaded if isinstance(loaded, list) else [loaded]:
        _check_not_empty(s, path)
        _metadata_in_memory(s)
    if isinstance(loaded, list):
        return [_rechunked(_ours(s, signal_type, path), rechunk) for s in loaded]
    return _rechunked(_ours(loaded, signal_type, path), rechunk)


def _is_zarr_store(path):
    """Whether the directory ``path`` is a zarr store (a .zspy as HyperSpy writes it)."""
    return any(os.path.exists(os.path.join(path, m)) for m in (".zgroup", ".zarray", "zarr.json"))


def _check_store(path):
    """The one directory diffgpu reads is a zarr store (.zspy): another one is named as a
    directory, not blamed on its name ("no reader takes files without an extension")."""
    if not _is_zarr_store(path):
        raise IsADirectoryError(f"'{path}' is a directory, not a data file nor a .zspy store (no "
                                ".zgroup or zarr.json in it): give a data file, or a .zspy "
                                "directory saved by HyperSpy or diffgpu")
    if not path.endswith(".zspy"):  # HyperSpy's error: "No filename matches the pattern"
        raise OSError(f"could not read '{path}': a zarr store, which HyperSpy reads as .zspy "
                      "only under a name ending in '.zspy' (lower case): rename it")


# the first bytes of the formats diffgpu reads -> what the file then looks like
_MAGIC = [(b"MQ1,", "a Merlin .mib file"),
          (b"\x89HDF\r\n\x1a\n", "an HDF5 file (.h5, .hspy, .emd, .nxs)"),
          (b"IMGBLO", "a blockfile (.blo)"),
          (b"\x00\x00\x00\x03", "a DigitalMicrograph .dm3 file"),
          (b"\x00\x00\x00\x04", "a DigitalMicrograph .dm4 file"),
          (b"PK\x03\x04", "a zip file (a zipped zarr store? open it with zarr.storage.ZipStore "
                          "and pass that to hyperspy.api.load)")]


def _looks_like(path):
    """What the first bytes of ``path`` say it is (``"a Merlin .mib file"``, ...), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((what for magic, what in _MAGIC if head.startswith(magic)), None)


def _check_not_empty(signal, path):
    """A signal of no data (a stack of 0 frames) is refused when it is loaded: operations on
    it fail later (a division by its size) or write what cannot be read back."""
    if signal.data.size:
        return
    what = "no frames" if 0 in signal.axes_manager.navigation_shape else "frames of no pixels"
    raise DetectorFileError(path, f"the file holds {what} (array shape {tuple(signal.data.shape)})")


def _metadata_in_memory(signal):
    """Arrays of ``signal.metadata`` read into memory: RosettaSciIO reads those of a lazy
    ``.hspy``/``.zspy`` as dask arrays (a saved detector mask among them), which operations
    that combine them with NumPy arrays cannot take. They are small (detector-sized)."""
    import dask.array as da

    from hyperspy.misc.utils import DictionaryTreeBrowser

    def walk(node):
        for key, value in node:
            if isinstance(value, da.Array):
                node.set_item(key, np.asarray(value.compute()))
            elif isinstance(value, DictionaryTreeBrowser):
                walk(value)

    walk(signal.metadata)


def _rechunked(signal, chunks):
    """``signal`` with its lazy data cut into chunks of whole frames: about ``chunks`` frames
    each (a number, :func:`~diffgpu.chunking.chunks_of_frames`) or dask's chunks of the
    navigation axes (a tuple); ``signal`` itself for ``chunks=None`` or data in memory."""
    if chunks is None or not signal._lazy:
        return signal
    from .chunking import navigation_chunks

    am = signal.axes_manager
    nav = sorted(am.navigation_axes, key=lambda a: a.index_in_array)
    frame_bytes = int(np.prod(am.signal_shape)) * signal.data.dtype.itemsize
    along = navigation_chunks(chunks, [a.size for a in nav], frame_bytes)
    new = [(n,) for n in signal.data.shape]  # signal axes whole
    for axis, c in zip(nav, along):
        new[axis.index_in_array] = c
    signal.data = signal.data.rechunk(tuple(new))
    return signal


def _check_extension(path):
    """An error naming the file where no reader takes its extension (HyperSpy's own error
    for one is about dask's Delayed objects)."""
    from rsciio import IO_PLUGINS

    ext = os.path.splitext(path)[1].lower().lstrip(".")
    known = {e.lower() for plugin in IO_PLUGINS for e in plugin["file_extensions"]}
    if ext == "raw":  # an EMPAD's frames: read through the .xml that describes them
        raise OSError(f"could not read '{path}': a .raw file is read through the file that "
                      "describes it (for an EMPAD scan, the .xml the EMPAD software writes "
                      "beside it: give that .xml)")
    if ext not in known:
        raise OSError(f"could not read '{path}': no reader takes "
                      f"{'files without an extension' if not ext else 'the extension .' + ext} "
                      "(diffgpu reads .mib, .h5, .xml + .raw (EMPAD), .dm3/.dm4, .blo, and "
                      "RosettaSciIO's formats such as .hspy, .zspy, .emd, .nxs; name the format "
                      "with file_format=...)")


def _check_not_empad_xml(path):
    """An error that says what diffgpu reads for an ``.xml`` that names no raw file
    (HyperSpy's own lists two readers, JobinYvon's and EMPAD's, and asks to choose)."""
    if os.path.splitext(path)[1].lower() == ".xml":
        raise OSError(f"could not read '{path}': it is not an EMPAD .xml (no <raw_file> element "
                      "naming its .raw file), the only .xml diffgpu reads; for another kind of "
                      ".xml name HyperSpy's reader with reader=...")


class _NoReportHint:
    """Drops HyperSpy's "please report this error to the RosettaSciIO developers" for errors
    of diffgpu's own readers (they are not RosettaSciIO's, and already say what is wrong)."""

    def filter(self, record):
        return "RosettaSciIO developers" not in record.getMessage()


@contextlib.contextmanager
def _own_reader_errors(ours):
    """:class:`_NoReportHint` on HyperSpy's loader while ``ours`` (one of diffgpu's readers)."""
    logger = logging.getLogger("hyperspy.io")
    hint = _NoReportHint()
    if ours:
        logger.addFilter(hint)
    try:
        yield
    finally:
        logger.removeFilter(hint)


def _signal_dimension(signal):
    """Signal dimension once frames are put last where a reader left every axis a signal axis."""
    return 2 if _frames_last(signal) else signal.axes_manager.signal_dimension


def _frames_last(signal):
    """True for a signal whose reader does not say which axes navigate (RosettaSciIO's Berkeley
    EMD reader makes every axis a signal axis): its last two array axes are the detector's."""
    am = signal.axes_manager
    plugin = str(signal.metadata.get_item("General.FileIO.0.io_plugin", ""))
    return am.navigation_dimension == 0 and am.signal_dimension > 2 and plugin == "rsciio.emd"


def _positive(value):
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def _reader_for(path):
    """The reader for ``path`` where HyperSpy's choice by extension would not do: one of
    diffgpu's reader modules, a RosettaSciIO format name, or None (HyperSpy chooses)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".h5", ".hdf5", ".hdf", ".he5"):
        from .readers import hdf5

        return hdf5.sniff(path)
    if ext in (".mib", ".hdr"):
        from .readers import mib

        return mib.PLUGIN
    if ext == ".xml":
        from .readers import empad

        return empad.PLUGIN if empad.is_empad(path) else None
    if ext in (".dm3", ".dm4"):
        from .readers import dm

        return dm.PLUGIN
    if ext == ".blo":
        from .readers import blockfile

        return blockfile.PLUGIN
    return None


# signal types (besides diffgpu's) under which files hold diffraction patterns, or radial profiles
# for one signal axis: none (HyperSpy's generic signals, most readers) and pyxem's
_PATTERN_TYPES = ("", "diffraction", "electron_diffraction", "insitu_diffraction")
# what to do instead with the other signals pyxem writes, by signal type
_FOREIGN_HINTS = {
    "polar_diffraction": "pyxem's azimuth runs the other way from diffgpu's: integrate the "
                         "diffraction patterns with diffgpu",
    "polar_patterns": "integrated already",
    "beam_shift": "DiffractionPatterns.center_direct_beam(shifts=...) takes pyxem's beam "
                  "shifts as they are",
}


def _check_patterns_type(signal_type, subject, anyway, also=()):
    """A signal whose signal type says it is something else than diffraction patterns (pyxem's
    beam shifts, virtual dark-field images, polar patterns, vectors; EELS spectra) is named, not
    taken as patterns or radial profiles by its number of signal axes. ``subject`` names the
    file or signal, ``anyway`` how to take it all the same; ``also``: further types taken."""
    if not isinstance(signal_type, str) or signal_type in _PATTERN_TYPES + tuple(also):
        return
    hint = _FOREIGN_HINTS.get(signal_type)
    raise ValueError(f"{subject} is of signal type {signal_type!r}, not diffraction patterns"
                     + (f": {hint}" if hint else "") + f"; {anyway}")


def _our_class(signal, signal_type):
    """``signal`` as diffgpu's class for its signal type and number of signal axes where
    HyperSpy gave it another (its generic ``Signal1D`` for the virtual images of a one-axis
    scan, :class:`~diffgpu.VirtualProfiles`, where HyperSpy's registry lacks that class)."""
    from .signals._wrap import signal_class

    # (the number of signal axes: HyperSpy's signal_dimension is 0 for one axis of size 1)
    cls = signal_class(signal_type, len(signal.axes_manager.signal_axes), signal._lazy)
    if cls is not None and not isinstance(signal, cls):
        signal.__class__ = cls  # as HyperSpy's _assign_subclass does
        signal.__init__(signal.data, full_initialisation=False)
    return signal


def _ours(signal, signal_type, path):
    if _frames_last(signal):
        signal = signal.transpose(signal_axes=2)
    tem = signal.metadata.get_item("Acquisition_instrument.TEM", None)
    for key in ("beam_energy", "camera_length"):
        # readers copy a header's 0 ("not recorded"); 0 keV has no wavelength
        if tem is not None and tem.has_item(key) and not _positive(tem.get_item(key)):
            tem.__delattr__(key)
    if signal_type is None:
        current = signal.metadata.get_item("Signal.signal_type", "")
        if current in _OURS:
            return _our_class(signal, current)
        _check_patterns_type(current, f"'{path}' holds a signal that",
                             "load it with hyperspy.api.load, or pass signal_type="
                             "'diffraction_patterns' (or 'radial_profiles') to read its data "
                             "as that anyway")
        dim = signal.axes_manager.signal_dimension
        if dim not in _SIGNAL_TYPES:
            raise ValueError(
                f"'{path}' holds a signal with {dim} signal dimensions; diffgpu reads diffraction "
                "patterns (2) or radial profiles (1)"
            )
        signal_type = _SIGNAL_TYPES[dim]
    if signal_type == "diffraction_patterns":
        return _as_patterns(signal)
    if signal_type not in _OURS:
        raise ValueError(f"signal_type must be one of {_OURS}; got {signal_type!r}")
    signal.set_signal_type(signal_type)
    if not type(signal).__module__.startswith("diffgpu."):
        raise ValueError(
            f"'{path}' holds a signal of signal dimension {signal.axes_manager.signal_dimension}, "
            f"which cannot be {signal_type!r}"
        )
    return signal
