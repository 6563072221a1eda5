"""Executes notebooks/offline_evaluation.ipynb against one or more runs and writes it as a single HTML
page (plots embedded; code folded away under each section), without nbconvert:

    .venv/bin/python -m notebooks.render runs/<name> [runs/<other> ...] runs/<name>/eval/offline_evaluation.html

(docs/offline_evaluation.html is the committed rendering of a reference run; write yours elsewhere.)

The committed notebook stays without outputs; this writes only the HTML. A run without ``eval/`` is
evaluated first (``python -m training.evaluate --run ...``, as ``make eval`` does).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import markdown
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "offline_evaluation.ipynb"
RUNS_VARIABLE = "GENREC_RUNS"
"""The environment variable the notebook's first cell reads its run directories from (comma-separated)."""

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
pre, code { font: 13px/1.4 ui-monospace, monospace; background: #f6f8fa; }
pre { padding: .6em .8em; overflow-x: auto; }
details summary { color: #888; font-size: 12px; cursor: pointer; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0; }
th, td { border-bottom: 1px solid #e5e5e5; padding: .25em .7em; text-align: right; }
th { background: #fafafa; }
img { max-width: 100%; }
.stderr { color: #a33; }
"""


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Sets environment variables for the kernel (it inherits this process's environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(runs: Sequence[str | Path], *, timeout: int = 1800) -> nbformat.NotebookNode:
    """The notebook executed against ``runs`` in a fresh kernel started in the repository root; raises
    ``nbclient.exceptions.CellExecutionError`` on the first cell that fails."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    paths = ",".join(str(Path(r).absolute()) for r in runs)
    with _environment(**{RUNS_VARIABLE: paths, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}):
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
                       ).execute()
    return nb


def to_html(nb: nbformat.NotebookNode, title: str = "Offline evaluation") -> str:
    """One self-contained page: markdown as HTML, each code cell folded, its outputs shown."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(markdown.markdown(cell.source, extensions=["fenced_code", "tables"]))
        elif cell.cell_type == "code":
            parts.append(f"<details><summary>code</summary><pre>{html.escape(cell.source)}</pre></details>")
            parts.extend(_output_html(output) for output in cell.get("outputs", []))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _output_html(output: nbformat.NotebookNode) -> str:
    if output.output_type == "stream":
        css = " class='stderr'" if output.name == "stderr" else ""
        return f"<pre{css}>{html.escape(output.text)}</pre>"
    if output.output_type == "error":
        return f"<pre class='stderr'>{html.escape(output.ename + ': ' + output.evalue)}</pre>"
    data = output.get("data", {})
    if "image/png" in data:
        png = data["image/png"]
        png = png if isinstance(png, str) else base64.b64encode(png).decode()
        return f"<img src='data:image/png;base64,{png.strip()}'>"
    if "text/html" in data:
        return data["text/html"]
    if "text/markdown" in data:
        return markdown.markdown(data["text/markdown"])
    if "text/plain" in data:
        return f"<pre>{html.escape(data['text/plain'])}</pre>"
    return ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m notebooks.render", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("out", help="the HTML file to write, e.g. docs/offline_evaluation.html")
    args = ap.parse_args(argv)
    names = ", ".join(Path(r).resolve().name for r in args.runs)
    page = to_html(execute(args.runs), title=f"Offline evaluation: {names}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(page)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
