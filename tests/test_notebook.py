"""The quickstart notebook runs top to bottom (nbclient), so it never rots, and leaves no files behind."""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb"), as_version=4)
    env_path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", ROOT + (os.pathsep + env_path if env_path else ""))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile folders go here, to be checked
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "extracted:" in outputs
    # The question is from the held-out split and is none of the prompt's exemplars.
    assert "held out: True  among the exemplars: False" in outputs
    # The run's workdir was a loom-quickstart-* folder under TMPDIR, and nothing of it is left.
    [workdir] = [line.split(" ", 1)[1] for line in outputs.splitlines() if line.startswith("workdir: ")]
    assert os.path.dirname(workdir) == str(tmp_path) and os.path.basename(workdir).startswith("loom-quickstart-")
    assert not os.path.exists(workdir)
    assert glob.glob(os.path.join(str(tmp_path), "loom-quickstart-*")) == []
