"""diffgpu's own readers for detector formats where RosettaSciIO's lazy reading does not suit
frame-wise work (frames split across chunks, whole files mapped, slow decoding).

Each reader returns a lazy dask array of whole frames plus axes and metadata; :func:`diffgpu.load`
picks the reader by file extension and falls back to RosettaSciIO for every other format.
"""

import importlib

_MODULES = ("blockfile", "dm", "empad", "errors", "hdf5", "mib")


def __getattr__(name):
    """``diffgpu.readers.mib`` and the other reader modules after a plain ``import diffgpu``
    (as ``file_format=`` takes them), imported when first asked for: reading one format
    does not import the others' libraries."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
