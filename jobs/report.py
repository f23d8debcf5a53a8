"""One HTML page on a tune search (or one finetune run): what each trial learned, where ASHA
stopped it, how the winner errs on its validation rows, and what promotion decided.

python -m jobs.report RUN --config configs/banking77/minilm_tune.yaml [--out DIR]

RUN is the parent run id `raylift tune` printed (or a `raylift finetune` run id). The page and
its PNG plots go to DIR (default: reports/RUN beside the MLflow store, .raylift/reports/RUN for
the embedded one) and link each other relatively, so the folder can be copied anywhere; no
script, stylesheet or font is fetched from outside. The winner's confusion matrix and per-slice
accuracy come from evaluating its registered version again on its pinned validation rows through
the Predictor (jobs.reevaluate, a Ray Data job); the gate verdicts are the tags promote wrote.
"""

from __future__ import annotations

import csv
import datetime
import html
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.storage import (
    is_object_storage,
    redact_credentials,
    refuse_keys_in_uri,
    upload_folder,
)
from jobs.config import LifecycleConfig
from serving import registry, tags

__all__ = [
    "Confusion",
    "ReportResult",
    "Trial",
    "confused_pairs",
    "confusion_matrix",
    "gate_verdicts",
    "main",
    "report_dir",
]

log = logging.getLogger(__name__)

# Per-epoch metrics the curves show, when a run logged them (jobs.train_loop.REPORTED_METRICS).
CURVE_METRICS = ("val_accuracy", "val_macro_f1", "val_loss", "train_loss")
# The task columns the winner was trained on are read from its run's params, so its rows are
# rebuilt with them even when the report is given no config (or another one).
_TASK_COLUMNS = ("text_column", "label_column", "key_column")
_SEARCH_PARAM = "search."  # jobs.tune logs each trial's sample as search.<dotted key>
_ANNOTATED_LABELS = 20  # up to this many labels the heatmap shows every count, diagonal included
_TOP_PAIRS = 15
_WORST_LABELS = 10
_NO_PREDICTION = "(no prediction)"  # a row the Predictor could not score


@dataclass
class Trial:
    """One trial of a search (or the one run of a finetune), as MLflow recorded it."""

    trial_id: str
    run_id: str
    status: str  # the MLflow run's status: FINISHED, FAILED, KILLED, RUNNING
    params: dict[str, str]
    epochs: int  # epochs Tune saw (the tag jobs.tune writes), else epochs logged
    stopped_early: bool
    curves: dict[str, list[tuple[int, float]]]  # metric → (epoch, value), epoch order
    best: float | None = None
    best_epoch: int | None = None


@dataclass
class Confusion:
    """The winner's predictions on its validation rows, counted."""

    labels: list[str]  # rows: true label; columns: predicted (plus _NO_PREDICTION if any)
    counts: np.ndarray
    rows_described: str
    slices: dict[str, float] = field(default_factory=dict)
    slice_rows: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    @property
    def true_labels(self) -> list[str]:
        """The labels rows can have (all but the no-prediction column)."""
        return [label for label in self.labels if label != _NO_PREDICTION]


@dataclass
class ReportResult:
    html: str
    run_id: str
    kind: str  # tune, finetune
    trials: int
    winner_trial_id: str | None
    winner_version: str | None
    validation_rows: int | None
    figures: list[str]


@dataclass
class _Search:
    run: Any  # the MLflow run RUN names
    kind: str
    metric: str
    mode: str
    max_epochs: int | None
    trials: list[Trial]
    version: Any | None  # the ModelVersion registered from it, if any


def main(config: LifecycleConfig, run_id: str, out: str | None = None) -> ReportResult:
    if out:
        refuse_keys_in_uri(out, "--out")  # it is logged and printed as the report's address
    client = _client(config)
    search = _load_search(client, config, run_id)
    winner = _winner_trial(search)
    confusion = _evaluate_winner(client, config, search) if search.version else None
    remote = out if out and is_object_storage(out) else None  # drawn here, then uploaded
    with tempfile.TemporaryDirectory(prefix="raylift-report-") as staging:
        directory = Path(staging if remote else out or report_dir(config, run_id))
        directory.mkdir(parents=True, exist_ok=True)
        figures = _draw(directory, search, winner, confusion)
        (directory / "report.html").write_text(_page(config, search, winner, confusion, figures))
        if remote:
            upload_folder(directory, remote)
    where = remote.rstrip("/") if remote else str(directory)
    log.info("report of %s run %s: %s/report.html", search.kind, run_id, where)
    return ReportResult(
        html=f"{where}/report.html",
        run_id=run_id,
        kind=search.kind,
        trials=len(search.trials),
        winner_trial_id=winner.trial_id if winner else None,
        winner_version=str(search.version.version) if search.version else None,
        validation_rows=confusion.rows if confusion else None,
        figures=[f"{where}/{f}" for f in figures],
    )


def report_dir(config: LifecycleConfig, run_id: str) -> Path:
    """reports/RUN beside a SQLite MLflow store (.raylift/reports/RUN for the embedded one)."""
    store = _sqlite_path(config.registry.tracking_uri)
    root = store.parent if store else Path(".raylift")
    return root / "reports" / run_id


def _sqlite_path(tracking_uri: str) -> Path | None:
    uri = registry.absolute_tracking_uri(tracking_uri)
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])


# --- what MLflow holds --------------------------------------------------------------------------


def _client(config: LifecycleConfig) -> Any:
    from mlflow import MlflowClient

    store = _sqlite_path(config.registry.tracking_uri)
    if store is not None and not store.is_file():
        raise FileNotFoundError(
            f"no MLflow store at {store} (registry.tracking_uri="
            f"{redact_credentials(config.registry.tracking_uri)}); run raylift tune or finetune "
            "first, or pass the --config the run was made with"
        )
    uri = registry.absolute_tracking_uri(config.registry.tracking_uri)
    registry.configure_tracking(config.registry.tracking_uri)
    return MlflowClient(uri, registry_uri=uri)


def _get_run(client: Any, config: LifecycleConfig, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise LookupError(
            f"no MLflow run {run_id!r} in registry.tracking_uri="
            f"{redact_credentials(config.registry.tracking_uri)}; "
            "pass the parent_run_id raylift tune printed (or a finetune run_id), with the "
            "--config the run was made with"
        ) from None


def _load_search(client: Any, config: LifecycleConfig, run_id: str) -> _Search:
    run = _get_run(client, config, run_id)
    params = run.data.params
    nested = _nested_runs(client, run)
    if nested:
        metric = _param(params, "tune.metric") or config.tune.metric_name(config.promote)
        mode = _param(params, "tune.mode") or config.tune.mode
        trials = [_trial(client, r, _trial_id(r), metric, mode) for r in nested]
        version = _registered_version(client, [t.run_id for t in trials], run_id)
        kind = "tune"
    else:
        metric, mode = config.promote.metric, config.promote.mode
        trials = [_trial(client, run, run.info.run_name or run_id[:8], metric, mode)]
        version = _registered_version(client, [run_id], None)
        kind = "finetune"
    epochs = _param(params, "train.epochs")
    return _Search(run, kind, metric, mode, int(epochs) if epochs else None, trials, version)


def _param(params: dict[str, str], key: str) -> str | None:
    value = params.get(key)
    return None if value in (None, "", "None") else value


def _nested_runs(client: Any, run: Any) -> list[Any]:
    """The trials' runs under a search's parent run; of a resumed trial, its newest attempt."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    runs = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'",
        max_results=10_000,
    )
    newest: dict[str, Any] = {}
    for child in sorted(runs, key=lambda r: r.info.start_time):
        newest[_trial_id(child)] = child
    return sorted(newest.values(), key=lambda r: r.info.start_time)


def _trial_id(run: Any) -> str:
    return run.data.tags.get(tags.TUNE_TRIAL_ID) or run.info.run_name or run.info.run_id[:8]


def _trial(client: Any, run: Any, trial_id: str, metric: str, mode: str) -> Trial:
    curves = {m: _history(client, run.info.run_id, m) for m in (metric, *CURVE_METRICS)}
    curves = {m: points for m, points in curves.items() if points}
    logged = max((e for points in curves.values() for e, _ in points), default=0)
    seen = run.data.tags.get(tags.TUNE_TRIAL_EPOCHS, "")
    trial = Trial(
        trial_id=trial_id,
        run_id=run.info.run_id,
        status=run.info.status,
        params=_shown_params(run.data.params),
        epochs=int(seen) if seen.isdigit() else logged,
        stopped_early=run.data.tags.get(tags.TUNE_STOPPED_EARLY) == "true",
        curves=curves,
    )
    points = [(e, v) for e, v in curves.get(metric, []) if math.isfinite(v)]
    if points:
        pick = max if mode == "max" else min
        trial.best_epoch, trial.best = pick(points, key=lambda p: p[1])
    return trial


def _history(client: Any, run_id: str, metric: str) -> list[tuple[int, float]]:
    by_epoch: dict[int, tuple[int, float]] = {}
    for point in client.get_metric_history(run_id, metric):
        if point.step not in by_epoch or point.timestamp >= by_epoch[point.step][0]:
            by_epoch[point.step] = (point.timestamp, point.value)
    return [(epoch, value) for epoch, (_, value) in sorted(by_epoch.items())]


def _shown_params(params: dict[str, str]) -> dict[str, str]:
    """A trial's sample (search.* params); for a finetune run, the settings that shape it."""
    sampled = {
        k.removeprefix(_SEARCH_PARAM): v for k, v in params.items() if k.startswith(_SEARCH_PARAM)
    }
    if sampled:
        return dict(sorted(sampled.items()))
    keys = ("model.method", "train.learning_rate", "train.epochs", "train.batch_size")
    return {k: params[k] for k in keys if k in params}


def _registered_version(client: Any, run_ids: list[str], parent_run_id: str | None) -> Any:
    """The newest version registered from one of `run_ids` (of a search: from that search)."""
    listed = ", ".join(f"'{run_id}'" for run_id in run_ids)
    found = [
        version
        for version in client.search_model_versions(f"run_id IN ({listed})")
        if parent_run_id is None or version.tags.get(tags.TUNE_PARENT_RUN_ID) == parent_run_id
    ]
    return max(found, key=lambda v: int(v.creation_timestamp or 0), default=None)


def _winner_trial(search: _Search) -> Trial | None:
    if search.version is None:
        return None
    return next((t for t in search.trials if t.run_id == search.version.run_id), None)


# --- the winner on its validation rows ----------------------------------------------------------


def _evaluate_winner(client: Any, config: LifecycleConfig, search: _Search) -> Confusion:
    from jobs import reevaluate

    version = search.version
    rows = reevaluate.EvalRows.from_tags(version.tags)
    trained = client.get_run(version.run_id).data.params
    evaluation = _evaluation_config(config, version.name, trained)
    truth, predicted = reevaluate.predictions(evaluation, str(version.version), rows)
    slices, slice_rows = reevaluate.slice_accuracy(truth, predicted, config.promote.slices)
    labels, counts = confusion_matrix(truth, predicted)
    return Confusion(labels, counts, rows.describe(), slices, slice_rows)


def _evaluation_config(
    config: LifecycleConfig, model_name: str, trained: dict[str, str]
) -> LifecycleConfig:
    columns = {c: trained[f"task.{c}"] for c in _TASK_COLUMNS if trained.get(f"task.{c}")}
    return config.model_copy(
        update={
            "task": config.task.model_copy(update=columns),
            "registry": config.registry.model_copy(update={"model_name": model_name}),
        }
    )


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(labels, counts): rows are true labels, columns predictions; labels sorted, with a last
    column for rows that got no prediction when there are any."""
    labels = sorted({str(t) for t in truth} | {str(p) for p in predicted if p is not None})
    if any(p is None for p in predicted):
        labels.append(_NO_PREDICTION)
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        counts[index[str(t)], index[_NO_PREDICTION if p is None else str(p)]] += 1
    return labels, counts


def confused_pairs(confusion: Confusion, top: int = _TOP_PAIRS) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted, count) mistakes, most first."""
    errors = confusion.counts.copy()
    np.fill_diagonal(errors, 0)
    order = np.argsort(errors, axis=None, kind="stable")[::-1][:top]
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, errors.shape)
        if errors[t, p] == 0:
            break
        pairs.append((confusion.labels[t], confusion.labels[p], int(errors[t, p])))
    return pairs


# --- plots --------------------------------------------------------------------------------------


def _draw(
    directory: Path, search: _Search, winner: Trial | None, confusion: Confusion | None
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    figures = [_draw_curves(directory / "curves.png", search, winner)]
    if confusion is not None:
        figures.append(_draw_confusion(directory / "confusion.png", confusion))
        _write_confusion_csv(directory / "confusion_matrix.csv", confusion)
    return figures


def _draw_curves(path: Path, search: _Search, winner: Trial | None) -> str:
    import matplotlib.pyplot as plt

    metrics = [m for m in dict.fromkeys((search.metric, *CURVE_METRICS)) if _any_curve(search, m)]
    metrics = metrics or [search.metric]
    columns = 2 if len(metrics) > 1 else 1
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.8 * rows), squeeze=False)
    colors = plt.get_cmap("tab10" if len(search.trials) <= 10 else "tab20")
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, trial in enumerate(search.trials):
            cut = _cut_short(trial, search)
            _plot_trial(ax, trial, metric, colors(i % colors.N), trial is winner, cut)
        ax.set_title(metric + ("  (the search metric)" if metric == search.metric else ""))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if search.max_epochs:
            ax.set_xlim(0.8, search.max_epochs + 0.2)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    legend_rows = _curves_legend(fig, axes.flat[0], search)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.1 + 0.25 * legend_rows) / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _any_curve(search: _Search, metric: str) -> bool:
    return any(t.curves.get(metric) for t in search.trials)


def _plot_trial(ax: Any, trial: Trial, metric: str, color: Any, is_winner: bool, cut: bool) -> None:
    points = trial.curves.get(metric, [])
    if not points:
        return
    epochs, values = zip(*points, strict=True)
    label = trial.trial_id + (" (winner)" if is_winner else "")
    if is_winner:
        ax.plot(epochs, values, color="black", linewidth=3.0, marker="o", label=label, zorder=5)
    else:
        ax.plot(epochs, values, color=color, linewidth=1.4, alpha=0.85, marker=".", label=label)
    if trial.stopped_early or cut:  # where it ended: the last epoch Tune saw
        stop = [v for e, v in points if e == trial.epochs] or [values[-1]]
        mark = _CUT_MARK if cut else _STOP_MARK
        ax.plot([trial.epochs], stop, linestyle="none", color=color, zorder=6, **mark)


# A cross where the scheduler stopped a trial, a bar where the search's end cut one short.
_STOP_MARK = dict(marker="X", markersize=11, markeredgecolor="black")
_CUT_MARK = dict(marker="|", markersize=14, markeredgewidth=2.5, markeredgecolor="black")


def _cut_short(trial: Trial, search: _Search) -> bool:
    """Ended before train.epochs without an error and not by its scheduler: the search ended
    (tune.time_budget_s) while it ran or waited. jobs.tune tags stopped_early only when the
    scheduler recorded a stop (jobs.scheduler_stops)."""
    short = search.max_epochs is not None and trial.epochs < search.max_epochs
    return (
        search.kind == "tune" and trial.status == "FINISHED" and short and not trial.stopped_early
    )


def _scheduler_name(search: _Search) -> str:
    scheduler = _param(search.run.data.params, "tune.scheduler")
    return {"asha": "ASHA", "sha": "successive halving"}.get(scheduler, "the scheduler")


def _curves_legend(fig: Any, first_ax: Any, search: _Search) -> int:
    """The legend above the plots; returns how many rows of entries it has."""
    from matplotlib.lines import Line2D

    handles, labels = first_ax.get_legend_handles_labels()
    if any(t.stopped_early for t in search.trials):
        handles.append(Line2D([], [], linestyle="none", color="white", **_STOP_MARK))
        labels.append(f"stopped early by {_scheduler_name(search)}")
    if any(_cut_short(t, search) and t.curves for t in search.trials):
        handles.append(Line2D([], [], linestyle="none", color="white", **_CUT_MARK))
        labels.append("cut short by the search's end (tune.time_budget_s)")
    columns = min(6, len(labels))
    fig.legend(handles, labels, loc="upper center", ncol=columns, fontsize=8, frameon=False)
    return math.ceil(len(labels) / max(1, columns))


def _draw_confusion(path: Path, confusion: Confusion) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels, counts = confusion.labels, confusion.counts
    truth = confusion.true_labels
    counts = counts[: len(truth)]  # the no-prediction label is a column, never a true label
    small = len(labels) <= _ANNOTATED_LABELS
    shown = counts.astype(float)
    if not small:  # the diagonal would drown every mistake: show the mistakes alone, on white
        np.fill_diagonal(shown, np.nan)
        shown[shown == 0] = np.nan
    size = max(5.5, 0.17 * len(labels) + 3.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(
        np.ma.masked_invalid(shown),
        cmap="Blues" if small else "Reds",
        interpolation="nearest",
        vmin=0,
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="rows")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    font = 9 if small else 5.5
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(len(truth)), truth, fontsize=font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if small:
        for (t, p), n in np.ndenumerate(counts):
            color = "white" if n > counts.max() / 2 else "black"
            ax.text(p, t, str(n), ha="center", va="center", fontsize=9, color=color)
    else:
        ax.grid(which="major", alpha=0.15, linewidth=0.3)
    title = "" if small else "mistakes only (diagonal hidden), "
    ax.set_title(
        f"Winner on {confusion.rows} validation rows: {title}true row → predicted column",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _write_confusion_csv(path: Path, confusion: Confusion) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["true \\ predicted", *confusion.labels])
        for label, row in zip(confusion.true_labels, confusion.counts, strict=False):
            writer.writerow([label, *(int(n) for n in row)])


# --- the page -----------------------------------------------------------------------------------

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1180px; color: #1d2330; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
       border-bottom: 1px solid #d8dce4; padding-bottom: 4px; }
.muted { color: #5d6678; } code { background: #f1f3f7; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d8dce4; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.winner td { background: #fff5cc; font-weight: 600; } tr.stopped td.outcome { color: #a34a00; }
tr.cut td.outcome { color: #5d6678; }
.pass { color: #17752f; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
img { max-width: 100%; border: 1px solid #e3e6ec; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { color: #5d6678; } dd { margin: 0; }
.note { background: #f6f7fa; border-left: 3px solid #9aa3b5; padding: 6px 10px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _page(
    config: LifecycleConfig,
    search: _Search,
    winner: Trial | None,
    confusion: Confusion | None,
    figures: list[str],
) -> str:
    name = search.run.data.tags.get(tags.CONFIG_NAME) or search.run.info.run_name or ""
    sections = [
        _header(config, search, name),
        _curves_section(search, figures[0]),
        _trials_section(search, winner),
        _winner_section(search, winner, confusion),
        _confusion_section(confusion, figures[1:]),
        _slices_section(config, confusion),
        _gates_section(config, search),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>raylift report: {_e(name)} {_e(search.run.info.run_id)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _header(config: LifecycleConfig, search: _Search, name: str) -> str:
    run = search.run
    started = _when(run.info.start_time)
    took = ""
    if run.info.end_time and run.info.start_time:
        took = f"{(run.info.end_time - run.info.start_time) / 60000:.1f} min"
    what = "Tune search" if search.kind == "tune" else "Fine-tuning run"
    facts = {
        "MLflow run": f"<code>{_e(run.info.run_id)}</code> ({_e(run.info.status)})",
        "config": _e(name),
        "started": _e(started) + (f", took {_e(took)}" if took else ""),
        "metric": f"{_e(search.metric)} ({_e(search.mode)})",
        "trials": _e(len(search.trials)),
        "epochs at most": _e(search.max_epochs or ""),
        "tracking store": f"<code>{_e(redact_credentials(config.registry.tracking_uri))}</code>",
    }
    rows = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts.items())
    running = ""
    if run.info.status == "RUNNING" and search.kind == "tune":
        running = (
            '<p class="note">The search is still running (or its driver died: raylift tune '
            "--resume): each trial's outcome is recorded when the search ends, and the winner "
            "is registered then.</p>"
        )
    return f"<h1>{_e(what)}: {_e(name)}</h1>\n<dl>{rows}</dl>{running}"


def _when(millis: int | None) -> str:
    if not millis:
        return ""
    moment = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _curves_section(search: _Search, figure: str) -> str:
    text = (
        "One line per trial, the winner in thick black; a cross marks the last epoch of a trial "
        f"{_scheduler_name(search)} stopped early, a bar that of a trial the search's end "
        "(tune.time_budget_s) cut short."
        if search.kind == "tune"
        else "The run's metrics per epoch."
    )
    return (
        f'<h2>Learning curves</h2><p class="muted">{_e(text)}</p>'
        f'<a href="{_e(figure)}"><img src="{_e(figure)}" alt="learning curves"></a>'
    )


def _trials_section(search: _Search, winner: Trial | None) -> str:
    keys = sorted({k for t in search.trials for k in t.params})
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = []
    for trial in sorted(search.trials, key=lambda t: _rank(t, search.mode)):
        css = "stopped" if trial.stopped_early else ("cut" if _cut_short(trial, search) else "")
        css = "winner" if trial is winner else css
        cells = "".join(f"<td>{_e(_short(trial.params.get(k, '')))}</td>" for k in keys)
        best = _num(trial.best) + (f" (epoch {trial.best_epoch})" if trial.best_epoch else "")
        body.append(
            f'<tr class="{css}"><td>{_e(trial.trial_id)}</td>{cells}'
            f'<td class="num">{_e(trial.epochs)}</td><td class="num">{_e(best)}</td>'
            f"<td>{_e(trial.status)}</td>"
            f'<td class="outcome">{_e(_outcome(trial, winner, search))}</td></tr>'
        )
    return (
        f'<h2>Trials</h2><p class="muted">Best {_e(search.metric)} first.</p><table><tr>'
        f"<th>trial</th>{head}<th>epochs run</th><th>best {_e(search.metric)}</th>"
        f"<th>run status</th><th>outcome</th></tr>{''.join(body)}</table>"
    )


def _rank(trial: Trial, mode: str) -> tuple[int, float]:
    if trial.best is None:
        return (1, 0.0)
    return (0, -trial.best if mode == "max" else trial.best)


def _short(value: str) -> str:
    """A float param at 4 significant digits (sampled learning rates have 17)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def _outcome(trial: Trial, winner: Trial | None, search: _Search) -> str:
    max_epochs = search.max_epochs
    if trial.status in ("FAILED", "KILLED"):
        return trial.status.lower()
    if trial.status == "RUNNING":
        return f"still running ({trial.epochs} epochs so far)"
    if trial.stopped_early:
        return f"stopped early by {_scheduler_name(search)} after epoch {trial.epochs}"
    if _cut_short(trial, search) and trial.epochs == 0:
        return "cut short by the search's end (tune.time_budget_s) before its first epoch"
    if _cut_short(trial, search):
        return (
            f"cut short by the search's end (tune.time_budget_s) after epoch {trial.epochs} "
            f"of {max_epochs}"
        )
    ran = f"ran all {max_epochs} epochs" if max_epochs else f"ran {trial.epochs} epochs"
    return f"winner, {ran}" if trial is winner else ran


def _winner_section(search: _Search, winner: Trial | None, confusion: Confusion | None) -> str:
    version = search.version
    if version is None:
        return (
            '<h2>Winner</h2><p class="note">No model version was registered from this run '
            "(the search may not have finished): no confusion matrix, no gate verdicts.</p>"
        )
    stored = {
        k.removeprefix(tags.METRIC_PREFIX): v
        for k, v in version.tags.items()
        if k.startswith(tags.METRIC_PREFIX)
    }
    facts = {
        "registered as": f"<code>models:/{_e(version.name)}/{_e(version.version)}</code>",
        "aliases": _e(", ".join(f"@{a}" for a in getattr(version, "aliases", []) or []) or "none"),
        "trial": _e(winner.trial_id if winner else version.run_id),
        "base model": _e(version.tags.get(tags.BASE_MODEL, "")),
    }
    if version.tags.get(tags.ICEBERG_TABLE):
        table, snapshot = (
            version.tags[tags.ICEBERG_TABLE],
            version.tags.get(tags.ICEBERG_SNAPSHOT_ID),
        )
        facts["data"] = _e(f"{table} @ snapshot {snapshot}")
    for name in ("val_accuracy", "val_macro_f1", "val_loss", "epoch"):
        if name in stored:
            facts[f"{name} (registered)"] = _e(stored[name])
    if confusion is not None:
        accuracy, macro_f1 = _accuracy_f1(confusion)
        facts["val_accuracy (re-evaluated)"] = _e(_num(accuracy))
        facts["val_macro_f1 (re-evaluated)"] = _e(_num(macro_f1))
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts.items())
    return f"<h2>Winner</h2><dl>{rows}</dl>"


def _accuracy_f1(confusion: Confusion) -> tuple[float, float]:
    from jobs.tasks import classification_metrics

    figures = classification_metrics(confusion.counts)
    return figures["accuracy"], figures["macro_f1"]


def _confusion_section(confusion: Confusion | None, figures: list[str]) -> str:
    if confusion is None:
        return ""
    figure = figures[0]
    pairs = confused_pairs(confusion)
    pair_rows = "".join(
        f'<tr><td>{_e(t)}</td><td>{_e(p)}</td><td class="num">{n}</td>'
        f'<td class="num">{_e(_num(n / max(1, _label_rows(confusion, t)), 2))}</td></tr>'
        for t, p, n in pairs
    )
    pairs_table = (
        "<table><tr><th>true label</th><th>predicted as</th><th>rows</th>"
        f"<th>share of the label's rows</th></tr>{pair_rows}</table>"
        if pairs
        else "<p>No mistakes.</p>"
    )
    return (
        f'<h2>Confusion matrix</h2><p class="muted">The winner evaluated again on '
        f"{confusion.rows} validation rows ({_e(confusion.rows_described)}) through the "
        f'Predictor; counts in <a href="confusion_matrix.csv">confusion_matrix.csv</a>.</p>'
        f'<a href="{_e(figure)}"><img src="{_e(figure)}" alt="confusion matrix"></a>'
        f"<h3>Most confused pairs</h3>{pairs_table}{_worst_labels(confusion)}"
    )


def _label_rows(confusion: Confusion, label: str) -> int:
    return int(confusion.counts[confusion.labels.index(label)].sum())


def _worst_labels(confusion: Confusion) -> str:
    """The labels with the lowest recall, each with what it is mistaken for most."""
    counts, labels = confusion.counts, confusion.labels
    found = []
    for i, label in enumerate(labels):
        total = int(counts[i].sum())
        if total == 0:
            continue
        errors = counts[i].copy()
        errors[i] = 0
        instead = labels[int(errors.argmax())] if errors.any() else ""
        found.append((counts[i, i] / total, label, total, instead))
    found.sort()
    rows = "".join(
        f'<tr><td>{_e(label)}</td><td class="num">{total}</td>'
        f'<td class="num">{_e(_num(recall, 3))}</td><td>{_e(instead)}</td></tr>'
        for recall, label, total, instead in found[:_WORST_LABELS]
        if recall < 1.0
    )
    if not rows:
        return ""
    return (
        "<h3>Hardest labels</h3><table><tr><th>true label</th><th>rows</th><th>recall</th>"
        f"<th>most often predicted instead</th></tr>{rows}</table>"
    )


def _slices_section(config: LifecycleConfig, confusion: Confusion | None) -> str:
    if confusion is None:
        return ""
    if not config.promote.slices:
        return (
            '<h2>Per-slice accuracy</h2><p class="note">No <code>promote.slices</code> in the '
            "config: pass the --config the run was made with to see them.</p>"
        )
    rows = "".join(
        f'<tr><td>{_e(name)}</td><td class="num">{confusion.slice_rows.get(name, 0)}</td>'
        f'<td class="num">{_e(_num(value))}</td></tr>'
        for name, value in sorted(confusion.slices.items(), key=lambda kv: kv[1])
    )
    return (
        '<h2>Per-slice accuracy</h2><p class="muted">Slices of labels from '
        "<code>promote.slices</code>, worst first, on the same rows.</p><table><tr><th>slice"
        f"</th><th>rows</th><th>accuracy</th></tr>{rows}</table>"
    )


def _gates_section(config: LifecycleConfig, search: _Search) -> str:
    version = search.version
    if version is None:
        return ""
    verdicts = gate_verdicts(version.tags)
    if not verdicts:
        command = f"raylift promote --config FILE --best-of {search.run.info.run_id}"
        if search.kind == "finetune":
            command = f"raylift promote --config FILE --version {version.version}"
        return (
            '<h2>Promotion gates</h2><p class="note">Not promoted yet: no gate verdict is '
            f"recorded on version {_e(version.version)}. Run <code>{_e(command)}</code>.</p>"
        )
    parts = ["<h2>Promotion gates</h2>"]
    for alias, (overall, checks) in verdicts.items():
        css = "pass" if overall == "passed" else "fail"
        rows = "".join(_gate_row(gate, fields) for gate, fields in checks.items())
        parts.append(
            f'<p>@{_e(alias)}: <span class="{css}">{_e(overall)}</span></p><table><tr>'
            "<th>gate</th><th>verdict</th><th>value</th><th>threshold</th><th>at</th></tr>"
            f"{rows}</table>"
        )
    return "".join(parts)


def _gate_row(gate: str, fields: dict[str, str]) -> str:
    verdict = fields.get("verdict", "")
    css = "pass" if verdict == "passed" else "fail"
    return (
        f'<tr><td>{_e(gate)}</td><td class="{css}">{_e(verdict)}</td>'
        f'<td class="num">{_e(fields.get("value", ""))}</td>'
        f'<td class="num">{_e(fields.get("threshold", ""))}</td>'
        f"<td>{_e(fields.get('at', ''))}</td></tr>"
    )


def gate_verdicts(version_tags: dict[str, str]) -> dict[str, tuple[str, dict[str, dict[str, str]]]]:
    """alias → (overall verdict, gate → {verdict, value, threshold, at}) from a version's tags
    (the names serving.tags owns: gate_tag, gate_check_tag), the latest attempt's checks only.

    promote deletes an earlier attempt's checks before it writes its own; one that stopped
    half-way could leave some, which carry an older `at` than the latest attempt's."""
    prefix = tags.gate_tag("")
    aliases = [
        k[len(prefix) :]
        for k in version_tags
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    ]
    found = {}
    for alias in sorted(aliases):
        checks: dict[str, dict[str, str]] = {}
        head = tags.gate_tag(alias) + "."
        for key, value in version_tags.items():
            if not key.startswith(head):
                continue
            gate, _, name = key[len(head) :].rpartition(".")
            if gate and name in tags.GATE_FIELDS:
                checks.setdefault(gate, {})[name] = value
        found[alias] = (version_tags[tags.gate_tag(alias)], _latest_attempt(checks))
    return found


def _latest_attempt(checks: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The checks stamped with the newest `at` (one attempt stamps all its checks alike)."""
    latest = max((c.get("at", "") for c in checks.values()), default="")
    return {gate: c for gate, c in sorted(checks.items()) if c.get("at", "") == latest}


if __name__ == "__main__":
    import sys

    from jobs.cli import main as raylift

    sys.exit(raylift(["report", *sys.argv[1:]]))  # the same arguments as raylift report
