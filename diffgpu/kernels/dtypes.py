"""The input dtypes every kernel accepts, and their conversion a block at a time.

Detectors write many dtypes: Merlin ``.mib`` stores big-endian ``>u1``/``>u2``/``>u4``, EMPAD
little-endian float32, Arina/EIGER uint8-uint32, processed data float16 to float64, masks bool.
Every diffgpu operation takes all of them, in either byte order:

* NumPy and CuPy code reads any real dtype directly (``astype(float32)`` swaps bytes as it
  converts, in the same pass);
* numba kernels cannot read non-native byte order ("non-precise type pyobject") nor float16,
  so :func:`kernel_ready` converts what they read one block of frames at a time (a few MB,
  in cache), never the whole dataset;
* a GPU has no non-native byte order at all: :func:`kernel_ready` is applied per chunk before
  the transfer (see :func:`diffgpu.device.to_device_array`).

Dtypes for which a diffraction intensity has no meaning (complex, strings, objects,
dates, records) raise :class:`UnsupportedDtypeError`, which names the dtype.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

__all__ = ["UnsupportedDtypeError", "check_dtype", "kernel_ready", "needs_conversion",
           "native_byte_order", "as_float32", "CONVERT_BLOCK"]

# Frames converted at a time for a numba kernel: 64 x 256 x 256 x 4 bytes = 16 MiB at most
# (a multiple of the integration kernel's 8-frame tile).
CONVERT_BLOCK = 64


class UnsupportedDtypeError(TypeError):
    """Data of a dtype diffgpu cannot process as intensities (complex, text, objects, ...).

    The message names the dtype and what to do instead.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.dtypes import UnsupportedDtypeError, check_dtype
    >>> try:
    ...     check_dtype(np.complex64)
    ... except UnsupportedDtypeError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    diffgpu cannot process frames of dtype complex64 ('<c8'): ... take .real or abs() first
    """


def check_dtype(dtype, what="frames"):
    """Raise :class:`UnsupportedDtypeError` unless ``dtype`` is bool, integer or real float.

    Parameters
    ----------
    dtype : numpy dtype or anything ``numpy.dtype`` takes
    what : str
        What the data are, for the message (``"frames"``, ``"polar patterns"``, ...).

    Returns
    -------
    numpy.dtype
        ``dtype`` itself (either byte order).

    Examples
    --------
    >>> from diffgpu.kernels.dtypes import check_dtype
    >>> check_dtype(">u2")
    dtype('>u2')
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "biuf" and dtype.fields is None and not dtype.shape:
        return dtype
    hint = {"c": "complex values have no single intensity: take .real or abs() first",
            "O": "an object array: convert it to a numeric dtype first",
            "U": "text: convert it to a numeric dtype first",
            "S": "bytes: convert it to a numeric dtype first",
            "M": "dates: not intensities", "m": "time spans: not intensities",
            "V": "records or raw bytes: pick a numeric field or view the bytes as a numeric dtype"}
    raise UnsupportedDtypeError(
        f"diffgpu cannot process {what} of dtype {dtype} ({dtype.str!r}): "
        f"{hint.get(dtype.kind, 'not a real number type')}")


def _target(dtype):
    """The dtype a numba kernel reads in place of ``dtype`` (None: read it as it is)."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)  # same bytes: a view, not a copy
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)  # numba has no float16
    if not dtype.isnative:
        return dtype.newbyteorder("=")
    return None


def needs_conversion(dtype):
    """Whether a numba kernel needs ``dtype`` converted (non-native byte order, float16, bool).

    Examples
    --------
    >>> from diffgpu.kernels.dtypes import needs_conversion
    >>> needs_conversion(">u2"), needs_conversion("uint16"), needs_conversion("float16")
    (True, False, True)
    """
    return _target(np.dtype(dtype)) is not None


def kernel_ready(block):
    """``block`` in a dtype every kernel (numba, CuPy) reads: native byte order, no float16.

    Bool becomes a uint8 view (no copy); non-native byte order the same type in native
    order and float16 float32 (a copy of this block only). Other arrays come back as they
    are. Call it on a block of frames, never on a whole dataset.

    Parameters
    ----------
    block : numpy.ndarray

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.dtypes import kernel_ready
    >>> big = np.arange(3, dtype=">u2")
    >>> kernel_ready(big).dtype.str, kernel_ready(big).tolist()
    ('<u2', [0, 1, 2])
    """
    target = _target(block.dtype)
    if target is None:
        return block
    if block.dtype == np.bool_:
        return block.view(np.uint8)
    if target == np.float32:
        return as_float32(block)
    return block.astype(target)


def as_float32(block):
    """``block`` as float32 (NumPy or CuPy): ``astype``, except for float16 on the host.

    NumPy converts float16 in software, one value at a time: 0.2 G values/s here, a tenth of
    its rate from uint16, so float16 data ran 3-10x slower than any other dtype through
    every operation. Every float16 value is one of 65,536 bit patterns, so a table of their
    float32 values (exact: float32 holds every float16), looked up by numba, converts at
    2.6 G values/s; either byte order, any layout.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.dtypes import as_float32
    >>> half = np.array([[1.5, -2.0], [np.inf, 2048]], dtype=">f2")
    >>> as_float32(half).tolist()
    [[1.5, -2.0], [inf, 2048.0]]
    """
    if not (isinstance(block, np.ndarray) and block.dtype.kind == "f" and block.dtype.itemsize == 2):
        return block.astype(np.float32)
    bits = np.ascontiguousarray(block).view(block.dtype.str.replace("f", "u"))  # same order
    if not bits.dtype.isnative:
        bits = bits.astype(bits.dtype.newbyteorder("="))
    out = np.empty(block.shape, np.float32)
    _look_up(bits.reshape(-1), _half_table(), out.reshape(-1))
    return out


@functools.lru_cache(maxsize=1)
def _half_table():
    """float32 value of every float16 bit pattern (made once: 256 KiB)."""
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@numba.njit(nogil=True, cache=True)
def _look_up(bits, table, out):
    for i in range(bits.size):
        out[i] = table[bits[i]]


def native_byte_order(block):
    """``block`` in the machine's byte order (a copy of this block only if it is not).

    What a GPU needs before a transfer (CuPy has no non-native byte order) and what a
    user's own frame function is handed by ``map_frames``.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.dtypes import native_byte_order
    >>> native_byte_order(np.array([1, 256], dtype=">u2")).dtype.isnative
    True
    """
    if block.dtype.isnative:
        return block
    return block.astype(block.dtype.newbyteorder("="))
