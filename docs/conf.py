"""Sphinx configuration for the diffgpu user guide."""

project = "diffgpu"
author = "The diffgpu developers"
extensions = ["sphinx.ext.autodoc", "numpydoc"]
numpydoc_show_class_members = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
