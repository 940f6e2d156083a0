"""Notebook 04's reading and plotting of runs: the plotted series are checked, not just the files."""

import json
from pathlib import Path

import pytest

from utils import curves

LOG = [
    {"step": 1, "epoch": 0.1, "loss": 3.0, "learning_rate": 1e-4, "num_input_tokens_seen": 100},
    {"step": 2, "epoch": 0.2, "loss": 2.5, "learning_rate": 2e-4, "num_input_tokens_seen": 200},
    {"step": 2, "epoch": 0.2, "eval_loss": 2.7, "num_input_tokens_seen": 200},
    {"step": 3, "epoch": 0.3, "loss": 2.0, "learning_rate": 1e-4, "num_input_tokens_seen": 300},
    {"step": 3, "epoch": 0.3, "train_runtime": 12.5, "train_loss": 2.5},
]


@pytest.fixture
def runs_dir(tmp_path):
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "trainer_state.json").write_text(json.dumps({"log_history": LOG}))
    (tmp_path / "alpha" / "checkpoint-2").mkdir()  # checkpoints are not runs
    (tmp_path / "alpha" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": LOG[:2]}))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "beta" / "runs" / "2026"))
    for step, loss in [(1, 4.0), (2, 3.5), (3, 3.25)]:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/learning_rate", 1e-3 / step, step)
        writer.add_scalar("train/epoch", step / 10, step)
    writer.add_scalar("eval/loss", 3.4, 3)
    writer.close()
    return tmp_path


def test_find_runs_reads_trainer_state_and_tensorboard(runs_dir):
    alpha, beta = curves.find_runs(runs_dir)
    assert (alpha.name, alpha.source) == ("alpha", "trainer_state.json")
    assert alpha.train["step"] == [1, 2, 3] and alpha.train["loss"] == [3.0, 2.5, 2.0]
    assert alpha.eval["loss"] == [2.7] and alpha.runtime_s == 12.5
    assert (beta.name, beta.source) == ("beta", "tensorboard")
    assert beta.train["step"] == [1, 2, 3] and beta.train["loss"] == pytest.approx([4.0, 3.5, 3.25])
    assert beta.eval["loss"] == pytest.approx([3.4])
    assert alpha.summary() == {
        "run": "alpha",
        "train loss, start": "–",  # three logged losses: too few for the medians of a tenth
        "train loss, end": "–",
        "final eval loss": 2.7,
        "steps": 3,
        "tokens": 300,
        "runtime (s)": 12.5,
        "from": "trainer_state.json",
    }


def test_the_summary_gives_medians_of_the_first_and_last_tenth():
    losses = [10.0] * 3 + [6.0] * 24 + [2.0, 2.0, 9.0]  # the last step alone is noisy
    run = curves.RunLog("r", Path("r"), "trainer_state.json", train={"loss": losses, "step": list(range(1, 31))})
    row = run.summary()
    assert (row["train loss, start"], row["train loss, end"], row["final eval loss"]) == (10.0, 2.0, "–")


def test_ema():
    assert curves.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert curves.ema([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 2 / 3])
    assert curves.ema([5.0, 1.0], weight=0.0) == [5.0, 1.0]


@pytest.mark.parametrize("weight", [1.0, -0.1])
def test_a_smoothing_outside_0_to_1_is_one_line(weight):
    with pytest.raises(ValueError, match=r"^smoothing must be from 0 \(raw\) to below 1, got "):
        curves.ema([3.0, 2.0], weight)


def test_card_reference():
    ref = curves.card_reference()
    assert (ref["step"], ref["epoch"], ref["train_loss"], ref["eval_loss"], ref["final_eval_loss"]) == (
        272,
        0.67,
        0.9367,
        0.9397,
        0.9399,
    )
    assert ref["tokens"] == 272 * 512 * 2048


def _lines(ax):
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_plot_has_the_expected_series(runs_dir, tmp_path):
    runs = curves.find_runs(runs_dir)
    fig = curves.plot_runs(runs, curves.card_reference(), smoothing=0.5)
    loss_ax, lr_ax, card_ax = fig.axes[:3]
    lines = _lines(loss_ax)
    assert lines["alpha train"] == ([1, 2, 3], [3.0, 2.5, 2.0])
    assert lines["alpha train (EMA)"][1] == pytest.approx(curves.ema([3.0, 2.5, 2.0], 0.5))
    assert lines["alpha eval"] == ([2], [2.7])
    assert lines["beta train"][0] == [1, 2, 3]
    assert not any(label.startswith("card") for label in lines)  # the card has its own panel
    assert _lines(lr_ax)["alpha lr"] == ([1, 2, 3], [1e-4, 2e-4, 1e-4])
    assert _lines(lr_ax)["alpha cosine, 10% warm-up"] == ([1, 2, 3], [0.0, 2e-4, 1e-4])
    _check_card_panel(card_ax)
    tokens = curves.plot_runs(runs, curves.card_reference(), x="tokens")
    assert _lines(tokens.axes[0])["alpha train"][0] == [100, 200, 300]
    assert "beta train" not in _lines(tokens.axes[0])  # no token counts logged: not plotted against tokens
    epochs = curves.plot_runs(runs, None, x="epoch")
    assert _lines(epochs.axes[0])["alpha train"][0] == [0.1, 0.2, 0.3]
    png, svg = curves.save_figure(fig, out_dir=tmp_path / "plots")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()[:500]


def _check_card_panel(card_ax):
    """The card's panel is its schedule (a curve), with its one logged point written beside it."""
    card = _lines(card_ax)
    assert len(card["planned: cosine over 406 steps"][0]) == 407
    assert card["run: stopped at 272"][0][-1] == 272
    (step,), (rate,) = card["where the card logged"]
    assert step == 272 and rate == pytest.approx(5.95e-6, rel=1e-3)
    note = card_ax.texts[0].get_text()
    assert "train loss 0.9367" in note and "eval loss 0.9397" in note and "final eval 0.9399" in note
    assert "learning rate 5.9e-06\n(30% of peak)" in note


def test_the_card_schedule_stops_at_30_percent_of_the_peak():
    ref = curves.card_reference()
    assert (ref["planned_steps"], ref["warmup_steps"]) == (406, 41)
    assert curves.cosine_lr(41, 406, 41, 2e-5) == 2e-5
    assert curves.cosine_lr(272, 406, 41, 2e-5) == pytest.approx(5.95e-6, rel=1e-3)
    assert curves.cosine_lr(406, 406, 41, 2e-5) == 0.0


def test_plot_with_no_runs_shows_the_card_alone():
    fig = curves.plot_runs([], curves.card_reference())
    assert _lines(fig.axes[0]) == {} and fig.axes[0].get_title() == "your runs: none yet (run notebook 02 or 03)"
    _check_card_panel(fig.axes[2])


def test_the_planted_runs_show_their_symptoms():
    """Diagnosing a curve: the synthetic runs must really have the shapes their names promise."""
    runs = {run.name[-1]: run for run in curves.planted_runs()}
    peak = lambda run: max(run.train["learning_rate"])  # noqa: E731
    assert peak(runs["A"]) == pytest.approx(10 * peak(runs["B"]))  # learning rate x10
    assert runs["C"].train["learning_rate"][0] == peak(runs["C"]) and runs["B"].train["learning_rate"][0] == 0
    b_eval = runs["B"].eval["loss"]
    assert b_eval.index(min(b_eval)) < len(b_eval) - 3 and b_eval[-1] > min(b_eval) + 0.3  # eval turns up
    assert runs["B"].train["loss"][-1] < runs["B"].train["loss"][len(b_eval)]  # while train keeps falling
    assert curves.diagnosis_feedback(curves.PLANTED_TRUTH) == [
        f"planted {k}: right, {v}" for k, v in curves.PLANTED_TRUTH.items()
    ]
    assert curves.diagnosis_feedback({"A": "overfitting"})[0] == (
        "planted A: not overfitting; look at how high its learning rate goes, against the other two"
    )
    synonyms = {"A": "LR too high", "B": "it overfits", "C": "missing warmup"}
    assert curves.diagnosis_feedback(synonyms) == [f"planted {k}: right, {v}" for k, v in curves.PLANTED_TRUTH.items()]
    assert curves.diagnosis_feedback({"C": "bad data"})[2] == (
        "planted C: 'bad data' is none of learning rate x10, no warm-up, overfitting; look at where its learning "
        "rate starts"
    )


def test_an_unreadable_run_is_skipped_by_name(runs_dir, capsys):
    (runs_dir / "gamma").mkdir()
    (runs_dir / "gamma" / "trainer_state.json").write_text('{"log_hist')
    assert [run.name for run in curves.find_runs(runs_dir)] == ["alpha", "beta"]
    assert (
        f"skipped {runs_dir / 'gamma' / 'trainer_state.json'}: unreadable (JSONDecodeError)" in capsys.readouterr().out
    )


def test_a_run_with_non_numeric_losses_is_skipped_and_the_others_plotted(runs_dir, capsys):
    for name, loss in (("gamma", "high"), ("delta", None)):
        (runs_dir / name).mkdir()
        bad = [dict(LOG[0]), {**LOG[1], "loss": loss}]
        (runs_dir / name / "trainer_state.json").write_text(json.dumps({"log_history": bad}))
    found = curves.find_runs(runs_dir)
    assert [run.name for run in found] == ["alpha", "beta"]
    out = capsys.readouterr().out
    assert (
        f"skipped {runs_dir / 'delta' / 'trainer_state.json'}: unreadable (its loss at step 2 is None, not a number)"
        in out
    )
    assert (
        f"skipped {runs_dir / 'gamma' / 'trainer_state.json'}: unreadable (its loss at step 2 is 'high', not a number)"
        in out
    )
    curves.plot_runs(found, curves.card_reference())  # the good runs still plot


def test_the_command_line_reads_its_arguments(runs_dir, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert curves.main(["--runs", str(runs_dir), "--out", str(plots), "--x", "tokens"]) == 0
    assert (plots / "loss_curves.png").is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        curves.main(["--no-such-option"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        curves.main(["--help"])
    assert exit_.value.code == 0 and "--smoothing" in capsys.readouterr().out


def test_a_plots_folder_that_is_a_file_is_one_line(runs_dir, tmp_path, capsys):
    blocker = tmp_path / "plots"
    blocker.write_text("my notes")
    assert curves.main(["--runs", str(runs_dir), "--out", str(blocker)]) == 2
    assert capsys.readouterr().err == f"error: {blocker} is a file, so the plots cannot be saved under {blocker}\n"
    assert blocker.read_text() == "my notes"


def test_a_runs_folder_that_does_not_exist_is_one_line_and_no_plot_is_written(tmp_path, capsys):
    plots = tmp_path / "plots"
    assert curves.main(["--runs", str(tmp_path / "typo"), "--out", str(plots)]) == 2
    assert capsys.readouterr().err == f"error: --runs {tmp_path / 'typo'}: no such folder\n"
    assert not plots.exists()  # the plots of the real runs are not replaced by an empty one
