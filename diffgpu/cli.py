"""The ``diffgpu`` command line: batch runs on a workstation or a cluster.

::

    diffgpu info
    diffgpu demo [-o DIR]
    diffgpu integrate INPUT -o OUTPUT.zspy [--npt 100] [--npt-azim 360 | --1d] [--center X Y] ...
    diffgpu virtual INPUT -o OUTPUT.zspy --disc R [--annulus R_IN R_OUT] ...
    diffgpu orientation INPUT -o OUTPUT.zspy --phase Si|FILE.cif [--resolution 1] [--ipf MAP.png]
                        [--n-best 5 --reliability MAP.png] [--refine]
    diffgpu strain INPUT -o OUTPUT.zspy --radius R | --template PROBE.npy
                   [--reference ROW0 ROW1 COL0 COL1 | --reference-vectors G1X G1Y G2X G2Y]
                   [--basis G1X G1Y G2X G2Y] [--min-disks 6] [--png MAP.png]
                   [--rings RINGS.npy --d-spacings D ... | --ring-phase Si|FILE.cif]

Every command reads any format RosettaSciIO reads, lazily, and writes ``.zspy`` (zarr)
chunk by chunk with a progress bar. Output is atomic: it is written under a temporary
name next to OUTPUT and renamed only when complete, so an interrupted or failed run leaves
no OUTPUT behind. The figures of ``--png``, ``--ipf`` and ``--reliability`` are part of
the same output: their paths are checked before anything is computed (the directory must
exist, the extension be a figure format, the file not exist unless ``--overwrite``), they
are written under temporary names too, and OUTPUT and the figures are moved into place
together only when all of them are complete. Output directories are never created: a
missing one is an error. Exit codes: 0 success, 2 bad arguments, 3 bad input (unreadable
file, wrong shape, an output path that cannot be written), 4 no GPU where one was required,
1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUT, EXIT_DEVICE = 0, 1, 2, 3, 4


class InputError(Exception):
    """The input (file, shape, mask) cannot be processed."""


def _positive_int(text):
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _finite(text):
    """argparse type: a finite number (a coordinate, a vector component)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {value:g}")
    return value


def _fraction(text):
    """argparse type: a number from 0 up to (not including) 1."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be from 0 up to (not including) 1; got {value:g}")
    return value


def _finite_positive(text):
    """argparse type: a finite number above 0 (a radius)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite positive number; got {value:g}")
    return value


def _common(p):
    p.add_argument("input", help="input file (any format RosettaSciIO reads)")
    p.add_argument("-o", "--output", required=True,
                   help="output .zspy path; its directory must exist (it is not created)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT (and the figure files asked for) if they exist")
    p.add_argument("--center", type=_finite, nargs=2, metavar=("X", "Y"),
                   help="direct beam (x, y) in pixels (default: from the file's calibration); "
                        "outside the detector: a warning; more than one detector size outside "
                        "it: an error")
    p.add_argument("--scale", type=_finite_positive, help="detector pixel size in --units")
    p.add_argument("--units", help="units of --scale, e.g. 1/nm or 1/Å")
    p.add_argument("--mask", help=".npy file: detector-shaped mask, True = excluded; a bool "
                                  "array, or integers or floats that are all 0 or 1 (1 = excluded); "
                                  "added to the file's own mask (gaps between chips, bad pixels)")
    p.add_argument("--navigation-shape", type=_positive_int, nargs="+", metavar="N",
                   help="scan shape (x, y), positive integers, for files that do not say: .mib "
                        "without .hdr, EMPAD .raw, HDF5 and DigitalMicrograph frame stacks "
                        "(other formats record it: an error there)")
    p.add_argument("--chunks", type=_positive_int, metavar="FRAMES",
                   help="about this many frames per chunk, a positive integer (whole scan rows "
                        "where they fit; a chunk gets at least 8 frames while that stays below "
                        "64 MiB). Default: diffgpu's choice, which `diffgpu info FILE` prints")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where to compute (auto: a GPU if one works)")
    p.add_argument("--scheduler", default="threads",
                   help="'threads' (default), 'local-cluster' (one worker per GPU, or CPU workers), "
                        "or the address of a running dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(prog="diffgpu", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffgpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, CUDA devices, dask-cuda; or how a FILE is read "
                          "and the calibration a run takes from it")
    info.add_argument("file", nargs="?", help="a data file: format, dtype and byte order, shape, "
                      "the reader's chunks and diffgpu's, header fields")
    info.add_argument("--navigation-shape", type=_positive_int, nargs="+", metavar="N",
                      help="scan shape (x, y), positive integers, for files that do not say "
                           "(.mib without .hdr, EMPAD .raw, HDF5 and DigitalMicrograph frame "
                           "stacks; other formats record it: an error there)")
    demo = sub.add_parser("demo", help="the main job on built-in synthetic data (PNG figure)")
    demo.add_argument("-o", "--output", default="demo-output",
                      help="directory for the figures (made if needed; default demo-output)")
    demo.add_argument("--nav", type=_positive_int, nargs=2, default=(32, 32),
                      metavar=("ROWS", "COLS"), help="scan shape of the synthetic data")
    demo.add_argument("--sig", type=_positive_int, nargs=2, default=(128, 128),
                      metavar=("ROWS", "COLS"), help="detector shape of the synthetic data")
    demo.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                      help="where to compute (auto: a GPU if one works)")

    integ = sub.add_parser("integrate", help="azimuthal integration (2D polar, or 1D profiles)")
    _common(integ)
    integ.add_argument("--npt", type=_positive_int, default=100, help="radial bins")
    integ.add_argument("--npt-azim", type=_positive_int, default=360, help="azimuthal bins (2D)")
    integ.add_argument("--1d", dest="one_d", action="store_true", help="radial profiles only")
    integ.add_argument("--radial-range", type=_finite, nargs=2, metavar=("START", "STOP"),
                       help="radii integrated, in the detector's calibrated units (--units); "
                            "default from 0 to the farthest detector corner")
    integ.add_argument("--mean", action="store_true", help="mean per pixel instead of sum")

    virt = sub.add_parser("virtual", help="virtual images (discs, annuli) in one pass")
    _common(virt)
    virt.add_argument("--disc", type=_finite_positive, action="append", default=[], metavar="R",
                      help="a disc detector of radius R around the centre (calibrated units), "
                           "a finite number above 0")
    virt.add_argument("--annulus", type=float, nargs=2, action="append", default=[],
                      metavar=("R_IN", "R_OUT"), help="an annular detector around the centre: "
                      "R_IN < distance <= R_OUT, with 0 <= R_IN < R_OUT finite")
    ori = sub.add_parser("orientation", help="orientation mapping by template matching")
    _common(ori)
    ori.add_argument("--phase", required=True, action="append",
                     help="'Si' (built in) or a CIF file; repeat for several phases")
    ori.add_argument("--resolution", type=_finite_positive, default=1.0, help="library spacing, degrees")
    ori.add_argument("--reciprocal-radius", type=_finite_positive, default=1.2,
                     help="largest spot radius simulated, 1/Å: the detector must reach it "
                          "from the centre (an error otherwise)")
    ori.add_argument("--voltage", type=_finite_positive, default=None,
                     help="accelerating voltage, kV (default: the beam energy the file records, "
                          "else 200)")
    ori.add_argument("--npt", type=_positive_int, default=64, help="radial bins of the polar patterns")
    ori.add_argument("--n-best", type=_positive_int, default=1,
                     help="matches kept per pattern, best first (2 or more for --reliability)")
    ori.add_argument("--ipf", help="also write an IPF-z orientation map to this PNG (or .pdf, "
                     ".svg, ...; checked before the run: directory exists, not there unless "
                     "--overwrite)")
    ori.add_argument("--reliability", help="also write a reliability map to this PNG (needs "
                     "--n-best >= 2; checked as --ipf): near 0 where two different orientations "
                     "fit as well")
    ori.add_argument("--refine", action="store_true",
                     help="refine the best matches below the library's grid (same pass over the data); "
                     "with --n-best >= 2, close calls among the first 3 matches (near-twins, "
                     "similar phases) are refined too and the better fit kept")
    st = sub.add_parser("strain", help="strain maps from Bragg disks (nanobeam diffraction)")
    _common(st)
    probe = st.add_mutually_exclusive_group(required=True)
    probe.add_argument("--radius", type=_finite_positive, help="disk radius in pixels (disk template)")
    probe.add_argument("--template", help=".npy file: a measured vacuum probe image")
    ref = st.add_mutually_exclusive_group()
    ref.add_argument("--reference", type=int, nargs=4, metavar=("ROW0", "ROW1", "COL0", "COL1"),
                     help="unstrained scan region rows ROW0:ROW1, columns COL0:COL1, with "
                          "0 <= ROW0 < ROW1 and 0 <= COL0 < COL1 inside the scan (default: the "
                          "median lattice of the whole scan)")
    ref.add_argument("--reference-vectors", type=_finite, nargs=4,
                     metavar=("G1X", "G1Y", "G2X", "G2Y"),
                     help="reference lattice vectors in detector pixels")
    st.add_argument("--basis", type=_finite, nargs=4, metavar=("G1X", "G1Y", "G2X", "G2Y"),
                    help="lattice vectors (pixels) to index the disks, non-zero and not "
                         "parallel (default: found)")
    st.add_argument("--min-disks", type=int, default=6,
                    help="positions with fewer indexed disks get NaN strain (at least 3: a "
                         "lattice fit needs 3 disks not on one row)")
    st.add_argument("--relative-threshold", type=_fraction, default=0.01,
                    help="weakest disk, as a fraction of each pattern's strongest (of at most 10x "
                         "its second strongest: a bright direct beam does not hide the disks)")
    st.add_argument("--max-disks", type=_positive_int, default=128, help="disks kept per pattern")
    st.add_argument("--png", help="also write the four strain maps to this PNG (or .pdf, .svg, "
                    "...; checked before the run: directory exists, not there unless --overwrite)")
    st.add_argument("--rings", metavar="FILE",
                    help="a ring pattern of a polycrystalline standard on the same detector (.npy "
                         "or any file diffgpu reads): calibrates scale and ellipticity first")
    rings = st.add_mutually_exclusive_group()
    rings.add_argument("--d-spacings", type=_finite_positive, nargs="+", metavar="D",
                       help="the standard's ring spacings in Å (only with --rings)")
    rings.add_argument("--ring-phase", help="the standard as 'Si' or a CIF file (only with --rings)")
    return parser


def cmd_info(args):
    if args.file:
        from .fileinfo import describe

        if os.path.exists(args.file):
            _check_not_a_plain_directory(args.file)
            if args.navigation_shape:
                _check_navigation_shape_applies(args.file)
        try:
            rows = describe(args.file, navigation_shape=args.navigation_shape)
            rows += _calibration_rows(args.file, args.navigation_shape)
        except (OSError, ValueError) as err:
            raise InputError(_cli_words(str(err))) from err
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {_cli_words(value)}")
        return EXIT_OK
    import dask
    import hyperspy
    import importlib.util
    import numpy

    import diffgpu

    print(f"diffgpu {diffgpu.__version__}")
    print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, dask {dask.__version__}, "
          f"hyperspy {hyperspy.__version__}")
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    gpus = diffgpu.devices()
    if gpus:
        for d in gpus:
            print(d)
    else:
        print("CUDA devices: none;", diffgpu.device._probe()[2])
    have = importlib.util.find_spec("dask_cuda") is not None
    print(f"dask-cuda: {'available' if have else 'not installed (pip install diffgpu[cuda-cluster])'}")
    return EXIT_OK


def _calibration_rows(path, navigation_shape):
    """What a batch run takes from the file's metadata: the scan step, the detector's scale
    and centre, the beam energy and camera length, or that the file does not record them
    (and which option gives them)."""
    import diffgpu

    nav = {"navigation_shape": tuple(navigation_shape)} if navigation_shape else {}
    s = diffgpu.load(path, lazy=True, **nav)
    if not isinstance(s, diffgpu.DiffractionPatterns):
        return []
    cal = s.calibration
    nav = s.axes_manager.navigation_axes
    rows = []
    if any(str(ax.units) not in ("", "<undefined>") for ax in nav):
        rows.append(("scan step", ", ".join(f"{ax.scale:g} {ax.units}" for ax in nav)
                     + " (x, y)" * (len(nav) == 2)))
    else:
        rows.append(("scan step", "not recorded (the scan's axes are in positions)"))
    if cal.units in (None, "", "px"):
        rows.append(("detector scale", "not recorded (pixels): give --scale and --units"))
    else:
        rows.append(("detector scale", f"{cal.scale[0]:g} x {cal.scale[1]:g} {cal.units} "
                                       "per pixel (x, y)"))
    cx, cy = (c + 0.0 for c in cal.center)  # (-0.0 printed as 0)
    rows.append(("beam centre", f"({cx:g}, {cy:g}) pixels (x, y); "
                                "--center overrides it"))
    energy = cal.beam_energy
    rows.append(("beam energy", f"{energy:g} keV" if energy else
                 "not recorded (orientation takes 200 kV unless --voltage)"))
    length = s.metadata.get_item("Acquisition_instrument.TEM.camera_length")
    rows.append(("camera length", f"{length:g} mm" if length else "not recorded"))
    return rows


def cmd_demo(args):
    from .demo import main_job

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"-o '{args.output}' is a file, not a directory (the demo writes its "
                         "figures into a directory, made if needed)")
    try:
        main_job(args.output, tuple(args.nav), tuple(args.sig), args.device)
    except OSError as err:  # a directory that cannot be made or written
        raise InputError(f"-o '{args.output}': {err.strerror or err}") from err
    return EXIT_OK


def _with_chunks(args, s, nav):
    """``s`` in chunks of about ``--chunks`` frames. diffgpu's own readers are asked for them
    (the frames are then still read where the file stores them; a rechunk afterwards would
    make a new graph, decoded chunk by chunk); other files are rechunked."""
    import numpy as np

    import diffgpu
    from diffgpu.chunking import chunks_of_frames
    from diffgpu.io import _reader_for

    reader = _reader_for(args.input)
    if reader is not None and not isinstance(reader, str):  # one of diffgpu's readers
        return diffgpu.load(args.input, lazy=True, chunks=args.chunks, **nav)
    frame_bytes = int(np.prod(s.data.shape[-2:])) * s.data.dtype.itemsize
    s.data = s.data.rechunk(chunks_of_frames(s.data.shape[:-2], frame_bytes, args.chunks)
                            + s.data.chunks[-2:])
    return s


# a reader's advice: "pass navigation_shape=(12,) to read ...", "navigation_shape=(11,) reads ..."
_NAV_ARG = re.compile(r"navigation_shape=(?:\((\d+(?:, ?\d+)*),?\))?(?= to read| reads|\)|$)")


def _cli_words(message):
    """A reader's message in the command line's words: its advice to pass
    ``navigation_shape=(11,)`` is the option ``--navigation-shape 11`` here."""
    return _NAV_ARG.sub(lambda m: "--navigation-shape" + (
        " " + " ".join(n.strip() for n in m.group(1).split(",")) if m.group(1) else ""), message)


def _load(args):
    import diffgpu

    nav = {} if not args.navigation_shape else {"navigation_shape": tuple(args.navigation_shape)}
    if os.path.exists(args.input):
        _check_not_a_plain_directory(args.input)
        if nav:
            _check_navigation_shape_applies(args.input)
    try:
        s = diffgpu.load(args.input, lazy=True, **nav)
        if isinstance(s, diffgpu.DiffractionPatterns) and args.chunks:
            s = _with_chunks(args, s, nav)
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    except (OSError, ValueError) as err:
        raise InputError(_cli_words(str(err))) from err
    if isinstance(s, list):
        raise InputError(f"'{args.input}' holds {len(s)} signals; diffgpu batch runs take one")
    if not isinstance(s, diffgpu.DiffractionPatterns):
        raise InputError(f"'{args.input}' holds {type(s).__name__}, not diffraction patterns")
    if args.scale is not None:
        s.calibration.scale = args.scale
    if args.units:
        s.calibration.units = args.units
    if args.center is not None:
        _check_center(args.center, s.calibration.detector_shape)
        s.calibration.center = tuple(args.center)
    if args.mask:
        import numpy as np

        mask = _load_npy(args.mask, "mask")
        own = s.calibration.mask  # the file's (gaps between chips, bad pixels): kept
        try:
            # (the calibration's check: bool, or numbers that are all 0 or 1)
            s.calibration.mask = mask
        except ValueError as err:
            raise InputError(f"mask '{args.mask}': {err}") from err
        if own is not None:
            s.calibration.mask = s.calibration.mask | np.asarray(own, dtype=bool)
    # the scheduler first: to_device() checks the GPUs where the transfer steps will run
    # (a remote cluster's workers, not this login node), and "auto" asks them too
    client = _client(args)
    if args.device == "gpu" or (args.device == "auto" and _gpus_where_computed(client)):
        s.to_device()
    return s


def _client(args):
    """The dask client of --scheduler (None for the threaded scheduler), made once per run
    and closed by :func:`main` when the command ends, however it ends."""
    if not hasattr(args, "_client"):
        args._client = _scheduler(args)
    return args._client


def _gpus_where_computed(client):
    """Whether the work would run on GPUs: here (the threaded scheduler), or on every
    worker of ``client``."""
    from .device import _cluster_gpus, gpu_available

    found = None if client is None else _cluster_gpus(client)
    if found is None:  # the threaded scheduler, or workers that cannot be asked: this host
        return gpu_available()
    with_gpu, without = found
    return bool(with_gpu) and not without and gpu_available()


def _load_npy(path, what):
    """The array of a ``.npy`` file given as ``what`` (``--mask``, ``--template``), or an
    InputError saying what is wrong: numpy calls a text file "pickled (object) data"."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise InputError(f"{what} '{path}': {err.strerror or err}") from err
    if magic != b"\x93NUMPY":
        raise InputError(f"{what} '{path}' is not a .npy file (no NumPy .npy header): save the "
                         "array with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{what} '{path}': {err}") from err


def _check_not_a_plain_directory(path):
    """The one directory diffgpu reads is a .zspy (zarr) store; say so before a reader
    fails on another one with a message about file names."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, marker))
                                       for marker in (".zgroup", ".zarray", "zarr.json")):
        raise InputError(f"'{path}' is a directory but not a .zspy store (no .zgroup or "
                         "zarr.json in it): give a data file, or a .zspy directory saved by "
                         "HyperSpy or diffgpu")


def _check_navigation_shape_applies(path):
    """--navigation-shape is for readers that take it: .mib, EMPAD, HDF5 and DM frame stacks
    (the DM reader says itself when a file holds no stack)."""
    from .io import _reader_for

    reader = _reader_for(path)
    name = getattr(getattr(reader, "__loader__", None), "name", "")
    if not name.endswith((".mib", ".empad", ".hdf5", ".dm")):
        raise InputError(f"--navigation-shape applies only to files that do not record the scan "
                         f"shape (.mib without .hdr, EMPAD .raw, HDF5 and DigitalMicrograph frame "
                         f"stacks); '{path}' records it: leave the option out")


def _check_center(center, detector_shape):
    """A centre outside the detector: a warning; more than one detector size outside: an error
    (almost certainly a mistake: x and y are detector pixels)."""
    ny, nx = detector_shape
    cx, cy = center
    far = not (-nx <= cx <= 2 * nx - 1 and -ny <= cy <= 2 * ny - 1)
    where = (f"--center {cx:g} {cy:g} lies outside the {nx} x {ny} detector (x 0..{nx - 1}, "
             f"y 0..{ny - 1} pixels)")
    if far:
        raise InputError(f"{where}, by more than the detector's size: give the direct beam's "
                         "pixel (x, y)")
    if not (-0.5 <= cx <= nx - 0.5 and -0.5 <= cy <= ny - 0.5):
        print(f"diffgpu: warning: {where}", file=sys.stderr)


def _figure_paths(args):
    """``(option, path)`` of the auxiliary figures this run will write."""
    return [(f"--{opt}", getattr(args, opt)) for opt in ("png", "ipf", "reliability")
            if getattr(args, opt, None)]


def _check_outputs(args):
    """Every output path, before anything is read or computed: OUTPUT a ``.zspy`` path and
    the figures of a format matplotlib writes, each in an existing directory, none there
    already unless --overwrite, no two the same."""
    seen = {}
    inputs = _input_paths(args)
    for option, path in [("-o", args.output)] + _figure_paths(args):
        full = os.path.abspath(path)
        read = inputs.get(os.path.realpath(full))
        if read is not None:  # --overwrite would replace the data by the result
            raise InputError(f"{option} '{path}' is the {read} file: write the result to "
                             "another path")
        folder, ext = os.path.dirname(full), os.path.splitext(full)[1].lower()
        if option == "-o":
            if ext != ".zspy":
                raise InputError(f"output must be a .zspy path; got '{path}'")
            if not full.endswith(".zspy"):  # HyperSpy reads a store back only by that name
                raise InputError(f"output '{path}': write the extension .zspy in lower case "
                                 "(HyperSpy reads a store back only under a name ending in "
                                 "'.zspy')")
        else:
            formats = _figure_formats()
            if ext[1:] not in formats:
                raise InputError(f"{option} '{path}': the file name must end with a figure format "
                                 f"({', '.join('.' + f for f in sorted(formats))}); got "
                                 f"{ext or 'no extension'}")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(f"{option} '{path}': '{os.path.dirname(path)}' is a file, not a "
                             "directory")
        if not os.path.isdir(folder):
            raise InputError(f"{option} '{path}': the directory '{os.path.dirname(path) or '.'}' "
                             "does not exist (diffgpu does not create directories: create it "
                             "first)")
        if full in seen:
            raise InputError(f"{option} and {seen[full]} are the same file '{path}'")
        seen[full] = option
        if os.path.isdir(full) and option != "-o":
            raise InputError(f"{option} '{path}' is a directory")
        if os.path.exists(full) and not args.overwrite:
            raise InputError(f"'{path}' exists (use --overwrite to replace it)")
        if option == "-o":
            _check_replaceable(full)


def _input_paths(args):
    """The files this run reads (real paths) -> what each is (``"input"``, ``"--mask"``,
    ...): none of them may be an output."""
    given = [("input", getattr(args, "input", None))]
    given += [(f"--{opt}", getattr(args, opt, None)) for opt in ("mask", "template", "rings")]
    return {os.path.realpath(path): what for what, path in reversed(given) if path}


def _check_replaceable(output):
    """--overwrite replaces a .zspy store or a file, never another directory (a folder named
    like the output, holding the user's own files)."""
    from .io import _is_zarr_store

    if os.path.isdir(output) and not _is_zarr_store(output):
        raise InputError(f"'{output}' is a directory that is not a .zspy store: not replaced "
                         "(move it away or choose another output)")


def _figure_formats():
    """The file formats matplotlib's savefig writes here (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def _scheduler(args):
    """A dask client for --scheduler, or None for the local threaded scheduler."""
    if args.scheduler == "threads":
        return None
    import diffgpu

    if args.scheduler == "local-cluster":
        return diffgpu.start_cluster(device="gpu" if args.device == "gpu" else
                                     ("auto" if args.device == "auto" else "cpu"))
    from distributed import Client

    try:
        return Client(args.scheduler)
    except OSError as err:  # no scheduler there (distributed waits ~30 s, then says so)
        raise InputError(f"--scheduler {args.scheduler}: could not connect ({err})") from None


def _partial_name(path):
    """A temporary name next to ``path``, with the same extension, naming this host and
    process (so that a later run can tell a partial output left by a killed run from one
    that a run still going is writing). Stale ones of ``path`` are removed first."""
    path = os.path.abspath(path)
    _remove_stale_partials(path)
    ext = os.path.splitext(path)[1]
    name = (f".{os.path.basename(path)}.{socket.gethostname()}-{os.getpid()}-"
            f"{uuid.uuid4().hex[:8]}.partial{ext}")
    return os.path.join(os.path.dirname(path), name)


def _remove_stale_partials(path):
    """Remove the partial outputs of ``path`` that runs killed on this host left (a run
    stopped by SIGKILL or a power cut cannot clean up; its partial output, as large as the
    result, would stay hidden next to the output). Partial outputs of processes still alive,
    or of other hosts (a shared disk), are left alone."""
    folder, base = os.path.split(path)
    ext = os.path.splitext(path)[1]
    prefix, suffix = f".{base}.", f".partial{ext}"
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        owner = name[len(prefix):-len(suffix)].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != socket.gethostname() or not owner[1].isdigit():
            continue
        if _alive(int(owner[1])):
            continue
        stale = os.path.join(folder, name)
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
        print(f"diffgpu: removed '{stale}', the partial output of an interrupted run "
              f"(process {owner[1]})", file=sys.stderr)


def _alive(pid):
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Figures:
    """The auxiliary files of a run, written under temporary names (:meth:`path`) and moved
    into place with the main output only when everything is complete."""

    def __init__(self):
        self.staged = []  # (temporary, final)
        self.messages = []

    def path(self, final):
        tmp = _partial_name(final)
        self.staged.append((tmp, os.path.abspath(final)))
        return tmp

    def save(self, fig, final, option):
        """``fig.savefig`` to a temporary name for ``final``; an OSError says which option."""
        tmp = self.path(final)
        try:
            fig.savefig(tmp, dpi=100, format=os.path.splitext(final)[1][1:].lower())
        except OSError as err:
            raise InputError(f"could not write {option} '{final}': {err}") from err

    def discard(self):
        for tmp, _ in self.staged:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def _quiet(progress):
    """Without --progress bars: RosettaSciIO saves arrays found in the metadata (e.g. a lazy
    input's, loaded as dask arrays) with dask's progress bar whatever ``show_progressbar``
    says; that bar writes to ``sys.stdout`` as it is made, so it goes to /dev/null here."""
    if progress:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _write_atomically(result, output, overwrite, progress, figures=None):
    """Save to a temporary name next to ``output``, then rename: never a half-written output.

    ``figures(path, staged)``, if given, writes the auxiliary files from the saved result at
    ``path`` through ``staged`` (a :class:`_Figures`); the output and the figures are moved
    into place together only when all are written, and nothing is left if any fails."""
    output = os.path.abspath(output)
    if not output.endswith(".zspy"):
        raise InputError(f"output must be a .zspy path; got '{output}'")
    if os.path.exists(output) and not overwrite:
        raise InputError(f"'{output}' exists (use --overwrite to replace it)")
    if not os.path.isdir(os.path.dirname(output)):
        raise InputError(f"the output directory '{os.path.dirname(output)}' does not exist "
                         "(diffgpu does not create directories: create it first)")
    tmp = _partial_name(output)
    import dask

    from .device import host_threads
    from .signals import to_host

    staged = _Figures()
    # our own pool for dask's threaded scheduler, so that after an interruption the tasks
    # already running can be waited for before the partial output is removed
    pool = ThreadPoolExecutor(host_threads())
    committed = []
    try:
        # diffgpu's to_host, which takes any signal (HyperSpy's refuses lazy data)
        to_host(result)
        with dask.config.set(pool=pool), _quiet(progress), warnings.catch_warnings():
            # RosettaSciIO's .zspy writer uses a zarr store zarr 2.18 deprecates: a
            # FutureWarning on every batch run that says nothing about the user's data
            warnings.filterwarnings("ignore", message="The NestedDirectoryStore is deprecated",
                                    category=FutureWarning)
            result.save(tmp, show_progressbar=progress, overwrite=True)
        if figures is not None:
            figures(tmp, staged)
        if os.path.exists(output):
            # it may have appeared while this run computed (another run with the same -o)
            if not overwrite:
                raise InputError(f"'{output}' appeared while this run was writing it (another "
                                 "run?): not replaced; the result was not kept (use --overwrite "
                                 "to replace it)")
            _check_replaceable(output)
            shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
        os.replace(tmp, output)
        committed.append(output)
        for part, final in staged.staged:
            os.replace(part, final)
            committed.append(final)
    except BaseException:
        for path in committed:  # this run's files only: no output that looks complete
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if os.path.exists(tmp):
            _remove_partial(tmp)
        staged.discard()
    return staged.messages


def _remove_partial(path, settle=1.0, timeout=30.0):
    """Remove a partial output. Tasks still running elsewhere (a cluster's workers) may write
    a chunk into it after a first removal: remove it again until it has stayed gone for
    ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        shutil.rmtree(path, ignore_errors=True)
        quiet_until = time.monotonic() + settle
        while time.monotonic() < quiet_until and not os.path.exists(path):
            time.sleep(0.05)
        if not os.path.exists(path) or time.monotonic() > deadline:
            return


def cmd_integrate(args):
    s = _load(args)
    kw = dict(radial_range=args.radial_range, mean=args.mean)
    if args.one_d:
        result = s.get_azimuthal_integral1d(npt=args.npt, **kw)
    else:
        result = s.get_azimuthal_integral2d(npt=args.npt, npt_azim=args.npt_azim, **kw)
    return _run(args, result, f"integrated {s.axes_manager.navigation_size} patterns")


def cmd_virtual(args):
    import hyperspy.api as hs

    s = _load(args)
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=r) for r in args.disc]
    rois += [hs.roi.CircleROI(cx=0, cy=0, r=hi, r_inner=lo) for lo, hi in args.annulus]
    if not rois:
        raise InputError("no detector: give --disc R and/or --annulus R_IN R_OUT")
    result = s.get_virtual_image(rois)
    return _run(args, result, f"{len(rois)} virtual images of {s.axes_manager.navigation_size} patterns")


def _phase(spec):
    from .templates import TemplateLibrary

    if spec.lower() in ("si", "silicon"):
        return TemplateLibrary.silicon()
    if not os.path.exists(spec):
        raise InputError(f"phase '{spec}': no such CIF file (or use the built-in 'Si')")
    from orix.crystal_map import Phase

    try:
        return Phase.from_cif(spec)
    except Exception as err:
        raise InputError(f"phase '{spec}': could not read the CIF file: {err}") from err


def cmd_orientation(args):
    from .templates import TemplateLibrary

    s = _load(args)
    phases = [_phase(p) for p in args.phase]
    _check_reach(s, args.reciprocal_radius)
    # the file's beam energy sets the Ewald sphere the templates are cut from (a fixed 200 kV
    # made other energies' templates wrong); --voltage overrides it
    voltage = args.voltage or s.calibration.beam_energy or 200.0
    library = TemplateLibrary.from_phase(phases if len(phases) > 1 else phases[0],
                                         resolution=args.resolution,
                                         accelerating_voltage=voltage,
                                         reciprocal_radius=args.reciprocal_radius)
    units = s.calibration.units
    per_unit = {"1/nm": 10.0}.get(units, 1.0)  # radial range in the signal's own units
    polar = s.get_azimuthal_integral2d(npt=args.npt, npt_azim=360, mean=True,
                                       radial_range=(0, args.reciprocal_radius * per_unit * 1.05))
    matches = polar.get_orientation(library, n_best=args.n_best)
    result = (lambda: matches.refine(polar, library)) if args.refine else matches
    return _run(args, result, f"{s.axes_manager.navigation_size} patterns matched against "
                              f"{len(library)} templates" + (" and refined" if args.refine else ""),
                figures=_orientation_figures(args) if args.ipf or args.reliability else None)


def _check_reach(s, reciprocal_radius):
    """The templates' radius must be inside the detector: as far as the farthest detector
    corner from the centre (the API's check on the polar data, before anything is computed;
    the command integrates up to 1.05 x the radius, beyond the detector if asked)."""
    import numpy as np

    per_unit = {"1/nm": 10.0}.get(s.calibration.units)
    if s.calibration.units not in ("1/Å", "1/A", "1/nm"):
        return  # the API says what is wrong with the units
    ny, nx = s.calibration.detector_shape
    (cx, cy), (sx, sy) = s.calibration.center, s.calibration.scale
    corners = np.array([(x, y) for x in (-0.5, nx - 0.5) for y in (-0.5, ny - 0.5)])
    reach = float(np.hypot((corners[:, 0] - cx) * sx, (corners[:, 1] - cy) * sy).max())
    reach /= per_unit or 1.0
    if reciprocal_radius > reach * (1 + 1e-6):
        raise InputError(f"--reciprocal-radius {reciprocal_radius:g} 1/Å: the data reach only "
                         f"{reach:.3g} 1/Å from the centre (detector {nx} x {ny} pixels of "
                         f"{sx:g} {s.calibration.units}): give a --reciprocal-radius of at most "
                         f"{reach:.3g}, or check --scale and --center")


def _orientation_figures(args):
    """Writes the --ipf and --reliability maps of a saved orientation result."""
    def write(path, staged):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from . import load

        done = load(path, lazy=False)
        if args.ipf:
            ax = done.plot_ipf_map()
            try:
                staged.save(ax.figure, args.ipf, "--ipf")
            finally:
                plt.close(ax.figure)
            staged.messages.append(f"IPF map -> {args.ipf}")
        if args.reliability:
            rel = done.get_reliability()
            fig, ax = plt.subplots()
            try:
                if rel.data.ndim == 2:
                    fig.colorbar(ax.imshow(rel.data, cmap="gray", vmin=0), ax=ax)
                else:
                    ax.plot(rel.data)
                    ax.set_xlabel("scan position")
                if args.refine:  # 0: another orientation predicts the same pattern
                    ax.set_title("reliability (0: ambiguous, 1: resolved)")
                    what = f"ambiguous: {100 * (rel.data == 0).mean():.0f}%"
                else:
                    ax.set_title("reliability: 1 - c(other orientation) / c(best)")
                    what = f"below 0.01: {100 * (rel.data < 0.01).mean():.0f}%"
                staged.save(fig, args.reliability, "--reliability")
            finally:
                plt.close(fig)
            staged.messages.append(f"reliability map -> {args.reliability} ({what})")
    return write


def _run(args, result, what, figures=None):
    """Write ``result`` (a signal, or a callable making one under the chosen scheduler) and
    the auxiliary files of ``figures`` (see :func:`_write_atomically`)."""
    _client(args)  # (closed by main)
    t0 = time.perf_counter()
    if callable(result):
        result = result()
    messages = _write_atomically(result, args.output, args.overwrite, not args.no_progress,
                                 figures)
    print(f"{what} in {time.perf_counter() - t0:.1f} s -> {args.output}")
    for message in messages:
        print(message)
    return EXIT_OK


def _close_client(args):
    """Close the run's dask client (and the LocalCluster it started), if one was made."""
    client = getattr(args, "_client", None)
    if client is not None:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and args.scheduler == "local-cluster":
            cluster.close()


def _calibrate_from_rings(s, args):
    """Scale, units and affine (ellipticity) from a ring standard; the centre stays the scan's."""
    import numpy as np

    from . import load
    from .ring_calibration import calibrate_from_rings

    if not (args.d_spacings or args.ring_phase):
        raise InputError("--rings needs the standard: --d-spacings D ... (Å) or --ring-phase")
    try:
        img = np.load(args.rings) if args.rings.endswith(".npy") else load(args.rings, lazy=False)
    except (OSError, ValueError) as err:
        raise InputError(f"rings '{args.rings}': {err}") from err
    phase = _phase(args.ring_phase) if args.ring_phase else None
    result = calibrate_from_rings(img, d_spacings=args.d_spacings, phase=phase)
    center = s.calibration.center
    result.apply(s)
    s.calibration.center = center
    print(f"ring standard: scale {result.scale:.5g} 1/Å per pixel, ellipticity "
          f"{100 * result.ellipticity:.2f} %, rings {', '.join(f'{d:.3f}' for d in result.rings)} Å")


def cmd_strain(args):
    import numpy as np

    s = _load(args)
    if args.rings:
        _calibrate_from_rings(s, args)
    template = None
    if args.template:
        template = _load_npy(args.template, "template")
    vectors = s.find_bragg_disks(radius=args.radius, template=template,
                                 relative_threshold=args.relative_threshold,
                                 max_disks=args.max_disks)
    reference = None
    if args.reference:
        r0, r1, c0, c1 = args.reference
        reference = (slice(r0, r1), slice(c0, c1))
    elif args.reference_vectors:
        reference = np.reshape(args.reference_vectors, (2, 2))
    basis = None if args.basis is None else np.reshape(args.basis, (2, 2))

    def strain_map():
        result = vectors.get_strain_map(reference=reference, basis=basis, min_disks=args.min_disks)
        # computed before it is written (4 numbers a position): the failed positions are then
        # counted into metadata.Strain.n_failed, which a lazy map saved as it is lacked
        result.compute(show_progressbar=not args.no_progress)
        return result

    n = s.axes_manager.navigation_size

    def figures(path, staged):
        from . import load

        done = load(path, lazy=False)
        failed = done.n_failed
        if failed:
            staged.messages.append(f"{failed} of {n} positions have NaN strain (fewer than "
                                   f"--min-disks {args.min_disks} indexed disks, or no lattice "
                                   "fits their disks)")
        if args.png and done.axes_manager.navigation_dimension != 2:
            staged.messages.append("--png: the strain maps need a 2D scan; no figure written")
        elif args.png:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = done.plot()
            try:
                staged.save(fig, args.png, "--png")
            finally:
                plt.close(fig)
            staged.messages.append(f"strain maps -> {args.png}")

    return _run(args, strain_map, f"strain of {n} patterns", figures=figures)


COMMANDS = {"info": cmd_info, "demo": cmd_demo, "integrate": cmd_integrate,
            "virtual": cmd_virtual, "orientation": cmd_orientation, "strain": cmd_strain}


def _check_strain_args(parser, args):
    """Argument errors of ``strain`` (exit code 2) that argparse cannot see."""
    from .strain import _check_fit_parameters, _check_vectors

    if (args.d_spacings or args.ring_phase) and not args.rings:
        parser.error(f"{'--d-spacings' if args.d_spacings else '--ring-phase'} describes the ring "
                     "standard of --rings: give --rings FILE too (or leave it out)")
    try:
        _check_fit_parameters(args.min_disks, None, 3)
    except ValueError:
        parser.error(f"--min-disks must be at least 3 (a lattice fit of the origin, g1 and g2 "
                     f"needs 3 disks not on one row); got {args.min_disks}")
    if args.reference:
        r0, r1, c0, c1 = args.reference
        if not (0 <= r0 < r1 and 0 <= c0 < c1):
            parser.error(f"--reference {r0} {r1} {c0} {c1}: the region is rows ROW0:ROW1 and "
                         "columns COL0:COL1 with 0 <= ROW0 < ROW1 and 0 <= COL0 < COL1")
    for option, values in (("--basis", args.basis), ("--reference-vectors", args.reference_vectors)):
        if values is not None:
            try:
                _check_vectors(_pairs(values), option.lstrip("-"))
            except ValueError as err:
                parser.error(f"{option}: {err}")


def _check_virtual_args(parser, args):
    """Argument errors of ``virtual`` (exit code 2) that argparse cannot see: HyperSpy's
    CircleROI would quietly make an annulus with R_IN >= R_OUT a disc."""
    for r_in, r_out in args.annulus:
        given = f"--annulus {r_in:g} {r_out:g}"
        if not (math.isfinite(r_in) and math.isfinite(r_out)):
            parser.error(f"{given}: R_IN and R_OUT must be finite numbers")
        if r_in < 0:
            parser.error(f"{given}: R_IN must be 0 or more (0 for a disc)")
        if r_in >= r_out:
            parser.error(f"{given}: R_IN must be smaller than R_OUT (an annulus is "
                         "R_IN < distance <= R_OUT)")


def _check_scheduler(parser, value):
    """--scheduler must be 'threads', 'local-cluster' or a scheduler's address (exit code 2):
    a misspelt word was taken for an address and failed later as bad input."""
    if value in ("threads", "local-cluster"):
        return
    try:
        from distributed.comm.addressing import parse_address, parse_host_port
    except ImportError:  # no dask.distributed: connecting says so
        return
    try:
        scheme, location = parse_address(value)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as err:
        parser.error(f"--scheduler {value!r}: give 'threads', 'local-cluster' or a running "
                     f"scheduler's address such as tcp://host:8786 ({err})")


def _pairs(values):
    """Four numbers as ``((g1x, g1y), (g2x, g2y))``."""
    return [list(values[:2]), list(values[2:])]


def _terminate(signum, frame):  # turn SIGTERM into an exception so clean-up runs
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    """Entry point of the ``diffgpu`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "orientation" and args.reliability and args.n_best < 2:
        parser.error("--reliability compares the best match with the next ones: give --n-best 2 "
                     "or more (e.g. 5)")
    if args.command == "info" and args.navigation_shape and not args.file:
        parser.error("info: --navigation-shape describes a FILE's scan: give the FILE too")
    if args.command == "strain":
        _check_strain_args(parser, args)
    if args.command == "virtual":
        _check_virtual_args(parser, args)
    if getattr(args, "scheduler", None) is not None:
        _check_scheduler(parser, args.scheduler)
    from .device import DeviceUnavailableError

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command in ("integrate", "virtual", "orientation", "strain"):
            _check_outputs(args)  # before anything is read or computed
        return COMMANDS[args.command](args)
    except InputError as err:
        print(f"diffgpu: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except DeviceUnavailableError as err:
        print(f"diffgpu: error: {err}", file=sys.stderr)
        return EXIT_DEVICE
    except KeyboardInterrupt:
        print("diffgpu: interrupted; no output was written", file=sys.stderr)
        return 130
    except ValueError as err:  # bad parameters found by the operations themselves
        print(f"diffgpu: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:  # `diffgpu info FILE | head`: the reader stopped, not an error
        # (stdout is pointed at devnull so that Python's flush at exit does not fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        _close_client(args)
        signal.signal(signal.SIGTERM, previous)


def main_exit():
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    main_exit()
