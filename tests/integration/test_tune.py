"""A real Ray Tune search: 4 trials of the tiny BERT, each a Ray Train run of the same train loop
(DeepSpeed, one worker) over one pinned Iceberg snapshot; ASHA stops the weak ones; MLflow holds
a parent run with a nested run per trial; the winner alone is registered, with its lineage.

The search is also the resume test (each search is several Train runs, the suite's costliest
kind): `python -m jobs.tune` is SIGKILLed once a trial has finished, then resumed in-process, and
every test here reads the resumed result. The synchronous-halving scheduler (`tune.scheduler:
sha`, paused trials included) is tested against Tune's own runner in tests/unit/test_halving.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow.fs
import pytest
import yaml

from jobs import load, tune
from jobs.config import config_hash, with_overrides
from serving import tags
from tests.helpers import TINY_SCORE, make_ticket_rows, session_ray_address, tiny_lifecycle

LABELS = ["card_arrival", "lost_card", "refund"]
# ASHA's rungs are epochs 1 and 2. A tiny epoch takes about a second, so a stop can land an
# epoch after ASHA decided it (seen: every trial reported 2 of 2 epochs): epochs 3 and 4 are the
# slack that keeps a stopped trial below max_t.
EPOCHS = 4
LEARNS_FIRST = [3.0e-2, 3.0e-2, 1.0e-6, 3.0e-2]  # train.learning_rate of trials 0-3 (tune.seed)


def _config(root: Path, tiny_bert: str):
    return tiny_lifecycle(
        root,
        tiny_bert,
        make_ticket_rows(90, LABELS, seed=5),
        name="tune-tiny",
        train={
            "num_workers": 1,
            # 0.5-CPU workers: two trials (0.5 + 1.5 data CPUs each) fit the embedded Ray's
            # 4 logical CPUs at once
            "cpus_per_worker": 0.5,
            "epochs": EPOCHS,
            "precision": "fp32",
            "zero_stage": 0,
        },
        tune={
            "search_space": {
                # a rate that learns nothing beside ones that learn: val_loss parts them
                "train.learning_rate": {"type": "choice", "values": [1.0e-6, 3.0e-2]},
                "model.lora.r": {"type": "randint", "low": 2, "high": 8},
                "train.head_learning_rate": {"type": "loguniform", "low": 1e-2, "high": 5e-2},
            },
            "num_samples": 4,
            "metric": "val_loss",  # continuous: no ties at an ASHA rung
            "mode": "min",
            "asha": {"grace_period": 1, "reduction_factor": 2},
            # Seed 4 draws the rates LEARNS_FIRST: the two trials that start first learn, and
            # the non-learner starts once one of them has ended, so the first rung holds only
            # learners' values when it arrives there, and ASHA stops it whatever order the
            # trials reach the rung in. (Seed 3 drew [3e-2, 1e-6, 1e-6, 3e-2]:
            # a non-learner could reach the rung first, a second one a hair better than it next,
            # and nothing was stopped.)
            "seed": 4,
            "max_concurrent_trials": 2,
        },
        registry={"experiment": "tune", "model_name": "tune-tiny"},
        # promote's evaluation in the report test: one half-CPU Predictor, not two of 1 CPU
        score=TINY_SCORE,
    )


@dataclass
class Killed:
    """What the killed driver left: the trials it finished and the MLflow runs of each trial."""

    finished: set[str]
    runs_before: dict[str, list]
    parent_run_id: str
    driver_log: str  # what `python -m jobs.tune` printed (its stdout was a file, not a terminal)
    stats_actors_died: set[str]  # Ray Data stats actors that died during the two searches
    resumed_log: list[str]  # what jobs.tune logged in the resumed driver (this process)
    resumed_at_ms: int  # when the resumed driver started (MLflow's clock: epoch milliseconds)


class _LogLines(logging.Handler):
    """Every line the loggers `names` write at INFO and above while the block runs."""

    def __init__(self, *names: str):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._loggers = [logging.getLogger(name) for name in names]
        self._levels = [logger.level for logger in self._loggers]

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _LogLines:
        for logger in self._loggers:
            logger.setLevel(logging.INFO)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for logger, level in zip(self._loggers, self._levels, strict=True):
            logger.removeHandler(self)
            logger.setLevel(level)


def _dead_stats_actors() -> set[str]:
    """Ray Data's stats actors (the detached `datasets_stats_actor`) that have died so far."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("name", "=", "datasets_stats_actor")], detail=True, limit=1000)
    return {a.actor_id for a in actors if a.state == "DEAD"}


@pytest.fixture(scope="module")
def killed_and_resumed(ray_session, tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("tune")
    config = _config(root, tiny_bert)
    config_file = root / "tune.yaml"
    # Unsorted: the search space's key order is the order the searcher draws in, so sorting the
    # keys would change the samples from those of the config the tests read.
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    load.main(config)
    dead_before = _dead_stats_actors()
    driver_log = root / "driver.log"
    finished = _kill_after_a_trial_finished(config, config_file, driver_log)
    parent_run_id = json.loads(
        (Path(tune._experiment_path(config)) / "raylift_tune.json").read_text()
    )["parent_run_id"]
    runs_before = _runs_by_trial(config, parent_run_id)
    with pytest.raises(ValueError, match="unfinished search .* --resume"):
        tune.main(config)  # a fresh start would silently drop the finished trials
    resumed_at_ms = int(time.time() * 1000)
    # The search's callbacks (_TrialRuns, _TrialLines) come back from the experiment as the
    # killed `python -m jobs.tune` pickled them: classes of its __main__, logging there.
    with _LogLines("jobs.tune", "__main__") as resumed:
        result = tune.main(config, resume=True)
    died = _dead_stats_actors() - dead_before
    killed = Killed(
        finished,
        runs_before,
        parent_run_id,
        driver_log.read_text(),
        died,
        resumed.lines,
        resumed_at_ms,
    )
    return config, result, killed


@pytest.fixture(scope="module")
def searched(killed_and_resumed):
    config, result, _ = killed_and_resumed
    return config, result


def _client(config):
    from mlflow import MlflowClient

    from serving.registry import absolute_tracking_uri

    return MlflowClient(absolute_tracking_uri(config.registry.tracking_uri))


def _reported(config) -> dict[str, tuple[dict[int, float], Any]]:
    """Each trial's val_loss per epoch as Tune wrote it in the trial's folder (result.json),
    and the stop its scheduler recorded there: read from the files, not through jobs.tune."""
    from jobs.scheduler_stops import recorded_stop

    trials = {}
    for results in Path(tune._experiment_path(config)).glob("*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        losses = {r["epoch"]: r["val_loss"] for r in rows if "epoch" in r}
        stop = recorded_stop(str(results.parent), pyarrow.fs.LocalFileSystem())
        trials[rows[0]["trial_id"]] = (losses, stop)
    return trials


def _index(trial) -> int:
    return int(trial.trial_id.rsplit("_", 1)[1])


def test_asha_stopped_a_trial_early_and_let_one_finish(searched):
    config, result = searched
    assert len(result.trials) == 4
    assert all(t.status == "TERMINATED" for t in result.trials)
    # the draw that makes the stop certain (see _config): trial ids end in the trial's index
    drawn = [t.params["train.learning_rate"] for t in sorted(result.trials, key=_index)]
    assert drawn == LEARNS_FIRST, drawn
    reported = _reported(config)
    stops = {trial_id: stop for trial_id, (_, stop) in reported.items() if stop is not None}
    assert stops, f"ASHA recorded no stop: {reported}"
    assert {t.trial_id for t in result.trials if t.stopped_early} == set(stops)
    # No time budget here: every trial ASHA did not stop ran every epoch.
    assert all(t.epochs == EPOCHS for t in result.trials if not t.stopped_early)
    assert not any(t.cut_short for t in result.trials)
    for trial_id, stop in stops.items():
        assert (stop.scheduler, stop.metric) == ("asha", "val_loss")
        assert stop.epoch in (1, 2), stop  # a rung (grace 1, factor 2), below max_t
        losses, _ = reported[trial_id]
        assert stop.value == pytest.approx(losses[stop.epoch])
        # ASHA stops a trial below its rung's cutoff, which the rung's best never is (mode min).
        # The trial folders may not hold every value the scheduler saw at the rung (a search
        # killed and resumed: seen once here, the stopped trial's own value alone), so the
        # comparison is made where another trial's value at the rung is there.
        rung = [at[stop.epoch] for tid, (at, _) in reported.items() if stop.epoch in at]
        if len(rung) > 1:
            assert stop.value > min(rung), (trial_id, stop, rung)


def test_ray_datas_stats_actor_outlives_every_trial(killed_and_resumed):
    """Each trial's datasets report to Ray Data's one stats actor. Started by a trial, it would
    sit in that trial's placement group and die with it, to be started again by the next trial;
    the search's driver starts it first (jobs.warehouse._ray_internal.start_data_stats_actor)."""
    _, _, killed = killed_and_resumed
    assert not killed.stats_actors_died, f"stats actors died: {killed.stats_actors_died}"


def test_parent_run_has_a_nested_run_per_trial_with_params_and_epoch_metrics(searched):
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    config, result = searched
    client = _client(config)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["tune.num_samples"] == "4"
    nested = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{result.parent_run_id}'",
    )
    assert len(nested) == 4
    by_run = {t.run_id: t for t in result.trials}
    assert set(by_run) == {r.info.run_id for r in nested}
    for run in nested:
        trial = by_run[run.info.run_id]
        assert run.info.status == "FINISHED"
        assert run.data.tags[tags.TUNE_TRIAL_ID] == trial.trial_id
        assert run.data.tags[tags.TUNE_STOPPED_EARLY] == str(trial.stopped_early).lower()
        sampled = float(run.data.params["search.train.learning_rate"])
        assert sampled == trial.params["train.learning_rate"]
        assert run.data.params["model.lora.r"] == str(trial.params["model.lora.r"])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
        # A stopped trial may have trained (and logged) one more epoch while Tune was stopping
        # it: the run holds every epoch trained, at least the ones Tune saw.
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= trial.epochs
        if not trial.stopped_early:
            assert steps == list(range(1, EPOCHS + 1))
    # The driver handed each trial its run in Ray's key-value store, and cleared it after.
    from ray.experimental import internal_kv

    assert internal_kv._internal_kv_list(f"{result.parent_run_id}/", namespace="raylift-tune") == []


def test_exactly_the_winner_is_registered_with_its_lineage(searched):
    config, result = searched
    client = _client(config)
    versions = client.search_model_versions(f"name='{config.registry.model_name}'")
    assert [str(v.version) for v in versions] == [result.version] == ["1"]
    version = versions[0]
    winner = next(t for t in result.trials if t.trial_id == result.winner_trial_id)
    assert version.run_id == result.winner_run_id == winner.run_id
    assert version.tags[tags.TUNE_TRIAL_ID] == winner.trial_id
    assert version.tags[tags.TUNE_PARENT_RUN_ID] == result.parent_run_id
    assert version.tags[tags.CONFIG_HASH] == config_hash(with_overrides(config, winner.params))
    assert version.tags[tags.CONFIG_HASH] != config_hash(config)  # the sample, not the base
    from jobs import warehouse

    snapshot = warehouse.table_snapshot(config.catalog, config.data.table)
    assert version.tags[tags.ICEBERG_SNAPSHOT_ID] == str(snapshot)
    # the best epoch of any trial won (mode=min)
    best = min(t.best_metric for t in result.trials if t.best_metric is not None)
    assert result.metrics["val_loss"] == pytest.approx(best)
    assert tags.read_metric(version.tags, "val_loss") == pytest.approx(best, abs=1e-6)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_report_shows_every_trial_where_asha_stopped_and_the_winners_mistakes(searched, tmp_path):
    """raylift report on this search, once promote has recorded its verdicts on the winner."""
    from jobs import promote, report

    config, result = searched
    with contextlib.suppress(promote.GateRefused):  # refused or passed, the verdicts are tagged
        promote.main(config, best_of=result.parent_run_id)
    slices = {"card_arrival": "cards", "lost_card": "cards", "refund": "payments"}
    made = report.main(
        with_overrides(config, {"promote.slices": slices}), result.parent_run_id, str(tmp_path)
    )

    page = (tmp_path / "report.html").read_text()
    assert made.html == str(tmp_path / "report.html") and made.kind == "tune"
    for trial in result.trials:
        assert f"<td>{trial.trial_id}</td>" in page
        if trial.stopped_early:
            assert f'<tr class="stopped"><td>{trial.trial_id}</td>' in page
            assert f"stopped early by ASHA after epoch {trial.epochs}" in page
    assert f'<tr class="winner"><td>{result.winner_trial_id}</td>' in page
    for name in ("curves.png", "confusion.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    assert 'src="curves.png"' in page and 'src="confusion.png"' in page
    version = _client(config).get_model_version(config.registry.model_name, result.version)
    validation_rows = int(version.tags[tags.VALIDATION_ROWS])
    counts = [
        row.split(",")[1:]
        for row in (tmp_path / "confusion_matrix.csv").read_text().splitlines()[1:]
    ]
    assert sum(int(n) for row in counts for n in row) == validation_rows == made.validation_rows
    assert "<td>cards</td>" in page and "<td>payments</td>" in page
    assert "Not promoted yet" not in page
    assert "@production: <span" in page and "<td>floor</td>" in page


def test_report_of_one_run_draws_its_curves(searched, tmp_path):
    """A run without trials (here a trial that was not registered) is one curve, no winner."""
    from jobs import report

    config, result = searched
    loser = next(t for t in result.trials if t.trial_id != result.winner_trial_id)
    made = report.main(config, loser.run_id, str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert made.kind == "finetune" and made.trials == 1 and made.winner_version is None
    assert "No model version was registered" in page
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (tmp_path / "confusion.png").exists()


def _trial_statuses(experiment: str) -> dict[str, str]:
    """Each trial's status in Tune's own experiment state (what a restore reads)."""
    statuses = {}
    for state in Path(experiment).glob("experiment_state-*.json"):
        with contextlib.suppress(ValueError):  # caught mid-write
            for trial_json, _ in json.loads(state.read_text())["trial_data"]:
                trial = json.loads(trial_json)
                statuses[trial["trial_id"]] = trial["status"]
    return statuses


def _runs_by_trial(config, parent_run_id: str) -> dict[str, list]:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = _client(config)
    experiment = client.get_experiment_by_name(config.registry.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
    )
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags[tags.TUNE_TRIAL_ID], []).append(run)
    return by_trial


def _kill_after_a_trial_finished(config, config_file: Path, log: Path) -> set[str]:
    """Run `python -m jobs.tune` on this Ray; SIGKILL it once a trial has finished while
    another runs (the two first trials can also end together, with no trial yet running: in
    CI, one stopped at its first rung just before the other finished). Returns the finished."""
    experiment = tune._experiment_path(config)
    # Tune saves its experiment state (what a restore reads) at most every 10 s by default:
    # the driver saves it every second, so the kill lands about a second after the first trial
    # ends rather than up to 10 s later (while the second trial starts, and is then lost).
    env = {
        **os.environ,
        "RAY_ADDRESS": session_ray_address(),
        "TUNE_GLOBAL_CHECKPOINT_S": "1",
    }
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.tune", "--config", str(config_file)],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while True:
        statuses = _trial_statuses(experiment)
        done = {trial for trial, status in statuses.items() if status == "TERMINATED"}
        if done and "RUNNING" in statuses.values():
            break
        assert driver.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no trial ended beside a running one: {statuses}"
        time.sleep(0.2)
    driver.kill()
    assert driver.wait(timeout=30) == -signal.SIGKILL
    assert not psutil.pid_exists(driver.pid) or psutil.Process(driver.pid).status() == "zombie"
    return done


def test_a_killed_search_resumes_without_rerunning_its_finished_trials(killed_and_resumed):
    """The driver was SIGKILLed about a second after its first trial ended (Tune's experiment
    state, what a restore reads, held it as TERMINATED); `--resume` went on from there."""
    config, result, killed = killed_and_resumed
    assert len(killed.finished) >= 1  # the kill came after a trial had ended ...
    assert len(killed.finished) < len(result.trials)  # ... and before the search had
    assert result.parent_run_id == killed.parent_run_id
    assert {t.trial_id for t in result.trials} >= killed.finished
    runs = _runs_by_trial(config, result.parent_run_id)
    # Not rerun, and not reopened: each trial has one run, and a trial that had a run before
    # the kill (finished, or cut off mid-run and started again) kept it.
    assert {trial_id: len(r) for trial_id, r in runs.items()} == {
        t.trial_id: 1 for t in result.trials
    }
    for trial_id, before in killed.runs_before.items():
        assert [r.info.run_id for r in runs[trial_id]] == [r.info.run_id for r in before]
    by_id = {t.trial_id: t for t in result.trials}
    for trial_id in killed.finished:
        assert by_id[trial_id].run_id == killed.runs_before[trial_id][0].info.run_id
    # A trial cut off mid-run continued it: its epochs are logged once each, in order (the
    # nested-run test checks every trial's history).
    cut_off = set(killed.runs_before) - killed.finished
    assert cut_off, f"no trial was running at the kill: {killed.runs_before}"
    # Tune started none of the finished trials again (a restarted trial continues its own run,
    # so the one-run-per-trial check above cannot see it): the resumed driver announces each
    # trial it starts, and a Train run continued from its checkpoint logs RESUME_METRIC.
    from jobs.train_loop import RESUME_METRIC

    def started(trial_id: str) -> list[str]:
        said = ("continuing run", " started: ")
        return [
            line for line in killed.resumed_log if trial_id in line and any(s in line for s in said)
        ]

    # The trials left unfinished at the kill were started, and the log shows it:
    assert any(started(t.trial_id) for t in result.trials), killed.resumed_log
    client = _client(config)
    for trial_id in killed.finished:
        assert not started(trial_id), f"finished trial {trial_id} ran again: {started(trial_id)}"
        resumes = client.get_metric_history(by_id[trial_id].run_id, RESUME_METRIC)
        assert not [m for m in resumes if m.timestamp >= killed.resumed_at_ms], trial_id


def test_a_search_logged_to_a_file_prints_lines_not_tables(killed_and_resumed):
    """Off a terminal (`ray job logs`, CI) the driver prints a line per trial event instead of
    Tune's status table every 30 s and a boxed config per trial, and its workers' lines carry
    no terminal colour codes."""
    _, _, killed = killed_and_resumed
    log = killed.driver_log
    assert "Trial status:" not in log and "started with configuration" not in log
    assert "\x1b[36m(" not in log  # Ray's coloured "(Actor pid=N)" prefix
    assert "(TrainController pid=" in log  # the workers' lines are still there
    started = [line for line in log.splitlines() if "tune: trial " in line and " started: " in line]
    assert started and all("train.learning_rate=" in line for line in started)
    for trial_id in killed.finished:
        assert re.search(
            rf"tune: trial {trial_id} (stopped early after epoch \d|finished its {EPOCHS} epochs)",
            log,
        ), log[-3000:]


@pytest.fixture(scope="module")
def halved(ray_session, tmp_path_factory, tiny_bert):
    """A search under the sha scheduler: 2 trials running at once, one rung (epoch 1, factor 2).
    The first to reach the rung waits there, holding its CPUs (no other trial wants them); the
    second decides the rung, which keeps one of the two."""
    root = tmp_path_factory.mktemp("tune-sha")
    config = with_overrides(
        _config(root, tiny_bert),
        {
            "tune.scheduler": "sha",
            "tune.num_samples": 2,
            "train.epochs": 2,
            # a gate that never opened would hang the search: this ends it, and the test fails
            "tune.time_budget_s": 600,
            "registry.model_name": "tune-tiny-sha",
        },
    )
    load.main(config)
    with _LogLines("jobs.tune", "jobs.halving") as lines:
        result = tune.main(config)
    return config, result, lines.lines


def test_sha_holds_the_first_trial_at_its_rung_and_the_kept_one_goes_on_without_a_restart(
    halved,
):
    """Whichever the rung keeps, nobody restarts: the held one goes on in its Train run (Tune
    asks it for results again), or the rung stops it; the other, the current one, goes on or
    stops as it reports. (A held trial that Tune still had a call for results out to did not
    stop until Tune's forced cleanup, 600 s later: tests/unit/test_halving.py asks for none.)"""
    config, result, lines = halved
    assert [t.status for t in result.trials] == ["TERMINATED"] * 2
    held = [line for line in lines if " held at the rung after epoch 1 " in line]
    assert len(held) == 1, lines
    assert not [line for line in lines if " paused at the rung " in line], lines
    reported = _reported(config)
    stops = {trial_id: stop for trial_id, (_, stop) in reported.items() if stop is not None}
    assert [(s.scheduler, s.epoch) for s in stops.values()] == [("sha", 1)], reported
    (kept,) = set(reported) - set(stops)
    assert sorted(reported[kept][0]) == [1, 2]  # it trained its 2 epochs
    for trial in result.trials:  # each Train run started once: nobody was paused and resumed
        started = [line for line in lines if f"tune: trial {trial.trial_id} started" in line]
        assert len(started) == 1, lines
    for results in Path(tune._experiment_path(config)).glob("*/result.json"):  # never restored
        for row in map(json.loads, results.read_text().splitlines()):
            assert row["iterations_since_restore"] == row["training_iteration"], row
