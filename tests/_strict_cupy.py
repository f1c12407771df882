"""A strict CPU stand-in for CuPy, for tests: device arrays that obey CuPy's rules.

Used through the ``standin_gpu`` fixture of the root ``conftest.py`` (import it from there,
``from conftest import ...``, never as ``_strict_cupy``: a second import would make a second,
different array type). What it enforces, as CuPy does on a GPU:

* :class:`DeviceArray` wraps a NumPy array but is **not** a ``numpy.ndarray``; ``np.asarray``
  / ``__array__`` raise ``TypeError``, so SciPy and NumPy-only code given a device array fail;
  numba rejects it (it is an opaque Python object to numba);
* NumPy functions and ufuncs applied to device arrays dispatch (``__array_function__``,
  ``__array_ufunc__``) only where real CuPy has the function (:data:`NUMPY_NAMES`), return
  device arrays, and refuse host arrays mixed in (``TypeError``, as CuPy);
* the module-level namespaces (``cupy``, ``cupy.fft``, ``cupy.linalg``, ``cupy.cuda``,
  ``cupyx.scipy.ndimage``, ``cupyx.scipy.sparse``) hold only names real CuPy has (a test checks
  them against the installed package) and, where CuPy is installed, every call's keywords are
  bound against the real function's signature (the array methods' against ``cupy.ndarray``'s
  docstrings);
* ufuncs take CuPy's keywords only (``out``, ``dtype``, ``casting``: no ``where=``), have
  ``reduce``/``accumulate``/``reduceat``/``at`` only where CuPy does (:data:`UFUNC_METHODS`)
  and ``at`` only for the dtypes of CUDA's atomics (:data:`AT_DTYPES`);
* every host<->device crossing is counted in :data:`TRANSFERS`: explicit ones (``cupy.asarray``
  of host data, ``.get()``, ``cupy.asnumpy``, sparse matrices, host values written into or
  indexing device arrays, as CuPy moves host index arrays and lists itself) and scalar reads
  (``bool()``, ``float()``, ``int()``, ``.item()``, ``format()``).

It runs NumPy underneath, so it says nothing about speed, CUDA kernels or memory; it checks
that device code keeps to CuPy's API and moves data only where it says so.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import threading
import types

import numpy as np

# NumPy functions that real CuPy also has (top level), minus file I/O and printing: the only
# ones a device array dispatches. Checked against the installed CuPy by tests/test_cupy_rules.py.
NUMPY_NAMES = frozenset("""
abs absolute acos acosh add all allclose amax amin angle any append apply_along_axis arange
arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin argpartition argsort argwhere
around array array_equal array_equiv array_split asanyarray asarray ascontiguousarray
asfortranarray asin asinh astype atan atan2 atanh atleast_1d atleast_2d atleast_3d average
bartlett bincount bitwise_and bitwise_count bitwise_invert bitwise_left_shift bitwise_not
bitwise_or bitwise_right_shift bitwise_xor blackman broadcast_arrays broadcast_shapes
broadcast_to can_cast cbrt ceil choose clip column_stack common_type compress concat concatenate
conj conjugate convolve copy copysign copyto corrcoef correlate cos cosh count_nonzero cov cross
cumprod cumsum deg2rad degrees delete diag diag_indices diag_indices_from diagflat diagonal diff
digitize divide divmod dot dsplit dstack ediff1d einsum empty empty_like equal exp exp2
expand_dims expm1 extract eye fabs fill_diagonal fix flatnonzero flip fliplr flipud float_power
floor floor_divide fmax fmin fmod frexp full full_like gcd gradient greater greater_equal hamming
hanning heaviside histogram histogram2d histogramdd hsplit hstack hypot i0 identity imag indices
inner interp intersect1d invert isclose iscomplex iscomplexobj isfinite isfortran isin isinf
isnan isneginf isposinf isreal isrealobj isscalar ix_ kaiser kron lcm ldexp left_shift less
less_equal lexsort linspace log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not
logical_or logical_xor logspace matmul matrix_transpose max maximum may_share_memory mean median
meshgrid min minimum mod modf moveaxis multiply nan_to_num nanargmax nanargmin nancumprod
nancumsum nanmax nanmean nanmedian nanmin nanprod nanstd nansum nanvar ndim negative nextafter
nonzero not_equal ones ones_like outer packbits pad partition percentile permute_dims piecewise
place polyfit polyval positive pow power prod ptp put put_along_axis putmask quantile rad2deg
radians ravel ravel_multi_index real reciprocal remainder repeat require reshape resize
result_type right_shift rint roll rollaxis rot90 round searchsorted select setdiff1d setxor1d
shape shares_memory sign signbit sin sinc sinh size sort split sqrt square squeeze stack std
subtract sum swapaxes take take_along_axis tan tanh tensordot tile trace transpose trapezoid tri
tril tril_indices tril_indices_from triu triu_indices triu_indices_from true_divide trunc
union1d unique unravel_index unwrap vander var vdot vsplit vstack where zeros zeros_like
""".split())
FFT_NAMES = frozenset("""fft fft2 fftfreq fftn fftshift hfft ifft ifft2 ifftn ifftshift ihfft
irfft irfft2 irfftn rfft rfft2 rfftfreq rfftn""".split())
LINALG_NAMES = frozenset("""cholesky cond det eigh eigvalsh inv lstsq matrix_power matrix_rank
norm pinv qr slogdet solve svd tensorinv tensorsolve""".split())
# Types, dtypes and constants CuPy re-exports from NumPy.
NUMPY_VALUES = frozenset("""bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16
float32 float64 complex64 complex128 intp uintp dtype finfo iinfo newaxis nan inf pi e
euler_gamma integer floating complexfloating number generic signedinteger unsignedinteger
inexact""".split())
# The cupyx.scipy functions the stand-in provides (SciPy underneath, device arrays only).
NDIMAGE_NAMES = frozenset("""affine_transform binary_dilation binary_erosion center_of_mass
convolve correlate fourier_shift gaussian_filter gaussian_filter1d label map_coordinates
maximum_filter median_filter minimum_filter rotate shift sobel uniform_filter zoom""".split())
# Creation functions that take host data and move it: one counted transfer each.
_FROM_HOST = frozenset({"asarray", "array", "asanyarray"})
# ndarray methods and attributes the stand-in has, all on real cupy.ndarray (checked).
NDARRAY_NAMES = frozenset("""T all any argmax argmin argpartition argsort astype base choose clip
conj conjugate copy cumprod cumsum data device diagonal dot dtype fill flags flatten get imag
item itemsize max mean min nbytes ndim nonzero partition prod ptp put ravel real repeat reshape
round searchsorted set shape size sort squeeze std strides sum swapaxes take tolist trace
transpose var view""".split())
# The ufunc methods CuPy implements, by ufunc; the others raise NotImplementedError there
# (``cupy.maximum.reduce``: use ``cupy.max``). ``outer`` is there for every binary ufunc.
# Checked against the installed CuPy by tests/test_cupy_rules_probe.py.
UFUNC_METHODS = {
    "reduce": frozenset({"add", "multiply"}),
    "accumulate": frozenset({"add", "multiply"}),
    "reduceat": frozenset({"add"}),
    "at": frozenset({"add", "subtract", "maximum", "minimum", "bitwise_and", "bitwise_or",
                     "bitwise_xor"}),
}
# The keywords of CuPy's ufunc calls and methods (NumPy's ``where=``, ``initial=``, ``order=``
# ... raise TypeError there): ``__call__`` and ``outer`` take these, the methods their own.
UFUNC_CALL_KEYWORDS = frozenset({"out", "dtype", "casting"})
UFUNC_METHOD_PARAMETERS = {
    "reduce": "array, axis=0, dtype=None, out=None, keepdims=False",
    "accumulate": "array, axis=0, dtype=None, out=None",
    "reduceat": "array, indices, axis=0, dtype=None, out=None",
    "at": "a, indices, b=None",
}
# ``ufunc.at`` scatters with CUDA atomics, for these dtypes of the target only (CuPy raises
# TypeError for the others: int64 counts, for one).
AT_DTYPES = {
    "add": frozenset(np.dtype(t) for t in ("int32", "float16", "float32", "float64", "uint32",
                                           "uint64")),
    "maximum": frozenset(np.dtype(t) for t in ("int32", "float32", "float64", "uint32", "uint64")),
    "minimum": frozenset(np.dtype(t) for t in ("int32", "float32", "float64", "uint32", "uint64")),
}


class TransferCounter:
    """Counts of host<->device crossings; ``log`` holds ``(direction, shape, dtype)`` of each.

    Directions: ``"to_device"``, ``"to_host"`` (whole arrays) and ``"scalar"`` (a value read
    back to the host: ``bool()``, ``float()``, ``int()``, ``.item()``).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.log = []

    def record(self, direction, array=None):
        shape = None if array is None else tuple(np.shape(array))
        dtype = None if array is None else getattr(array, "dtype", None)
        with self._lock:
            self.log.append((direction, shape, dtype))

    def count(self, direction, shape=None):
        """How many crossings went ``direction`` (of arrays of ``shape``, if given)."""
        with self._lock:
            return sum(1 for d, s, _ in self.log if d == direction and (shape is None or s == shape))

    @property
    def to_device(self):
        return self.count("to_device")

    @property
    def to_host(self):
        return self.count("to_host")

    @property
    def scalar(self):
        return self.count("scalar")

    def __repr__(self):
        return (f"<transfers: {self.to_device} to device, {self.to_host} to host, "
                f"{self.scalar} scalar reads>")


TRANSFERS = TransferCounter()


class _MemoryPointer:
    """What ``cupy.ndarray.data`` is: a pointer, not an array (code that takes ``x.data`` of
    anything with a ``data`` attribute, as of a HyperSpy signal, gets this)."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __repr__(self):
        return f"<MemoryPointer 0x{self.ptr:x}>"


class Device:
    """``cupy.cuda.Device``: the one stand-in device, id 0."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(getattr(device, "id", device))
        if self.id != 0:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal ({self.id})")

    compute_capability = "90"

    @property
    def mem_info(self):
        return _runtime.memGetInfo()

    def use(self):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    """``cupy.cuda.Stream``: work is synchronous here."""

    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass

    def synchronize(self):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


def _unwrap_index(key):
    """An index for the wrapped array: device arrays unwrapped, host arrays counted."""
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    if isinstance(key, DeviceArray):
        return key._a
    if isinstance(key, np.ndarray):  # CuPy moves host index arrays to the device
        TRANSFERS.record("to_device", key)
        return key
    if isinstance(key, list):
        if any(isinstance(k, DeviceArray) for k in key):
            return [_unwrap_index(k) for k in key]
        TRANSFERS.record("to_device", np.asarray(key))  # CuPy makes a device array of it
    return key


def _wrap(value):
    """NumPy results -> device arrays (scalars become 0-d arrays, as CuPy's reductions)."""
    if isinstance(value, DeviceArray):
        return value
    if isinstance(value, np.ndarray):
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple results
        return type(value)(*(_wrap(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_wrap(v) for v in value)
    return value


def _unwrap(value, where):
    """Device arrays -> their NumPy arrays; host arrays refused, as CuPy refuses them."""
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type {type(value)} in {where}: a host (NumPy) array mixed "
                        "with device arrays (move it with cupy.asarray, once)")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, where) for k, v in value.items()}
    return value


class DeviceArray:
    """A stand-in ``cupy.ndarray``: a NumPy array behind CuPy's rules (see the module)."""

    __array_priority__ = 100  # above NumPy's, as CuPy's
    __hash__ = None

    def __init__(self, array):
        if isinstance(array, DeviceArray):
            array = array._a
        if not isinstance(array, np.ndarray):
            raise TypeError("DeviceArray wraps a NumPy array; use cupy.asarray for host data")
        dt = array.dtype
        if dt.kind in "OUSVMm" or (dt.kind == "f" and dt.itemsize > 8) or \
                (dt.kind == "c" and dt.itemsize > 16):
            raise ValueError(f"Unsupported dtype {dt}")  # as CuPy: no object, text, longdouble
        self._a = array

    # -- what CuPy refuses -----------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    # -- crossings ---------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        TRANSFERS.record("to_host", self._a)
        host = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("set() takes a NumPy array")
        TRANSFERS.record("to_device", arr)
        self._a[...] = arr

    def item(self):
        TRANSFERS.record("scalar")
        return self._a.item()

    def tolist(self):
        TRANSFERS.record("to_host", self._a)
        return self._a.tolist()

    def __bool__(self):
        TRANSFERS.record("scalar")
        return bool(self._a)

    def __float__(self):
        TRANSFERS.record("scalar")
        return float(self._a)

    def __int__(self):
        TRANSFERS.record("scalar")
        return int(self._a)

    def __complex__(self):
        TRANSFERS.record("scalar")
        return complex(self._a)

    def __format__(self, spec):  # CuPy formats self.get()
        if self.ndim == 0:
            TRANSFERS.record("scalar")
        else:
            TRANSFERS.record("to_host", self._a)
        return format(self._a, spec)

    def __reduce__(self):  # pickling copies through the host, as CuPy's does
        return _rebuild, (self._a,)

    def __copy__(self):
        return DeviceArray(self._a.copy())

    def __deepcopy__(self, memo):
        return DeviceArray(self._a.copy())

    # -- attributes ----------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T))
    base = property(lambda self: DeviceArray(self._a.base)
                    if isinstance(self._a.base, np.ndarray) else None)
    data = property(lambda self: _MemoryPointer(self._a.ctypes.data))
    device = property(lambda self: Device(0))

    @property
    def real(self):
        return DeviceArray(self._a.real)

    @real.setter
    def real(self, value):
        self._a.real = _unwrap(value, "ndarray.real")

    @property
    def imag(self):
        return DeviceArray(self._a.imag)

    @imag.setter
    def imag(self, value):
        self._a.imag = _unwrap(value, "ndarray.imag")

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (DeviceArray(np.asarray(row)) if not isinstance(row, np.ndarray) else DeviceArray(row)
                for row in self._a)

    def __repr__(self):  # debugging only: not counted
        return f"stand-in device {self._a!r}"

    __str__ = __repr__

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, (np.ndarray, list)):  # CuPy copies a host value to the device
            TRANSFERS.record("to_device", np.asarray(value))
        elif isinstance(value, DeviceArray):
            value = value._a
        self._a[_unwrap_index(key)] = value

    # -- dispatch ------------------------------------------------------------------------
    def __array_function__(self, func, types, args, kwargs):
        mod = func.__module__ or ""
        name = func.__name__
        if mod.startswith("numpy.fft"):
            target = _fft.__dict__.get(name)
        elif mod.startswith("numpy.linalg"):
            target = _linalg.__dict__.get(name)
        else:
            target = _cupy.__dict__.get(name) if name in NUMPY_NAMES else None
        if target is None:
            return NotImplemented  # NumPy then raises TypeError, as it does for CuPy arrays
        return target(*args, **kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc.__name__ not in NUMPY_NAMES or method not in (
                "__call__", "reduce", "accumulate", "outer", "at", "reduceat"):
            return NotImplemented
        return _apply_ufunc(ufunc, method, inputs, kwargs)

    # -- methods: computed on the device, results stay there --------------------------
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return DeviceArray(self._a.astype(dtype, order=order, copy=copy))

    def reshape(self, *shape, order="C"):
        return DeviceArray(self._a.reshape(*shape, order=order))

    def view(self, dtype=None):
        if dtype is not None and isinstance(dtype, type) and issubclass(dtype, np.ndarray):
            raise TypeError("a CuPy array cannot be viewed as a NumPy array")
        return DeviceArray(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        self._a.fill(_unwrap(value, "ndarray.fill"))

    def copy(self, order="C"):
        return DeviceArray(self._a.copy(order=order))

    def __matmul__(self, other):
        return np.matmul(self, other)

    def __rmatmul__(self, other):
        return np.matmul(other, self)


def _rebuild(array):
    return DeviceArray(array)


def _method(name):
    def method(self, *args, **kwargs):
        where = f"cupy.ndarray.{name}"
        _check_method(name, args, kwargs)
        args = _host_operands(name, args)
        return _wrap(getattr(self._a, name)(*_unwrap(args, where), **_unwrap(kwargs, where)))

    method.__name__ = name
    return method


for _name in ("all any argmax argmin argpartition argsort choose clip conj conjugate cumprod "
              "cumsum diagonal dot flatten max mean min nonzero partition prod ptp put ravel "
              "repeat round searchsorted sort squeeze std sum swapaxes take trace transpose "
              "var").split():
    setattr(DeviceArray, _name, _method(_name))


def _operator(ufunc, reflected=False):
    def op(self, other):
        if not isinstance(other, (DeviceArray, np.ndarray, np.generic, int, float, complex, bool)):
            return NotImplemented
        return ufunc(other, self) if reflected else ufunc(self, other)

    return op


def _inplace(ufunc):
    def op(self, other):
        ufunc(self, other, out=(self,))
        return self

    return op


for _name, _ufunc in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                      ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                      ("mod", np.remainder), ("pow", np.power), ("and", np.bitwise_and),
                      ("or", np.bitwise_or), ("xor", np.bitwise_xor),
                      ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    setattr(DeviceArray, f"__{_name}__", _operator(_ufunc))
    setattr(DeviceArray, f"__r{_name}__", _operator(_ufunc, reflected=True))
    setattr(DeviceArray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                      ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)]:
    setattr(DeviceArray, f"__{_name}__", _operator(_ufunc))
DeviceArray.__neg__ = lambda self: np.negative(self)
DeviceArray.__pos__ = lambda self: np.positive(self)
DeviceArray.__abs__ = lambda self: np.absolute(self)
DeviceArray.__invert__ = lambda self: np.invert(self)


# -- checking calls against the installed CuPy ---------------------------------------------

@functools.lru_cache(maxsize=1)
def real_cupy_modules():
    """``{"cupy": ..., "cupy.fft": ..., ...}`` of the installed CuPy, or ``(None, reason)``.

    Importing CuPy needs no GPU. Call it before the stand-in replaces ``cupy`` in
    ``sys.modules`` (the fixture does).
    """
    saved = {k: sys.modules.get(k) for k in _MODULE_NAMES}
    if any(isinstance(m, types.ModuleType) and getattr(m, "_STANDIN", False) for m in saved.values()):
        return None, "the stand-in is installed: real CuPy cannot be imported now"
    try:
        import cupy
        import cupy.cuda
        import cupy.fft
        import cupy.linalg
        import cupyx.scipy.ndimage
        import cupyx.scipy.sparse
    except Exception as err:  # not installed, or a broken install
        return None, f"CuPy is not installed here ({type(err).__name__}: {err})"
    return {"cupy": cupy, "cupy.fft": cupy.fft, "cupy.linalg": cupy.linalg,
            "cupy.cuda": cupy.cuda, "cupy.cuda.runtime": cupy.cuda.runtime,
            "cupyx.scipy.ndimage": cupyx.scipy.ndimage,
            "cupyx.scipy.sparse": cupyx.scipy.sparse}, None


@functools.lru_cache(maxsize=None)
def _real_signature(module, name):
    real, _ = real_cupy_modules()
    if real is None or module not in real:
        return None
    obj = getattr(real[module], name, None)
    if obj is None:
        raise AttributeError(f"real CuPy has no {module}.{name}")
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # compiled (Cython) functions and ufuncs
        return None


def _check_call(module, name, args, kwargs):
    """Bind the call to the real CuPy function's signature (where CuPy is installed)."""
    sig = _real_signature(module, name)
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{module}.{name}{sig} does not take this call: {err}") from None


def _signature_from_text(params):
    """An :class:`inspect.Signature` from the parameter list of a compiled (Cython) function's
    docstring, ``"self, int axis=-1, kind=None"``: the names and kinds, types and defaults
    dropped (only binding a call to it matters here)."""
    P = inspect.Parameter
    out, kind = [], P.POSITIONAL_OR_KEYWORD
    for token in (t.strip() for t in params.split(",")):
        if not token or token == "self":
            continue
        if token == "*":
            kind = P.KEYWORD_ONLY
        elif token.startswith("**"):
            out.append(P(token[2:].split()[-1], P.VAR_KEYWORD))
        elif token.startswith("*"):
            out.append(P(token[1:].split()[-1], P.VAR_POSITIONAL))
            kind = P.KEYWORD_ONLY
        else:
            name, eq, _ = token.partition("=")
            out.append(P(name.split()[-1], kind, default=None if eq else P.empty))
    return inspect.Signature(out)


@functools.lru_cache(maxsize=None)
def _real_method_signature(name):
    """The signature of ``cupy.ndarray.<name>`` from its docstring's first line (where CuPy is
    installed), e.g. ``_ndarray_base.max(self, axis=None, out=None, keepdims=False)``."""
    real, _ = real_cupy_modules()
    if real is None:
        return None
    doc = (getattr(real["cupy"].ndarray, name).__doc__ or "").strip().splitlines()
    match = re.match(r"[\w.]+\((.*)\)", doc[0]) if doc else None
    return None if match is None else _signature_from_text(match.group(1))


def _check_method(name, args, kwargs):
    """Bind a method call to ``cupy.ndarray``'s (NumPy's ``x.max(initial=0)`` or
    ``x.sum(where=m)`` fail there)."""
    sig = _real_method_signature(name)
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"cupy.ndarray.{name}{sig} does not take this call: {err}") from None


# Arguments CuPy converts from host data itself (an index array or list: one transfer each),
# by position: the methods' (after self) and the functions'.
_HOST_OPERANDS = {"take": (0,), "put": (0, 1), "cupy.take": (1,), "cupy.put": (1, 2),
                  "cupy.compress": (0,)}


def _host_operands(name, args):
    positions = _HOST_OPERANDS.get(name, ())
    if not positions:
        return args
    args = list(args)
    for i in positions:
        if i < len(args) and isinstance(args[i], (np.ndarray, list)):
            TRANSFERS.record("to_device", np.asarray(args[i]))
            args[i] = DeviceArray(np.array(args[i]))
    return tuple(args)


@functools.lru_cache(maxsize=None)
def _ufunc_method_signature(method):
    return _signature_from_text(UFUNC_METHOD_PARAMETERS[method])


def _apply_ufunc(ufunc, method, inputs, kwargs):
    """``ufunc.method(*inputs, **kwargs)`` as CuPy runs it: its methods, keywords and
    ``at`` dtypes only, on device arrays only (host arrays refused, host indices moved)."""
    name = ufunc.__name__
    where = f"cupy.{name}" + ("" if method == "__call__" else f".{method}")
    if method in UFUNC_METHODS and name not in UFUNC_METHODS[method]:
        raise NotImplementedError(f"`cupy_{name}.{method}` is not supported yet (CuPy has "
                                  f"{method} for {sorted(UFUNC_METHODS[method])} only)")
    if ufunc.signature is not None:  # matmul: a generalised ufunc in CuPy, keywords of its own
        pass
    elif method in ("__call__", "outer"):
        wrong = {k: v for k, v in kwargs.items() if k not in UFUNC_CALL_KEYWORDS}
        if wrong:
            raise TypeError(f"Wrong arguments {wrong}: {where} takes out, dtype and casting only")
    else:
        try:
            bound = _ufunc_method_signature(method).bind(*inputs, **kwargs)
        except TypeError as err:
            raise TypeError(f"{where}({UFUNC_METHOD_PARAMETERS[method]}) does not take this "
                            f"call: {err}") from None
        if method == "at":
            a, indices, b = (bound.arguments.get(k) for k in ("a", "indices", "b"))
            if not isinstance(a, DeviceArray):
                raise TypeError(f"{where}: the target must be a device array (cupy.ndarray)")
            if name in AT_DTYPES and a.dtype not in AT_DTYPES[name]:
                raise TypeError(f"{where} (CUDA atomics) only supports "
                                f"{sorted(str(d) for d in AT_DTYPES[name])} as data type, "
                                f"not {a.dtype}")
            ufunc.at(a._a, _unwrap_index(indices), *(() if b is None else (_unwrap(b, where),)))
            return None
    ins = tuple(_unwrap(x, where) for x in inputs)
    kwargs = {k: _unwrap(v, where) for k, v in kwargs.items()}  # out=(device array,) too
    return _wrap(getattr(ufunc, method)(*ins, **kwargs))


class _DeviceUfunc:
    """A ``cupy`` ufunc of the stand-in (``cupy.add``, ``cupy.add.reduce``, ``cupy.add.at``):
    NumPy's ufunc on device arrays, with CuPy's methods and keywords."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = self.__qualname__ = ufunc.__name__
        self.__module__ = "cupy"
        self.nin, self.nout, self.nargs = ufunc.nin, ufunc.nout, ufunc.nargs

    def __call__(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", args, kwargs)

    def reduce(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "reduce", args, kwargs)

    def accumulate(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "accumulate", args, kwargs)

    def reduceat(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "reduceat", args, kwargs)

    def outer(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "outer", args, kwargs)

    def at(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "at", args, kwargs)

    def __reduce__(self):  # pickled by reference: cupy.<name>
        return self.__name__

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


def _device_function(module, name, np_func):
    """``module.name`` of the stand-in: NumPy's function on unwrapped device arrays."""
    where = f"{module}.{name}"

    def func(*args, **kwargs):
        _check_call(module, name, args, kwargs)
        if name in _FROM_HOST and module == "cupy":
            a = args[0] if args else kwargs.pop("a", kwargs.pop("obj", None))
            rest = {k: v for k, v in kwargs.items() if k in ("dtype", "order")}
            if isinstance(a, DeviceArray):  # converted on the device, copied where needed
                copy = kwargs.get("copy", True if name == "array" else None)
                return DeviceArray(np.array(a._a, **{"copy": copy, **rest}))
            if _contains_device(a):
                raise TypeError(f"{where}: a sequence of device arrays; use cupy.stack")
            TRANSFERS.record("to_device", a if isinstance(a, np.ndarray) else None)
            out = np.array(a, **{"copy": True, **rest})
            if not out.dtype.isnative:  # CuPy swaps big-endian data to the GPU's byte order
                out = out.astype(out.dtype.newbyteorder("="))
            return DeviceArray(out)
        args = _host_operands(where, args)
        return _wrap(np_func(*_unwrap(args, where), **_unwrap(kwargs, where)))

    # pickled by reference (sys.modules[module] is the stand-in while it is installed), as
    # dask's distributed scheduler does with the functions in a graph
    func.__name__ = func.__qualname__ = name
    func.__module__ = module
    return func


def _contains_device(x):
    if isinstance(x, DeviceArray):
        return True
    return isinstance(x, (list, tuple)) and any(_contains_device(v) for v in x)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """``cupy.asnumpy``: device arrays are copied to the host (counted); host ones pass."""
    if isinstance(a, DeviceArray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return _cupy if any(isinstance(a, (DeviceArray, csr_matrix)) for a in args) else np


# -- cupy.cuda --------------------------------------------------------------------------------

class _MemoryPool:
    def __init__(self):
        self._limit = 0

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def set_limit(self, size=None, fraction=None):
        self._limit = size or 0

    def get_limit(self):
        return self._limit


_POOL = _MemoryPool()
_PINNED_POOL = _MemoryPool()
DEVICE_PROPERTIES = {"name": b"Stand-in device", "totalGlobalMem": 2**30}


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod._STANDIN = True
    mod.__dict__.update(attrs)
    return mod


_runtime = _module(
    "cupy.cuda.runtime",
    getDeviceCount=lambda: 1,
    getDeviceProperties=lambda device: dict(DEVICE_PROPERTIES),
    getDevice=lambda: 0,
    setDevice=lambda device: None if int(device) == 0 else Device(device),
    memGetInfo=lambda: (DEVICE_PROPERTIES["totalGlobalMem"], DEVICE_PROPERTIES["totalGlobalMem"]),
    deviceSynchronize=lambda: None,
)
_cuda = _module("cupy.cuda", runtime=_runtime, Device=Device, Stream=Stream,
                get_current_stream=lambda device=None: Stream.null,
                alloc_pinned_memory=lambda size: bytearray(size))  # page-locked host memory


# -- cupyx.scipy.sparse ------------------------------------------------------------------------

class csr_matrix:
    """``cupyx.scipy.sparse.csr_matrix`` made from a SciPy matrix (one counted transfer)."""

    format = "csr"

    def __init__(self, arg1, shape=None, dtype=None, copy=False):
        import scipy.sparse as sp

        _check_call("cupyx.scipy.sparse", "csr_matrix", (arg1,),
                    {"shape": shape, "dtype": dtype, "copy": copy})
        if isinstance(arg1, csr_matrix):
            self._m = arg1._m.copy()
        elif sp.issparse(arg1):
            TRANSFERS.record("to_device", arg1.data)
            self._m = sp.csr_matrix(arg1, dtype=dtype, copy=True)
        elif isinstance(arg1, tuple) and all(isinstance(a, DeviceArray) for a in arg1[:3]):
            self._m = sp.csr_matrix(tuple(a._a for a in arg1), shape=shape, dtype=dtype)
        else:
            raise TypeError("csr_matrix takes a SciPy sparse matrix or (data, indices, indptr) "
                            f"on the device; got {type(arg1).__name__}")

    shape = property(lambda self: self._m.shape)
    dtype = property(lambda self: self._m.dtype)
    nnz = property(lambda self: self._m.nnz)
    ndim = 2
    data = property(lambda self: DeviceArray(self._m.data))
    indices = property(lambda self: DeviceArray(self._m.indices))
    indptr = property(lambda self: DeviceArray(self._m.indptr))

    @property
    def T(self):
        out = object.__new__(csr_matrix)
        out._m = self._m.T.tocsr()
        return out

    def get(self, stream=None):
        TRANSFERS.record("to_host", self._m.data)
        return self._m.copy()

    def toarray(self, order=None, out=None):
        return DeviceArray(self._m.toarray())

    def sum(self, axis=None, dtype=None, out=None):
        return _wrap(np.asarray(self._m.sum(axis=axis, dtype=dtype)))

    def dot(self, other):
        return self @ other

    def __matmul__(self, other):
        if isinstance(other, DeviceArray):
            return DeviceArray(np.asarray(self._m @ other._a))
        if isinstance(other, csr_matrix):
            out = object.__new__(csr_matrix)
            out._m = (self._m @ other._m).tocsr()
            return out
        raise TypeError(f"cupyx sparse @ {type(other).__name__}: only device arrays")

    __mul__ = __matmul__

    def __rmatmul__(self, other):
        if isinstance(other, DeviceArray):
            return DeviceArray(np.asarray(other._a @ self._m))
        raise TypeError(f"{type(other).__name__} @ cupyx sparse: only device arrays")

    def sort_indices(self):
        self._m.sort_indices()

    def tocsr(self, copy=False):
        return self


def _issparse(x):
    return isinstance(x, csr_matrix)


def _ndimage_function(name):
    import scipy.ndimage as ndi

    np_func = getattr(ndi, name)
    where = f"cupyx.scipy.ndimage.{name}"

    def func(*args, **kwargs):
        _check_call("cupyx.scipy.ndimage", name, args, kwargs)
        if not args or not isinstance(args[0], DeviceArray):
            raise TypeError(f"{where}: the input must be a device array (cupy.ndarray); got "
                            f"{type(args[0]).__name__ if args else None}")
        return _wrap(np_func(*_unwrap(args, where), **_unwrap(kwargs, where)))

    func.__name__ = func.__qualname__ = name
    func.__module__ = "cupyx.scipy.ndimage"
    return func


# -- the namespaces ------------------------------------------------------------------------------

_MODULE_NAMES = ("cupy", "cupy.cuda", "cupy.cuda.runtime", "cupy.fft", "cupy.linalg", "cupyx",
                 "cupyx.scipy", "cupyx.scipy.ndimage", "cupyx.scipy.sparse")

_fft = _module("cupy.fft", **{n: _device_function("cupy.fft", n, getattr(np.fft, n))
                              for n in FFT_NAMES})
_linalg = _module("cupy.linalg", **{n: _device_function("cupy.linalg", n, getattr(np.linalg, n))
                                    for n in LINALG_NAMES})
_cupy = _module(
    "cupy",
    ndarray=DeviceArray, asnumpy=asnumpy, get_array_module=get_array_module, cuda=_cuda,
    fft=_fft, linalg=_linalg,
    get_default_memory_pool=lambda: _POOL, get_default_pinned_memory_pool=lambda: _PINNED_POOL,
    **{n: _DeviceUfunc(getattr(np, n)) if isinstance(getattr(np, n), np.ufunc)
       and getattr(np, n).signature is None else _device_function("cupy", n, getattr(np, n))
       for n in NUMPY_NAMES},
    **{n: getattr(np, n) for n in NUMPY_VALUES},
)
_cupy.__version__ = "stand-in"
_sparse = _module("cupyx.scipy.sparse", csr_matrix=csr_matrix, issparse=_issparse,
                  isspmatrix=_issparse)
_ndimage = _module("cupyx.scipy.ndimage", **{n: _ndimage_function(n) for n in NDIMAGE_NAMES})
_cupyx_scipy = _module("cupyx.scipy", ndimage=_ndimage, sparse=_sparse)
_cupyx = _module("cupyx", scipy=_cupyx_scipy)
_cupy.TRANSFERS = TRANSFERS  # for tests: standin_gpu.TRANSFERS

MODULES = {"cupy": _cupy, "cupy.cuda": _cuda, "cupy.cuda.runtime": _runtime, "cupy.fft": _fft,
           "cupy.linalg": _linalg, "cupyx": _cupyx, "cupyx.scipy": _cupyx_scipy,
           "cupyx.scipy.ndimage": _ndimage, "cupyx.scipy.sparse": _sparse}
STANDIN_ONLY = {"cupy": {"TRANSFERS"}}  # test hooks, not part of CuPy's namespace


def _register_with_dask():
    """dask picks concatenate, take, ... by block type; it does so for CuPy when it meets a
    type from the ``cupy`` package. The stand-in's type gets the same entries."""
    from dask.array import backends
    from dask.array.dispatch import (concatenate_lookup, einsum_lookup, empty_lookup,
                                     nannumel_lookup, numel_lookup, percentile_lookup,
                                     take_lookup, tensordot_lookup, to_numpy_dispatch)

    concatenate_lookup.register(DeviceArray, _cupy.concatenate)
    take_lookup.register(DeviceArray, _cupy.take)
    tensordot_lookup.register(DeviceArray, _cupy.tensordot)
    einsum_lookup.register(DeviceArray, _cupy.einsum)
    empty_lookup.register(DeviceArray, _cupy.empty)
    numel_lookup.register(DeviceArray, backends._numel_arraylike)
    nannumel_lookup.register(DeviceArray, backends._nannumel)
    percentile_lookup.register(DeviceArray, lambda a, q, method="linear": _cupy.percentile(
        a, q, method=method))
    to_numpy_dispatch.register(DeviceArray, lambda data, **kw: asnumpy(data, **kw))


_register_with_dask()


def install(monkeypatch):
    """Put the stand-in in ``sys.modules`` (``cupy``, ``cupy.fft``, ``cupyx.scipy...``) and in
    diffgpu's device layer; ``monkeypatch`` undoes it. Returns the ``cupy`` stand-in."""
    import diffgpu.device as dev

    real_cupy_modules()  # the real package, for signature checks, before it is hidden
    for name, mod in MODULES.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(dev, "_CUPY_IMPORT", (_cupy, None))
    TRANSFERS.reset()
    return _cupy
