"""notebooks/offline_evaluation.ipynb: committed without outputs, and executed headlessly end to end
(nbclient, a fresh kernel) against a tiny run; any cell error fails the test."""

from __future__ import annotations

import nbformat
import pytest

from notebooks.render import NOTEBOOK, execute, to_html
from tests.test_eval import tiny_runs


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert 'os.environ.get("GENREC_RUNS", "runs/latest")' in code[0].source  # the runs, in the first cell


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[nbformat.NotebookNode, dict]:
    runs = tiny_runs(tmp_path_factory)  # shared with test_eval.py within one pytest session
    return execute([runs["hstu"]], timeout=300), runs


def test_notebook_executes_against_a_tiny_run(executed):
    nb, runs = executed
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # metric curves, history length, training curves, score distributions
    tables = "\n".join(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    for label in ("hstu", "most popular", "sasrec", "coverage@10", "recommended (best first)"):
        assert label in tables, label
    # The run was evaluated (by test_eval.py's `make eval`, or by the notebook itself when run alone).
    assert (runs["hstu"] / "eval" / "metrics.json").is_file()


def test_rendered_html_embeds_the_plots(executed):
    nb, _ = executed
    page = to_html(nb)
    assert page.count("<img src='data:image/png;base64,") == 4
    assert "<h2>Headline metrics</h2>" in page and "generative-recommenders" in page
