"""Progress output: bars on a terminal, concise lines in a log (CI, `make demo > log`)."""

from __future__ import annotations

import io
import os

import pytest
from ray.data import DataContext

from cluster.runtime import configure_progress, progress_bars_wanted

QUIET_ENV = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_progress_state(monkeypatch):
    """Undo what configure_progress changes: the DataContext and the driver's env."""
    context = DataContext.get_current()
    for attr in ("use_ray_tqdm", "enable_operator_progress_bars", "enable_progress_bars"):
        monkeypatch.setattr(context, attr, getattr(context, attr))
    for name in QUIET_ENV:
        monkeypatch.setenv(name, "unset-by-test")  # recorded, so teardown restores the original
        monkeypatch.delenv(name)
    monkeypatch.delenv("RAYLIFT_PROGRESS_BARS", raising=False)
    return context


def test_bars_on_a_terminal_lines_in_a_log(clean_progress_state):
    assert progress_bars_wanted(_Terminal()) is True
    assert progress_bars_wanted(io.StringIO()) is False  # a file, a pipe, pytest's capture
    assert progress_bars_wanted(object()) is False  # a stream without isatty


@pytest.mark.parametrize("forced, expected", [("1", True), ("0", False)])
def test_the_choice_can_be_forced(forced, expected, clean_progress_state, monkeypatch):
    monkeypatch.setenv("RAYLIFT_PROGRESS_BARS", forced)
    assert progress_bars_wanted(_Terminal()) is expected
    assert progress_bars_wanted(io.StringIO()) is expected


def test_off_a_terminal_ray_data_logs_lines_and_workers_draw_no_bars(clean_progress_state):
    context = clean_progress_state
    env = configure_progress(bars=False)
    # use_ray_tqdm on is what makes a Ray worker (Train's split coordinator) draw bars that
    # the driver redraws into the log; with it off, Ray Data logs progress lines there.
    assert (context.use_ray_tqdm, context.enable_operator_progress_bars) == (False, False)
    assert context.enable_progress_bars  # the periodic progress lines stay
    assert env == {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    assert {name: os.environ[name] for name in QUIET_ENV} == env


def test_on_a_terminal_the_bars_stay(clean_progress_state):
    context = clean_progress_state
    context.use_ray_tqdm = context.enable_operator_progress_bars = False
    assert configure_progress(bars=True) == {}
    assert (context.use_ray_tqdm, context.enable_operator_progress_bars) == (True, True)
    assert not any(name in os.environ for name in QUIET_ENV)
