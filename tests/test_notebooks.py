"""Every notebook in notebooks/ runs top to bottom on the bundled toy model (issue 20).

The notebooks are Jupytext "percent" scripts (plain text, so that diffs read). Each is converted with jupytext
and executed by nbclient on a python3 (ipykernel) kernel in a temporary folder, which receives the figures it
saves; a failing ``assert`` inside a notebook (each asserts the fact it demonstrates) fails its test."""

import time
from pathlib import Path

import jupytext
import nbclient
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 120  # per notebook, all cells together; each runs in under a minute on a 2-core CPU (notebooks/README.md)


PAPERS = ("sampling_basics", "prompt_to_prompt", "ddim_null_text_inversion", "edit_friendly_ddpm", "instruct_pix2pix",
          "controlnet", "ip_adapter_instant_style", "visii", "textual_inversion")


def test_there_is_a_notebook_per_paper():
    names = {p.stem.split("_", 1)[1] for p in NOTEBOOKS}
    assert set(PAPERS) <= names, sorted(set(PAPERS) - names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # figures are saved to files; no display in CI
    notebook = jupytext.read(path)
    deadline = time.monotonic() + TIMEOUT_S

    def time_left(cell) -> int:  # nbclient's timeouts are per cell: give each cell what is left of the notebook's
        return max(1, int(deadline - time.monotonic()))

    client = nbclient.NotebookClient(notebook, timeout_func=time_left, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors, errors
    assert any(tmp_path.glob("*.png")), f"{path.name} saved no figure"
