"""notebooks/report.ipynb runs top to bottom on the committed results."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT


def test_report_notebook_executes():
    notebook = nbformat.read(ROOT / "notebooks" / "report.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # every figure drawn
    text = " ".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "LoRA's peak is at least 1.4×" in text
