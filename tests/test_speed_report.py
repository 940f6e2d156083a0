"""The speed report's tokens/s is the steady one: a short run's first step (compilation) and its evaluation and
saving must not turn into an epoch estimate several times too long (seen on an H200: 35 h by the runtime, ~8 h)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from utils import training
from utils.training import StepTimer, speed_report


@pytest.fixture
def timed(monkeypatch):
    """A StepTimer that saw a 5-s first step, then three 1-s steps of 100 tokens each; its trainer's runtime (20 s)
    also counts an evaluation and saving."""
    clock = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])
    timer, state = StepTimer(), SimpleNamespace(num_input_tokens_seen=0)
    for seconds in (5.0, 1.0, 1.0, 1.0):
        timer.on_step_begin(None, state, None)
        clock[0] += seconds
        state.num_input_tokens_seen += 100
        timer.on_step_end(None, state, None)
    return timer


def test_steady_speed_leaves_out_the_first_step(timed):
    assert timed.steps == [(5.0, 100), (1.0, 100), (1.0, 100), (1.0, 100)]
    assert timed.steady() == (1.0, 100.0)


def test_a_single_step_gives_no_speed():
    """One step's time is mostly compiling and warming up: no "tokens/s after the first step" from it."""
    timer = StepTimer()
    timer.steps = [(2.0, 50)]
    assert timer.steady() is None and StepTimer().steady() is None
    trainer = SimpleNamespace(
        state=SimpleNamespace(log_history=[{"train_runtime": 3.0}], global_step=1, num_input_tokens_seen=50),
        callback_handler=SimpleNamespace(callbacks=[timer]),
        train_dataset=[0] * 7,
    )
    report = speed_report(trainer)
    assert report["tokens_per_second"] is None and report["ultrachat_200k_epoch_hours_at_this_speed"] is None


def test_speed_report_uses_the_steady_speed(timed):
    trainer = SimpleNamespace(
        state=SimpleNamespace(log_history=[{"train_runtime": 20.0}], global_step=4, num_input_tokens_seen=400),
        callback_handler=SimpleNamespace(callbacks=[timed]),
        train_dataset=[0] * 7,
    )
    report = speed_report(trainer)
    assert (report["steps"], report["packed_rows"], report["train_runtime_s"]) == (4, 7, 20.0)
    assert (report["seconds_per_step"], report["tokens_per_second"], report["tokens_per_second_overall"]) == (
        1.0,
        100.0,
        20.0,
    )
    hours = report["ultrachat_200k_epoch_tokens"] / 100.0 / 3600
    assert report["ultrachat_200k_epoch_hours_at_this_speed"] == round(hours, 1)


def test_a_resumed_run_counts_only_this_session():
    """train_runtime is this session's: the checkpoint's steps and tokens must not be divided by it."""
    trainer = SimpleNamespace(
        state=SimpleNamespace(log_history=[{"train_runtime": 10.0}], global_step=8, num_input_tokens_seen=800),
        callback_handler=SimpleNamespace(callbacks=[]),  # no step times: the runtime is all there is
        train_dataset=[0] * 7,
        _initial_global_step=4,
        _initial_num_input_tokens_seen=400,
    )
    report = speed_report(trainer)
    assert (report["steps"], report["tokens_seen"]) == (8, 800)
    assert (report["seconds_per_step"], report["tokens_per_second"], report["tokens_per_second_overall"]) == (
        2.5,
        40.0,
        40.0,
    )
