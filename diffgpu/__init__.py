"""diffgpu: lazy processing of 4D-STEM and other diffraction stacks on CPUs and GPUs.

The same few lines run on NumPy or CuPy blocks::

    import diffgpu
    s = diffgpu.load("scan.mib", lazy=True)
    s.to_device()        # adds CuPy transfer steps to the dask graph (if a GPU is there)
    ...
    s.to_host(); s.compute()
"""

from . import data, device, signals
from .cluster import start_cluster
from .device import DeviceUnavailableError, devices, gpu_available
from .io import as_diffraction_patterns, load
from .kernels.dtypes import UnsupportedDtypeError
from .signals import *  # noqa: F401,F403  (the signal classes, to_device, to_host)
from .templates import TemplateLibrary

__version__ = "0.1.0.dev0"

__all__ = list(signals.__all__) + [
    "TemplateLibrary",
    "DeviceUnavailableError",
    "UnsupportedDtypeError",
    "gpu_available",
    "devices",
    "start_cluster",
    "load",
    "as_diffraction_patterns",
    "data",
    "device",
]
