"""Sphinx configuration for the diffgpu user guide."""

project = "diffgpu"
author = "The diffgpu developers"
extensions = ["sphinx.ext.autodoc", "numpydoc"]
numpydoc_show_class_members = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
# Other projects' objects named in docstrings (no intersphinx: the docs build offline)
nitpick_ignore = [("py:class", "numpy.ndarray"), ("py:class", "np.ndarray"), ("py:class", "numpy.dtype"),
                  ("py:class", "distributed.Client"), ("py:mod", "hdf5plugin"),
                  ("py:func", "hyperspy.api.load")]
