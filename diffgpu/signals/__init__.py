"""HyperSpy signal classes of diffgpu (eager and lazy pairs)."""

from ._device import to_device, to_host
from .diffraction_patterns import DiffractionPatterns, LazyDiffractionPatterns
from .polar_patterns import LazyPolarPatterns, PolarPatterns
from .radial_profiles import LazyRadialProfiles, RadialProfiles
from .virtual_images import LazyVirtualImages, LazyVirtualProfiles, VirtualImages, VirtualProfiles
from .beam_shifts import DirectBeamShifts, LazyDirectBeamShifts
from .orientation_matches import LazyOrientationMatches, OrientationMatches
from .bragg_vectors import BraggVectors, LazyBraggVectors
from .strain_map import LazyStrainMap, StrainMap

__all__ = [
    "to_device",
    "to_host",
    "DiffractionPatterns",
    "LazyDiffractionPatterns",
    "PolarPatterns",
    "LazyPolarPatterns",
    "RadialProfiles",
    "LazyRadialProfiles",
    "VirtualImages",
    "LazyVirtualImages",
    "VirtualProfiles",
    "LazyVirtualProfiles",
    "DirectBeamShifts",
    "LazyDirectBeamShifts",
    "OrientationMatches",
    "LazyOrientationMatches",
    "BraggVectors",
    "LazyBraggVectors",
    "StrainMap",
    "LazyStrainMap",
]
