"""Pure array kernels (no HyperSpy): NumPy/SciPy/numba on the host, CuPy on a GPU."""
