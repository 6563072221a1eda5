"""What notebooks/offline_evaluation.ipynb shows, as functions: loading evaluated runs, its tables and
its plots, so that each notebook cell is a line or two.

A run is read from ``runs/<name>/eval/`` (written by ``make eval``, i.e. ``python -m training.evaluate``;
``load_run`` runs that command first when the folder is missing) and from the training logs
``metrics.jsonl`` and ``steps.jsonl``. The numbers are computed by ``training.evaluate`` and
``training.analysis``; nothing here recomputes a metric differently.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import HTML, display
from matplotlib.ticker import MaxNLocator

from data.prepare import PreparedDataset, open_prepared
from training import analysis
from training.config import TrainConfig, load_config
from training.evaluate import EVAL_DIR

ROOT = Path(__file__).resolve().parents[1]

PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    # generative-recommenders' README ("verified as of 04/15/2024"): the same leave-one-out split and
    # full-corpus ranking with the history removed; sampled softmax with 128 (ML) / 512 (Books) negatives.
    "ml-1m": {
        "SASRec": {"hr@10": .2853, "ndcg@10": .1603, "hr@50": .5474, "ndcg@50": .2185, "hr@200": .7528,
                   "ndcg@200": .2498},
        "HSTU": {"hr@10": .3097, "ndcg@10": .1720, "hr@50": .5754, "ndcg@50": .2307, "hr@200": .7716,
                 "ndcg@200": .2606},
        "HSTU-large": {"hr@10": .3294, "ndcg@10": .1893, "hr@50": .5935, "ndcg@50": .2481, "hr@200": .7839,
                       "ndcg@200": .2771},
    },
    "ml-20m": {
        "SASRec": {"hr@10": .2889, "ndcg@10": .1621, "hr@50": .5503, "ndcg@50": .2199, "hr@200": .7661,
                   "ndcg@200": .2527},
        "HSTU": {"hr@10": .3273, "ndcg@10": .1895, "hr@50": .5889, "ndcg@50": .2473, "hr@200": .7952,
                 "ndcg@200": .2787},
        "HSTU-large": {"hr@10": .3556, "ndcg@10": .2098, "hr@50": .6143, "ndcg@50": .2671, "hr@200": .8074,
                       "ndcg@200": .2965},
    },
    "amazon-books": {
        "SASRec": {"hr@10": .0306, "ndcg@10": .0164, "hr@50": .0754, "ndcg@50": .0260, "hr@200": .1431,
                   "ndcg@200": .0362},
        "HSTU": {"hr@10": .0416, "ndcg@10": .0227, "hr@50": .0957, "ndcg@50": .0344, "hr@200": .1735,
                 "ndcg@200": .0461},
        "HSTU-large": {"hr@10": .0478, "ndcg@10": .0262, "hr@50": .1082, "ndcg@50": .0393, "hr@200": .1908,
                       "ndcg@200": .0517},
    },
}
ACCURACY = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]
CURVE_KS = np.unique(np.geomspace(1, 200, 40).round().astype(int))
BASELINE_STYLE = {"most_popular": ":", "sasrec": "--"}

plt.rcParams.update({
    "figure.dpi": 110, "figure.figsize": (10, 3.6), "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 11, "legend.frameon": False, "font.size": 9,
})


@dataclass
class Model:
    """One evaluated model: a run, or one of its baselines."""

    label: str
    kind: str
    """"run", "most_popular" or "sasrec"."""
    metrics: dict[str, Any]
    """Its entry in eval/metrics.json (``test/...``, ``by_history_length``)."""
    predictions: pd.DataFrame
    """eval/predictions*.parquet: user_id, target_item, topk, rank, history_length, target_score, topk_scores."""


@dataclass
class Run:
    """An evaluated run: its config, eval/ report, training logs and dataset."""

    name: str
    path: Path
    config: TrainConfig
    report: dict[str, Any]
    models: list[Model]
    """The run first, then its baselines."""
    epochs: pd.DataFrame
    """metrics.jsonl: one row per evaluated epoch."""
    steps: pd.DataFrame
    """steps.jsonl: one row per optimizer step."""
    dataset: PreparedDataset

    @property
    def model(self) -> Model:
        return self.models[0]


# --- loading ---------------------------------------------------------------------------------
def load_run(path: str | Path, *, evaluate_if_missing: bool = True) -> Run:
    """Reads an evaluated run; runs ``make eval``'s command for it first when it has no eval/ yet."""
    path = Path(path)
    report_file = path / EVAL_DIR / "metrics.json"
    if not report_file.is_file():
        if not evaluate_if_missing:
            raise FileNotFoundError(f"{report_file} is missing: run `make eval RUN={path}`")
        print(f"{path} has no {EVAL_DIR}/ yet; running: python -m training.evaluate --run {path}")
        proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--run", str(path)], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"evaluating {path} failed:\n{proc.stderr[-4000:]}")
    report = json.loads(report_file.read_text())
    config = load_config(path / "config.yaml")
    name = path.resolve().name
    models = [Model(name, "run", report, pd.read_parquet(path / EVAL_DIR / report["predictions"]))]
    for kind, entry in report["baselines"].items():
        label = "most popular" if kind == "most_popular" else Path(entry["run"]).name
        models.append(Model(label, kind, entry, pd.read_parquet(path / EVAL_DIR / entry["predictions"])))
    return Run(name, path, config, report, models, _jsonl(path / "metrics.jsonl", "epoch"),
               _jsonl(path / "steps.jsonl", "step"), open_prepared(config.data.spec()))


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    for run in runs:
        r = run.report
        print(f"{run.name}: {r['encoder']} on {r['dataset']} ({r['users']:,} test users, {r['items']:,} items); "
              f"evaluated {r['checkpoint']} (epoch {r['checkpoint_epoch']}; best validation epoch "
              f"{_best_epoch(run)} of {len(run.epochs)}); baselines: "
              f"{', '.join(m.label for m in run.models[1:]) or 'none'}")
    return runs


def _jsonl(path: Path, key: str) -> pd.DataFrame:
    """A JSON-lines log; a resumed run logs some steps twice, the later line wins."""
    if not path.is_file():
        return pd.DataFrame({key: []})
    frame = pd.read_json(path, lines=True)
    return frame.drop_duplicates(key, keep="last").sort_values(key).reset_index(drop=True)


def _best_epoch(run: Run) -> int | str:
    if "best" not in run.epochs:
        return "?"
    best = run.epochs[run.epochs["best"].fillna(False).astype(bool)]
    return int(best["epoch"].iloc[-1]) if len(best) else "?"


def _models(runs: Sequence[Run]) -> Iterator[tuple[int, Model]]:
    """(colour index, model) of every run and baseline, each model once (runs may share baselines)."""
    seen: set[str] = set()
    for i, run in enumerate(runs):
        for model in run.models:
            if model.label not in seen:
                seen.add(model.label)
                yield i, model


# --- tables ----------------------------------------------------------------------------------
def metrics_table(runs: Sequence[Run]):
    """This project's test metrics (runs and baselines) beside generative-recommenders' published
    numbers for the same dataset."""
    rows = {("this project", m.label): {k: m.metrics[f"test/{k}"] for k in ACCURACY} for _, m in _models(runs)}
    for dataset in dict.fromkeys(run.report["dataset"] for run in runs):
        for model, values in PUBLISHED.get(dataset, {}).items():
            rows[(f"generative-recommenders, {dataset}", model)] = values
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=ACCURACY)
    frame.columns = [c.upper() for c in ACCURACY]
    return frame.style.format("{:.4f}", na_rep="–").highlight_max(axis=0, props="font-weight: bold")


def beyond_accuracy_table(runs: Sequence[Run]):
    """Coverage@10 and popularity bias@10 of every model, and the popularity share of what users
    actually chose next (the test targets) for reference."""
    k = 10
    rows = {m.label: {f"coverage@{k}": m.metrics[f"test/coverage@{k}"],
                      f"popularity bias@{k}": m.metrics[f"test/popularity_bias@{k}"]} for _, m in _models(runs)}
    for run in runs:
        rows[f"test targets ({run.report['dataset']})"] = {
            f"coverage@{k}": np.nan, f"popularity bias@{k}": run.report["targets_popular_share"]}
    return pd.DataFrame.from_dict(rows, orient="index").style.format("{:.1%}", na_rep="–")


def history_length_table(runs: Sequence[Run], metric: str = "ndcg@10"):
    """``metric`` per history-length bucket (rows) and model (columns), with the users per bucket."""
    frames = []
    for _, m in _models(runs):
        f = pd.DataFrame(m.metrics["by_history_length"]).set_index("history_length")
        frames.append(f[metric].rename(m.label))
    users = pd.DataFrame(runs[0].model.metrics["by_history_length"]).set_index("history_length")["users"]
    table = pd.concat([users, *frames], axis=1).rename_axis("events before the target")
    return table.style.format("{:.4f}", subset=table.columns[1:]).format("{:,}", subset=["users"])


# --- plots -----------------------------------------------------------------------------------
def _style(i: int, model: Model) -> dict[str, Any]:
    colour = f"C{i}" if model.kind == "run" else ("0.45" if model.kind == "most_popular" else "C3")
    return {"color": colour, "linestyle": BASELINE_STYLE.get(model.kind, "-"), "label": model.label}


def plot_metric_curves(runs: Sequence[Run]) -> None:
    """HR@K and NDCG@K for K = 1..200 (log scale) of every model."""
    fig, axes = plt.subplots(1, 2)
    for i, model in _models(runs):
        curves = analysis.metric_curves(model.predictions["rank"], CURVE_KS)
        for ax, column in zip(axes, ("hr", "ndcg"), strict=True):
            ax.plot(curves.index, curves[column], **_style(i, model))
    for ax, name in zip(axes, ("HR@K", "NDCG@K"), strict=True):
        ax.set(xscale="log", xlabel="K", title=name)
        for k in (10, 50, 200):
            ax.axvline(k, color="0.8", linewidth=0.8, zorder=0)
    axes[0].legend()
    fig.tight_layout()
    plt.show()


def plot_history_length(runs: Sequence[Run], metric: str = "ndcg@10") -> None:
    """``metric`` per history-length bucket, one bar per model, users per bucket under the axis."""
    models = list(_models(runs))
    tables = [pd.DataFrame(m.metrics["by_history_length"]).set_index("history_length") for _, m in models]
    buckets = list(tables[0].index)
    x, width = np.arange(len(buckets)), 0.8 / len(models)
    fig, ax = plt.subplots()
    for j, ((i, model), table) in enumerate(zip(models, tables, strict=True)):
        style = _style(i, model)
        ax.bar(x + (j - (len(models) - 1) / 2) * width, table[metric].reindex(buckets), width,
               color=style["color"], label=model.label, hatch=None if model.kind == "run" else "//",
               alpha=1.0 if model.kind == "run" else 0.6)
    ax.set_xticks(x, [f"{b}\n{n:,} users" for b, n in zip(buckets, tables[0]["users"], strict=True)])
    ax.set(xlabel="events before the test target", ylabel=metric.upper(), title=f"{metric.upper()} by history length")
    ax.legend()
    fig.tight_layout()
    plt.show()


def plot_training(runs: Sequence[Run], window: int = 50) -> None:
    """Training loss per step (a moving average over ``window`` steps, raw values faint) and the
    validation HR@10 / NDCG@10 per epoch, the best epoch marked."""
    fig, (loss_ax, valid_ax) = plt.subplots(1, 2)
    for i, run in enumerate(runs):
        colour = f"C{i}"
        if len(run.steps):
            loss_ax.plot(run.steps["step"], run.steps["loss"], color=colour, alpha=0.15, linewidth=0.6)
            # A short run (a test's) gets a window of a tenth of its steps, not a running mean.
            smooth = run.steps["loss"].rolling(max(1, min(window, len(run.steps) // 10)), min_periods=1).mean()
            loss_ax.plot(run.steps["step"], smooth, color=colour, label=run.name)
        if "valid/ndcg@10" in run.epochs:
            epochs = run.epochs.dropna(subset=["valid/ndcg@10"])
            valid_ax.plot(epochs["epoch"], epochs["valid/hr@10"], color=colour, linestyle="--",
                          label=f"{run.name} HR@10")
            valid_ax.plot(epochs["epoch"], epochs["valid/ndcg@10"], color=colour, label=f"{run.name} NDCG@10")
            best = epochs.loc[epochs["valid/ndcg@10"].idxmax()]
            valid_ax.plot(best["epoch"], best["valid/ndcg@10"], marker="*", markersize=12, color=colour,
                          linestyle="none")
        # Normally the best epoch; another one when `make eval` was asked for another checkpoint.
        valid_ax.axvline(run.report["checkpoint_epoch"], color=colour, linestyle=":", linewidth=1)
    loss_ax.set(xlabel="step", ylabel="sampled-softmax loss", title="training loss")
    valid_ax.set(xlabel="epoch", title="validation (★ best NDCG@10, dotted: the evaluated checkpoint)")
    valid_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend()
    valid_ax.legend()
    fig.tight_layout()
    plt.show()


def plot_scores(runs: Sequence[Run]) -> None:
    """Per trained model: the distribution of the best score, the 10th-best score and the target's
    score (cosine similarities of user and item embeddings)."""
    models = [(i, m) for i, m in _models(runs) if m.kind != "most_popular"]
    fig, axes = plt.subplots(1, len(models), squeeze=False, figsize=(5 * len(models), 3.4))
    for ax, (_, model) in zip(axes[0], models, strict=True):
        p = model.predictions
        top = np.stack(p["topk_scores"].to_numpy())
        values = {"best item": top[:, 0], "10th item": top[:, min(9, top.shape[1] - 1)],
                  "test target": p["target_score"].to_numpy()}
        bins = np.linspace(min(v.min() for v in values.values()), max(v.max() for v in values.values()), 50)
        for (label, v), colour in zip(values.items(), ("C0", "C2", "C1"), strict=True):
            ax.hist(v, bins=bins, histtype="step", linewidth=1.5, color=colour, label=label)
        ax.set(title=model.label, xlabel="score (cosine)", ylabel="users")
        ax.legend()
    fig.tight_layout()
    plt.show()


# --- examples --------------------------------------------------------------------------------
def show_examples(run: Run, n_recent: int = 10, seed: int = 0) -> None:
    """Three test users of ``run``: one whose target made the top 10, one near miss (rank 11-50) and
    one miss; each with the titles of the last items they saw and of their top-10 recommendations."""
    p = run.model.predictions
    rng = np.random.default_rng(seed)
    titles = _titles(run.dataset)
    dense_user = pd.Series(np.arange(run.dataset.num_users), index=run.dataset.raw_users.to_numpy())
    groups = {"hit": p["rank"] <= 10, "near miss": p["rank"].between(11, 50), "miss": p["rank"] > 50}
    for kind, mask in groups.items():
        if not mask.any():
            continue
        row = p[mask].iloc[int(rng.integers(mask.sum()))]
        user = int(dense_user[row["user_id"]])
        start, end = run.dataset.packed.offsets[user], run.dataset.packed.offsets[user + 1] - 1  # before the target
        recent = run.dataset.packed.items[max(start, end - n_recent):end][::-1]
        raw = run.dataset.items["raw_item"].to_numpy()
        table = pd.DataFrame({
            "recently seen (newest first)": pd.Series([titles[i] for i in raw[recent - 1]]),
            "recommended (best first)": pd.Series([titles[i] for i in row["topk"][:10]]),
        }).fillna("")
        table.index = table.index + 1
        target = titles[row["target_item"]]
        display(HTML(f"<h4>{kind}: user {row['user_id']}, {row['history_length']} events before the test target "
                     f"<i>{html.escape(target)}</i> (ranked {row['rank']:,})</h4>"))
        display(table.style.apply(_mark, target=target, subset=["recommended (best first)"]))


def _mark(column: pd.Series, target: str) -> list[str]:
    return ["font-weight: bold; background: #fff3c4" if v == target else "" for v in column]


def _titles(dataset: PreparedDataset) -> dict[Any, str]:
    """raw item id -> title (the raw id itself when the dataset has no titles)."""
    items = dataset.items
    title = items["title"] if "title" in items else pd.Series(index=items.index, dtype=object)
    names = title.astype(object).where(title.notna(), "item " + items["raw_item"].astype(str))
    return dict(zip(items["raw_item"], names, strict=True))
