"""The quickstart notebook runs top to bottom (nbclient), so it never rots."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_quickstart_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb"), as_version=4)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")
    try:
        nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "extracted:" in outputs
