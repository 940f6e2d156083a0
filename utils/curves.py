"""Notebook 04: read every training run under ``runs/`` and plot its loss curves against the model card.

    python -m utils.curves            # writes runs/plots/loss_curves.png and .svg, prints the summary table

A run is a folder with ``trainer_state.json`` (its ``log_history``) or, failing that, TensorBoard event files.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils import DATA_DIR, RUNS_DIR

PLOTS_DIR = RUNS_DIR / "plots"
CARD_FILE = DATA_DIR / "card_reference.json"
CARD_SEQUENCE_LENGTH = 2048


@dataclass
class Run:
    """The logged series of one training run."""

    name: str
    path: Path
    source: str  # "trainer_state.json" or "tensorboard"
    train: dict[str, list] = field(default_factory=dict)  # step, loss, epoch, tokens, learning_rate
    eval: dict[str, list] = field(default_factory=dict)  # step, loss, epoch, tokens
    runtime_s: float | None = None

    def summary(self) -> dict:
        """Final train/eval loss, steps, tokens and runtime: one row of the summary table."""
        last = lambda series: series[-1] if series else None  # noqa: E731
        return {
            "run": self.name,
            "final train loss": last(self.train.get("loss", [])),
            "final eval loss": last(self.eval.get("loss", [])),
            "steps": last(self.train.get("step", [])),
            "tokens": last(self.train.get("tokens", [])),
            "runtime (s)": self.runtime_s,
            "from": self.source,
        }


def _series(entries: list[dict], key: str) -> dict[str, list]:
    rows = [e for e in entries if key in e]
    return {
        "step": [e["step"] for e in rows],
        "loss": [e[key] for e in rows],
        "epoch": [e.get("epoch") for e in rows],
        "tokens": [e.get("num_input_tokens_seen") for e in rows],
        "learning_rate": [e.get("learning_rate") for e in rows],
    }


def read_trainer_state(path: Path) -> Run:
    """A Run from ``trainer_state.json``'s log history."""
    state = json.loads(path.read_text())
    history = state.get("log_history", [])
    end = next((e for e in reversed(history) if "train_runtime" in e), {})
    return Run(
        path.parent.name,
        path.parent,
        "trainer_state.json",
        _series(history, "loss"),
        _series(history, "eval_loss"),
        end.get("train_runtime"),
    )


def read_tensorboard(folder: Path) -> Run | None:
    """A Run from TensorBoard scalars (``train/loss``, ``eval/loss``, ``train/learning_rate``, ``train/epoch``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    if not events:
        return None
    scalars: dict[str, dict[int, float]] = {}
    for file in events:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})

    def series(tag: str) -> dict[str, list]:
        points = sorted(scalars.get(tag, {}).items())
        return {
            "step": [s for s, _ in points],
            "loss": [v for _, v in points],
            "epoch": [scalars.get("train/epoch", {}).get(s) for s, _ in points],
            "tokens": [scalars.get("train/num_input_tokens_seen", {}).get(s) for s, _ in points],
            "learning_rate": [scalars.get("train/learning_rate", {}).get(s) for s, _ in points],
        }

    return Run(folder.name, folder, "tensorboard", series("train/loss"), series("eval/loss"))


def find_runs(runs_dir: Path = RUNS_DIR) -> list[Run]:
    """Every run under ``runs_dir``: folders with trainer_state.json (checkpoints skipped), else TensorBoard logs."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found: dict[Path, Run] = {}
    for state in sorted(runs_dir.rglob("trainer_state.json")):
        if not state.parent.name.startswith("checkpoint-"):
            try:
                found[state.parent] = read_trainer_state(state)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                print(f"skipped {state}: unreadable ({type(exc).__name__})")
    for event in sorted(runs_dir.rglob("events.out.tfevents.*")):
        run_dir = next((p for p in event.parents if p.parent == runs_dir), event.parent)  # its top-level folder
        if run_dir not in found and not any(run_dir.is_relative_to(p) for p in found):
            run = read_tensorboard(run_dir)
            if run and run.train.get("step"):
                found[run_dir] = run
    return [found[p] for p in sorted(found)]


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled towards 0)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def card_reference(path: Path = CARD_FILE) -> dict:
    """The card's numbers (data/card_reference.json) with the tokens seen at the logged step."""
    ref = json.loads(Path(path).read_text())
    point = ref["training_results"][0]
    global_batch = ref["hyperparameters"]["total_train_batch_size"]
    schedule = ref["schedule"]
    return {
        "step": point["step"],
        "epoch": point["epoch"],
        "train_loss": point["training_loss"],
        "eval_loss": point["validation_loss"],
        "final_eval_loss": ref["final_eval_loss"],
        "tokens": point["step"] * global_batch * CARD_SEQUENCE_LENGTH,
        "planned_steps": schedule["planned_steps"],
        "warmup_steps": schedule["warmup_steps"],
        "peak_lr": ref["hyperparameters"]["learning_rate"],
    }


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """transformers' ``get_cosine_schedule_with_warmup`` at ``step``: a linear ramp over ``warmup`` steps, then a
    half cosine from ``peak`` to 0 at ``total``."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


AXES = {"step": "optimizer step", "tokens": "tokens seen", "epoch": "epoch"}


def plot_runs(runs: list[Run], reference: dict | None = None, smoothing: float = 0.9, x: str = "step"):
    """Your runs (left) and the card's run (right): loss above, learning rate below.

    Left: each run's training loss (thin: raw, thick: EMA-smoothed), evaluation loss (circles) against ``x``
    ("step", "tokens" or "epoch"), and its learning rate with, on steps, the cosine it should follow (dashed). Right:
    the card's logged points at step 272 and its learning rate as planned (406 steps) and as run (stopped at 272).
    Every line carries a label, so the figure can be read back.
    """
    import matplotlib.pyplot as plt

    if x not in AXES:
        raise ValueError(f"x must be one of {', '.join(AXES)}, got {x!r}")
    fig, axes = plt.subplots(2, 2, figsize=(13, 6.5), sharex="col", gridspec_kw={"height_ratios": [3, 1.4]})
    (loss_ax, card_ax), (lr_ax, card_lr_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        xs = run.train.get(x, [])
        if xs and all(v is not None for v in xs):
            losses = run.train["loss"]
            loss_ax.plot(xs, losses, color=color, alpha=0.3, linewidth=1, label=f"{run.name} train")
            loss_ax.plot(xs, ema(losses, smoothing), color=color, linewidth=2, label=f"{run.name} train (EMA)")
            lrs = run.train.get("learning_rate", [])
            if lrs and all(v is not None for v in lrs):
                lr_ax.plot(xs, lrs, color=color, marker=".", label=f"{run.name} lr")
                if x == "step":
                    total, peak = max(xs), max(lrs)
                    steps = list(range(1, total + 1))  # the rate logged at step s is the one step s used: lr(s - 1)
                    lr_ax.plot(
                        steps,
                        [cosine_lr(s - 1, total, math.ceil(0.1 * total), peak) for s in steps],
                        color=color,
                        linestyle="--",
                        linewidth=1,
                        label=f"{run.name} cosine, 10% warm-up",
                    )
        exs = run.eval.get(x, [])
        if exs and all(v is not None for v in exs):
            loss_ax.plot(exs, run.eval["loss"], color=color, marker="o", linestyle="--", label=f"{run.name} eval")
    loss_ax.set_title(f"your runs: loss vs {AXES[x]}" if runs else "your runs: none yet (run notebook 02 or 03)")
    loss_ax.set_ylabel("loss (cross-entropy per token)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel(AXES[x])
    if runs:
        loss_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        lr_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if reference:
        _plot_card(card_ax, card_lr_ax, reference)
    fig.tight_layout()
    return fig


def _plot_card(loss_ax, lr_ax, ref: dict) -> None:
    loss_ax.plot(
        [ref["step"]],
        [ref["train_loss"]],
        marker="*",
        markersize=14,
        color="black",
        linestyle="none",
        label=f"card train {ref['train_loss']} @ step {ref['step']}",
    )
    loss_ax.plot(
        [ref["step"]],
        [ref["eval_loss"]],
        marker="X",
        markersize=11,
        color="crimson",
        linestyle="none",
        label=f"card eval {ref['eval_loss']} @ step {ref['step']}",
    )
    loss_ax.axhline(
        ref["final_eval_loss"],
        color="crimson",
        linestyle=":",
        linewidth=1,
        label=f"card final eval {ref['final_eval_loss']}",
    )
    loss_ax.axvline(ref["step"], color="grey", linewidth=0.8)
    loss_ax.set_ylim(0.8, 1.1)
    loss_ax.set_title(
        f"the card (16 GPUs, full fine-tune): its data ended at step {ref['step']}\n"
        f"of {ref['planned_steps']} planned, so its 'epoch' reads {ref['step']}/{ref['planned_steps']} = "
        f"{ref['epoch']}",
        fontsize=10,
    )
    loss_ax.legend(fontsize=7, loc="upper right")
    planned = list(range(ref["planned_steps"] + 1))
    lrs = [cosine_lr(s, ref["planned_steps"], ref["warmup_steps"], ref["peak_lr"]) for s in planned]
    lr_ax.plot(planned, lrs, color="grey", linestyle=":", label=f"planned: cosine over {ref['planned_steps']} steps")
    lr_ax.plot(
        planned[: ref["step"] + 1], lrs[: ref["step"] + 1], color="black", label=f"run: stopped at {ref['step']}"
    )
    stop = lrs[ref["step"]]
    lr_ax.plot(
        [ref["step"]],
        [stop],
        marker="o",
        color="black",
        linestyle="none",
        label=f"{stop:.1e} at the stop ({stop / ref['peak_lr']:.0%} of peak)",
    )
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_xlim(0, ref["planned_steps"] + 10)
    lr_ax.legend(fontsize=7, loc="upper right")


def save_figure(fig, name: str = "loss_curves", out_dir: Path = PLOTS_DIR) -> list[Path]:
    """Save ``fig`` as PNG and SVG under ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    runs = find_runs()
    if not runs:
        print("No training runs under runs/ yet: run notebook 02 (QLoRA) or 03 (full fine-tune) first.")
    fig = plot_runs(runs, card_reference(), x=argv[0] if argv else "step")
    for path in save_figure(fig):
        print("wrote", path)
    for run in runs:
        print(run.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
