"""The getting-started notebook runs from top to bottom, headless, without errors."""

import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "examples" / "getting_started.ipynb"


def test_getting_started_notebook(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # static figures (matplotlib's Agg backend behind the inline backend), this interpreter
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    kernel = "python3"
    specs = KernelSpecManager().find_kernel_specs()
    if kernel not in specs or not Path(specs[kernel]).resolve().is_relative_to(
            Path(sys.prefix).resolve()):
        # run the kernel with the interpreter running the tests (the one diffgpu is installed in)
        from ipykernel.kernelspec import install

        install(user=False, prefix=str(tmp_path / "kernel"), kernel_name="diffgpu-test")
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernel" / "share" / "jupyter"))
        kernel = "diffgpu-test"
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    import glob
    import tempfile

    pattern = str(Path(tempfile.gettempdir()) / "diffgpu-getting-started-*")
    before = set(glob.glob(pattern))
    client.execute()
    assert set(glob.glob(pattern)) <= before  # its folder removed at the end (19 MB a run)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert "LazyDiffractionPatterns" in text
    assert "dashboard: http" in text
    assert "same images on the cluster: True" in text
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= 5, f"{images} figures"
