"""raylift report's page and plots from hand-made runs (no Ray, no MLflow), and raylift ui's
server command line."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest

from jobs import report, ui
from jobs.config import LifecycleConfig
from serving import tags

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = '<script>alert("x")</script>'


def _trial(trial_id: str, values: list[float], stopped: bool, run_id: str) -> report.Trial:
    curves = {"val_accuracy": list(enumerate(values, start=1))}
    curves["val_loss"] = [(e, 1 - v) for e, v in curves["val_accuracy"]]
    best_epoch, best = max(curves["val_accuracy"], key=lambda p: p[1])
    return report.Trial(
        trial_id=trial_id,
        run_id=run_id,
        status="FINISHED",
        params={"train.learning_rate": "0.00123456789", "note": EVIL},
        epochs=len(values),
        stopped_early=stopped,
        curves=curves,
        best=best,
        best_epoch=best_epoch,
    )


def _search(version_tags: dict[str, str]) -> report._Search:
    run = SimpleNamespace(
        info=SimpleNamespace(
            run_id="parent123",
            run_name=EVIL,
            status="FINISHED",
            start_time=1_700_000_000_000,
            end_time=1_700_000_600_000,
        ),
        data=SimpleNamespace(tags={tags.CONFIG_NAME: EVIL}, params={"tune.scheduler": "asha"}),
    )
    version = SimpleNamespace(
        name="tiny", version="3", run_id="run-b", tags=version_tags, aliases=["production"]
    )
    trials = [
        _trial("trial_a", [0.3, 0.35], True, "run-a"),
        _trial("trial_b", [0.4, 0.6, 0.8, 0.82], False, "run-b"),
        _trial(EVIL, [0.2], True, "run-c"),
        _trial("trial_cut", [0.25, 0.3, 0.31], False, "run-d"),  # tune.time_budget_s cut it
    ]
    return report._Search(run, "tune", "val_accuracy", "max", 4, trials, version)


def _confusion() -> report.Confusion:
    truth = np.array(["a", "a", "a", "b", "b", "c", "c", "c"], dtype=object)
    predicted = np.array(["a", "b", "b", "b", None, "c", "a", "c"], dtype=object)
    labels, counts = report.confusion_matrix(truth, predicted)
    accuracy, rows = {"x": 0.5}, {"x": 4}
    return report.Confusion(labels, counts, "t@1 validation", accuracy, rows)


def test_confusion_matrix_counts_every_row_once_with_a_column_for_no_prediction():
    confusion = _confusion()
    assert confusion.labels == ["a", "b", "c", "(no prediction)"]
    assert confusion.rows == 8
    assert confusion.counts[0].tolist() == [1, 2, 0, 0]  # a: once right, twice as b
    assert confusion.counts[1].tolist() == [0, 1, 0, 1]  # b: once unscored
    assert report.confused_pairs(confusion) == [
        ("a", "b", 2),
        ("c", "a", 1),
        ("b", "(no prediction)", 1),
    ]


def test_gate_verdicts_are_read_back_from_the_tag_names_promote_writes():
    version_tags = {
        tags.gate_tag("production"): "refused",
        tags.gate_check_tag("production", "floor", "verdict"): "passed",
        tags.gate_check_tag("production", "floor", "value"): "0.91",
        tags.gate_check_tag("production", "slice.cards", "verdict"): "refused",
        tags.gate_check_tag("production", "slice.cards", "threshold"): "0.8",
        tags.metric_tag("val_accuracy"): "0.91",
    }
    verdicts = report.gate_verdicts(version_tags)
    assert list(verdicts) == ["production"]
    overall, checks = verdicts["production"]
    assert overall == "refused"
    assert checks["floor"] == {"verdict": "passed", "value": "0.91"}
    assert checks["slice.cards"] == {"verdict": "refused", "threshold": "0.8"}
    assert report.gate_verdicts({tags.metric_tag("val_accuracy"): "0.9"}) == {}


def test_gate_verdicts_show_the_latest_attempt_only():
    """Checks an interrupted earlier attempt left (an older `at`) are not shown beside the
    latest attempt's."""
    earlier, later = "2026-11-20T10:00:00+00:00", "2026-11-21T09:30:00+00:00"
    version_tags = {tags.gate_tag("production"): "passed"}
    for gate, verdict, at in [
        ("base_model", "refused", earlier),
        ("slice.cards", "refused", earlier),
        ("floor", "passed", later),
        ("regression", "passed", later),
    ]:
        version_tags[tags.gate_check_tag("production", gate, "verdict")] = verdict
        version_tags[tags.gate_check_tag("production", gate, "at")] = at
    overall, checks = report.gate_verdicts(version_tags)["production"]
    assert overall == "passed" and list(checks) == ["floor", "regression"]


def test_page_escapes_every_string_and_says_not_promoted_yet(tmp_path):
    search = _search({tags.metric_tag("val_accuracy"): "0.82"})
    winner = search.trials[1]
    figures = report._draw(tmp_path, search, winner, _confusion())
    page = report._page(LifecycleConfig(name="t"), search, winner, _confusion(), figures)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "Not promoted yet" in page and "--best-of parent123" in page
    assert '<tr class="winner"><td>trial_b</td>' in page
    assert '<tr class="stopped"><td>trial_a</td>' in page
    assert "stopped early by ASHA after epoch 2" in page
    assert '<tr class="cut"><td>trial_cut</td>' in page  # not stopped by ASHA: cut short
    assert "cut short by the search&#x27;s end (tune.time_budget_s) after epoch 3 of 4" in page
    assert "stopped early by ASHA after epoch 3" not in page
    assert "0.001235" in page  # sampled floats at 4 significant digits
    assert "http" not in page.replace("http://127", "")  # nothing fetched from outside
    for name in figures:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    csv_rows = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert sum(int(n) for row in csv_rows[1:] for n in row.split(",")[1:]) == 8


def test_page_shows_the_recorded_gate_verdicts():
    search = _search(
        {
            tags.gate_tag("production"): "passed",
            tags.gate_check_tag("production", "floor", "verdict"): "passed",
            tags.gate_check_tag("production", "floor", "value"): "0.820000",
        }
    )
    page = report._page(LifecycleConfig(name="t"), search, search.trials[1], None, ["c.png"])
    assert "Not promoted yet" not in page
    assert '@production: <span class="pass">passed</span>' in page
    assert '<td>floor</td><td class="pass">passed</td><td class="num">0.820000</td>' in page


def test_many_labels_hide_the_diagonal_so_the_mistakes_show(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([f"intent_{i:02d}" for i in range(77)], dtype=object)
    truth = rng.choice(labels, 1000)
    predicted = np.where(rng.random(1000) < 0.9, truth, rng.choice(labels, 1000))
    names, counts = report.confusion_matrix(truth, predicted)
    confusion = report.Confusion(names, counts, "rows")
    name = report._draw_confusion(tmp_path / "c.png", confusion)
    assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert confusion.rows == 1000 and len(report.confused_pairs(confusion)) == 15


def _store(tmp_path) -> LifecycleConfig:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    return LifecycleConfig(name="t", registry={"tracking_uri": f"sqlite:///{db}"})


def test_ui_serves_the_store_on_localhost_only_with_its_artifacts(tmp_path):
    command = ui.server_command(_store(tmp_path), 5123)
    assert command[1:4] == ["-m", "mlflow", "server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in " ".join(command)
    assert command[command.index("--port") + 1] == "5123"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert "--serve-artifacts" in command
    artifacts = command[command.index("--artifacts-destination") + 1]
    assert artifacts == (tmp_path / "mlartifacts").as_uri()
    assert ui.server_env()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_ui_refuses_a_remote_server_a_missing_store_and_a_busy_port(tmp_path):
    remote = LifecycleConfig(name="t", registry={"tracking_uri": "https://mlflow.example.com"})
    with pytest.raises(ValueError, match="already a tracking server"):
        ui.server_command(remote, 5000)
    missing = LifecycleConfig(name="t", registry={"tracking_uri": f"sqlite:///{tmp_path}/no.db"})
    with pytest.raises(FileNotFoundError, match="no MLflow store"):
        ui.server_command(missing, 5000)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="--port"):
            ui.main(_store(tmp_path), port=busy.getsockname()[1])


def test_curves_mark_a_scheduler_stop_and_a_time_budget_cut_apart():
    import matplotlib.pyplot as plt

    search = _search({})
    fig, ax = plt.subplots()
    for trial in search.trials:
        cut = report._cut_short(trial, search)
        report._plot_trial(ax, trial, "val_accuracy", "C0", False, cut)
    report._curves_legend(fig, ax, search)
    ends = [line for line in ax.lines if line.get_linestyle() == "None"]
    plt.close(fig)
    assert [m.get_marker() for m in ends] == ["X", "X", "|"]  # trial_a, EVIL; trial_cut
    labels = [text.get_text() for text in fig.legends[0].texts]
    assert "stopped early by ASHA" in labels
    assert "cut short by the search's end (tune.time_budget_s)" in labels
