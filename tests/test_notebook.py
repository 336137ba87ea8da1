"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nbformat
import pytest

from multimodal_rec.config import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "quickstart.ipynb"
# What the notebook writes; none of it may appear outside the run folder it is given.
OUTPUT_SUFFIXES = (".ckpt", ".csv", ".json", ".png", ".parquet", ".npy", ".faiss", ".pt", ".yaml")


def test_quickstart_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [], f"cell {cell.get('id')} has outputs: strip them before committing"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert 'DATA = "synthetic"' in code[0].source, "the first code cell chooses the data set"


def _untracked_outputs() -> set[str]:
    """Untracked, not ignored files in the repository that look like the notebook's outputs."""
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        return set()
    listing = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout
    return {line[3:] for line in listing.splitlines()
            if line.startswith("?? ") and line.endswith(OUTPUT_SUFFIXES)}


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MMREC_QUICKSTART_OUT", str(tmp_path))  # the kernel inherits the environment
    before = _untracked_outputs()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel must be this interpreter (the venv's ipykernel): jupyter_client starts the `python3` kernelspec's
    # "python" as sys.executable. Checked from inside the kernel.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import json, sys; print(json.dumps([sys.prefix]))", id="kernel"))
    client = NotebookClient(nb, kernel_name="python3", timeout=900,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    assert json.loads(nb.cells[0].outputs[0]["text"]) == [sys.prefix]
    runs = list((tmp_path / "synthetic").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    result = json.loads((run / "metrics.json").read_text())
    assert result["metrics"]["test/ndcg@10"] > 0
    assert (run / "artifacts" / "manifest.json").is_file()
    assert (run / "artifacts" / "index-flat" / "manifest.json").is_file()
    for figure in ("training_curves", "gallery", "embedding_map"):
        assert (run / "figures" / f"{figure}.png").stat().st_size > 10_000, figure
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "the three figures are shown inline"
    new = _untracked_outputs() - before
    assert not new, f"the notebook wrote into the repository outside ignored folders: {sorted(new)}"
