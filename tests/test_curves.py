"""Notebook 04's reading and plotting of runs: the plotted series are checked, not just the files."""

import json

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
        "final train loss": 2.0,
        "final eval loss": 2.7,
        "steps": 3,
        "tokens": 300,
        "runtime (s)": 12.5,
        "from": "trainer_state.json",
    }


def test_ema():
    assert curves.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert curves.ema([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 2 / 3])
    assert curves.ema([5.0, 1.0], weight=0.0) == [5.0, 1.0]


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
    loss_ax, card_ax, lr_ax, card_lr_ax = fig.axes[:4]
    lines = _lines(loss_ax)
    assert lines["alpha train"] == ([1, 2, 3], [3.0, 2.5, 2.0])
    assert lines["alpha train (EMA)"][1] == pytest.approx(curves.ema([3.0, 2.5, 2.0], 0.5))
    assert lines["alpha eval"] == ([2], [2.7])
    assert lines["beta train"][0] == [1, 2, 3]
    assert not any(label.startswith("card") for label in lines)  # the card has its own panel
    card = _lines(card_ax)
    assert card["card train 0.9367 @ step 272"] == ([272], [0.9367])
    assert card["card eval 0.9397 @ step 272"] == ([272], [0.9397])
    assert card["card final eval 0.9399"][1] == [0.9399, 0.9399]
    assert _lines(lr_ax)["alpha lr"] == ([1, 2, 3], [1e-4, 2e-4, 1e-4])
    assert _lines(lr_ax)["alpha cosine, 10% warm-up"] == ([1, 2, 3], [0.0, 2e-4, 1e-4])
    card_lr = _lines(card_lr_ax)
    assert len(card_lr["planned: cosine over 406 steps"][0]) == 407
    assert card_lr["run: stopped at 272"][0][-1] == 272
    stop = next(label for label in card_lr if label.endswith("of peak)"))
    assert stop == "5.9e-06 at the stop (30% of peak)"
    tokens = curves.plot_runs(runs, curves.card_reference(), x="tokens")
    assert _lines(tokens.axes[0])["alpha train"][0] == [100, 200, 300]
    assert "beta train" not in _lines(tokens.axes[0])  # no token counts logged: not plotted against tokens
    epochs = curves.plot_runs(runs, None, x="epoch")
    assert _lines(epochs.axes[0])["alpha train"][0] == [0.1, 0.2, 0.3]
    png, svg = curves.save_figure(fig, out_dir=tmp_path / "plots")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()[:500]


def test_the_card_schedule_stops_at_30_percent_of_the_peak():
    ref = curves.card_reference()
    assert (ref["planned_steps"], ref["warmup_steps"]) == (406, 41)
    assert curves.cosine_lr(41, 406, 41, 2e-5) == 2e-5
    assert curves.cosine_lr(272, 406, 41, 2e-5) == pytest.approx(5.95e-6, rel=1e-3)
    assert curves.cosine_lr(406, 406, 41, 2e-5) == 0.0


def test_plot_with_no_runs_shows_the_card_alone():
    fig = curves.plot_runs([], curves.card_reference())
    assert _lines(fig.axes[0]) == {}
    assert sorted(_lines(fig.axes[1])) == [
        "card eval 0.9397 @ step 272",
        "card final eval 0.9399",
        "card train 0.9367 @ step 272",
    ]


def test_an_unreadable_run_is_skipped_by_name(runs_dir, capsys):
    (runs_dir / "gamma").mkdir()
    (runs_dir / "gamma" / "trainer_state.json").write_text('{"log_hist')
    assert [run.name for run in curves.find_runs(runs_dir)] == ["alpha", "beta"]
    assert (
        f"skipped {runs_dir / 'gamma' / 'trainer_state.json'}: unreadable (JSONDecodeError)" in capsys.readouterr().out
    )
