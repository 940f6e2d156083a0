"""Notebook 04: read every training run under ``runs/`` and plot its loss curves against the model card.

python -m utils.curves            # writes runs/plots/loss_curves.png and .svg, prints the summary table
python -m utils.curves --x tokens --smoothing 0.5 --runs runs --out runs/plots
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils import DATA_DIR, RUNS_DIR

PLOTS_DIR = RUNS_DIR / "plots"
AXES = {"step": "optimizer step", "tokens": "tokens seen", "epoch": "epoch"}
# TensorBoard's scalar tags, as the keys of trainer_state.json's log history
TAGS = {"train/loss": "loss", "eval/loss": "eval_loss"}
TAGS |= {f"train/{key}": key for key in ("epoch", "learning_rate", "num_input_tokens_seen")}


@dataclass
class RunLog:
    """The logged series of one training run: ``train`` (step, loss, epoch, tokens, learning_rate) and ``eval``."""

    name: str
    path: Path
    source: str  # "trainer_state.json", "tensorboard" or "planted"
    train: dict[str, list] = field(default_factory=dict)
    eval: dict[str, list] = field(default_factory=dict)
    runtime_s: float | None = None

    def summary(self) -> dict:
        """A row of the summary table, "–" where not logged; the train loss's ends are ``tiny_world.loss_ends``."""
        from utils.tiny_world import loss_ends

        ends = loss_ends(self.train.get("loss", []))
        start, end = (round(ends[0], 3), round(ends[1], 3)) if ends else ("–", "–")
        return {
            "run": self.name,
            "train loss, start": start,
            "train loss, end": end,
            "final eval loss": round(self.eval["loss"][-1], 3) if self.eval.get("loss") else "–",
            "steps": (self.train.get("step") or ["–"])[-1],
            "tokens": (self.train.get("tokens") or ["–"])[-1],
            "runtime (s)": round(self.runtime_s, 1) if self.runtime_s is not None else "–",
            "from": self.source,
        }


def _series(entries: list[dict], key: str) -> dict[str, list]:
    """The logged ``key`` (``loss`` or ``eval_loss``) as "loss", with its step, epoch, tokens and learning rate."""
    rows = [e for e in entries if isinstance(e, dict) and key in e]
    for e in rows:
        for name in ("step", key):  # a damaged or hand-edited log: ValueError
            if isinstance(e.get(name), bool) or not isinstance(e.get(name), int | float):
                raise ValueError(f"its {name} at step {e.get('step')!r} is {e.get(name)!r}, not a number")
    keys = dict(loss=key, step="step", epoch="epoch", tokens="num_input_tokens_seen", learning_rate="learning_rate")
    return {name: [e.get(k) for e in rows] for name, k in keys.items()}


def read_trainer_state(path: Path) -> RunLog:
    """A RunLog from ``trainer_state.json``'s log history."""
    state = json.loads(path.read_text())
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError("it has no log_history list")
    runtime = next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None)
    train, evals = _series(history, "loss"), _series(history, "eval_loss")
    return RunLog(path.parent.name, path.parent, "trainer_state.json", train, evals, runtime)


def read_tensorboard(folder: Path) -> RunLog:
    """A RunLog from the TensorBoard scalars under ``folder`` (``TAGS``), a later file's value winning at a step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, dict] = {}  # a log history: the values logged at each step
    for file in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in set(acc.Tags()["scalars"]) & TAGS.keys():
            for event in acc.Scalars(tag):
                steps.setdefault(event.step, {"step": event.step})[TAGS[tag]] = event.value
    history = [steps[s] for s in sorted(steps)]
    return RunLog(folder.name, folder, "tensorboard", _series(history, "loss"), _series(history, "eval_loss"))


def find_runs(runs_dir: Path = RUNS_DIR) -> list[RunLog]:
    """Every run under ``runs_dir``: folders with trainer_state.json (checkpoints skipped), else TensorBoard logs."""
    runs_dir = Path(runs_dir)
    found: dict[Path, RunLog] = {}
    for state in sorted(runs_dir.rglob("trainer_state.json")):
        if not state.parent.name.startswith("checkpoint-"):
            try:
                found[state.parent] = read_trainer_state(state)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                why = str(exc) if isinstance(exc, ValueError) and str(exc).startswith("it") else type(exc).__name__
                print(f"skipped {state}: unreadable ({why})")
    for event in sorted(runs_dir.rglob("events.out.tfevents.*")):
        run_dir = next((p for p in event.parents if p.parent == runs_dir), event.parent)  # its top-level folder
        if not any(run_dir.is_relative_to(p) for p in found):
            run = read_tensorboard(run_dir)
            if run.train["step"]:
                found[run_dir] = run
    return [found[p] for p in sorted(found)]


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average debiased at the start, pandas' (adjusted) ``ewm``."""
    import pandas as pd

    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be from 0 (raw) to below 1, got {weight}")
    return pd.Series(values, dtype=float).ewm(alpha=1 - weight).mean().tolist()


def card_reference() -> dict:
    """The card's numbers (data/card_reference.json) with the tokens seen at the logged step (2,048 a row)."""
    ref = json.loads((DATA_DIR / "card_reference.json").read_text())
    point, schedule, hp = ref["training_results"][0], ref["schedule"], ref["hyperparameters"]
    return {
        "step": point["step"],
        "epoch": point["epoch"],
        "train_loss": point["training_loss"],
        "eval_loss": point["validation_loss"],
        "final_eval_loss": ref["final_eval_loss"],
        "tokens": point["step"] * hp["total_train_batch_size"] * 2048,
        "planned_steps": schedule["planned_steps"],
        "warmup_steps": schedule["warmup_steps"],
        "peak_lr": hp["learning_rate"],
    }


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """transformers' ``get_cosine_schedule_with_warmup`` at ``step``: a linear warm-up, then a half cosine to 0."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def plot_runs(runs: list[RunLog], reference: dict | None = None, smoothing: float = 0.9, x: str = "step"):
    """Your runs against ``x`` (of AXES), loss above and learning rate below; the card's run in a panel on the right."""
    import matplotlib.pyplot as plt

    if x not in AXES:
        raise ValueError(f"x must be one of {', '.join(AXES)}, got {x!r}")
    fig = plt.figure(figsize=(13, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=[2.3, 1], height_ratios=[3, 1.4])
    loss_ax = fig.add_subplot(grid[0, 0])
    lr_ax = fig.add_subplot(grid[1, 0], sharex=loss_ax)
    for i, run in enumerate(runs):
        _plot_run(loss_ax, lr_ax, run, f"C{i}", smoothing, x)  # the i-th colour of the style's cycle
    loss_ax.set_title(f"your runs: loss vs {AXES[x]}" if runs else "your runs: none yet (run notebook 02 or 03)")
    loss_ax.set_ylabel("loss (cross-entropy per token)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel(AXES[x])
    if runs:
        loss_ax.legend(fontsize=7, loc="upper right")
        lr_ax.legend(fontsize=7, loc="upper right")
    if reference:
        _plot_card(fig.add_subplot(grid[:, 1]), reference)
    fig.tight_layout()
    return fig


def _plot_run(loss_ax, lr_ax, run: RunLog, color: str, smoothing: float, x: str) -> None:
    """Raw and smoothed train loss, eval loss, learning rate and its cosine: only series logged at every ``x``."""
    logged = lambda values: bool(values) and None not in values  # noqa: E731
    xs, lrs = run.train.get(x, []), run.train.get("learning_rate", [])
    if logged(xs):
        losses = run.train["loss"]
        loss_ax.plot(xs, losses, color=color, alpha=0.3, linewidth=1, label=f"{run.name} train")
        loss_ax.plot(xs, ema(losses, smoothing), color=color, linewidth=2, label=f"{run.name} train (EMA)")
    if logged(xs) and logged(lrs):
        lr_ax.plot(xs, lrs, color=color, marker=".", label=f"{run.name} lr")
    if logged(xs) and logged(lrs) and x == "step":
        total, peak = max(xs), max(lrs)
        steps = list(range(1, total + 1))  # the rate logged at step s is the one step s used: lr(s - 1)
        cosine = [cosine_lr(s - 1, total, math.ceil(0.1 * total), peak) for s in steps]
        lr_ax.plot(steps, cosine, color=color, linestyle="--", linewidth=1, label=f"{run.name} cosine, 10% warm-up")
    if logged(run.eval.get(x, [])):
        loss_ax.plot(run.eval[x], run.eval["loss"], color=color, marker="o", linestyle="--", label=f"{run.name} eval")


def _plot_card(ax, ref: dict) -> None:
    """The card's schedule as planned and as run, its one logged point written beside it rather than plotted."""
    planned = list(range(ref["planned_steps"] + 1))
    lrs = [cosine_lr(s, ref["planned_steps"], ref["warmup_steps"], ref["peak_lr"]) for s in planned]
    ax.plot(planned, lrs, color="grey", linestyle=":", label=f"planned: cosine over {ref['planned_steps']} steps")
    ax.plot(planned[: ref["step"] + 1], lrs[: ref["step"] + 1], color="black", label=f"run: stopped at {ref['step']}")
    stop = lrs[ref["step"]]
    ax.plot([ref["step"]], [stop], marker="o", color="crimson", linestyle="none", label="where the card logged")
    ax.annotate(
        f"step {ref['step']} (epoch {ref['epoch']}):\ntrain loss {ref['train_loss']}\neval loss {ref['eval_loss']}\n"
        f"final eval {ref['final_eval_loss']}\nlearning rate {stop:.1e}\n({stop / ref['peak_lr']:.0%} of peak)",
        (ref["step"], stop),
        xytext=(ref["step"] * 0.32, ref["peak_lr"] * 0.18),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "crimson"},
    )
    title = f"the card's run (16 GPUs, full fine-tune):\nits data ended at step {ref['step']} of {ref['planned_steps']}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, ref["planned_steps"] + 10)
    ax.legend(fontsize=7, loc="upper right")


# --- planted runs, for diagnosing a curve ---------------------------------------------------------------------------
PLANTED_TRUTH = {"A": "learning rate x10", "B": "overfitting", "C": "no warm-up"}
HINTS = {  # what to look at, per problem, for a wrong answer
    "learning rate x10": "look at how high its learning rate goes, against the other two",
    "overfitting": "look at its evaluation circles against its training line late in the run",
    "no warm-up": "look at where its learning rate starts",
}


def planted_runs(steps: int = 60, seed: int = 0) -> list[RunLog]:
    """Three synthetic runs with the symptoms of ``PLANTED_TRUTH``: loss and learning rate every step, eval every 6."""
    import random

    rng = random.Random(seed)
    peak, warm = 2e-4, math.ceil(0.1 * steps)
    train = {  # the training loss at t, from 0 to 1
        "A": lambda t: 1.2 + 0.9 * math.exp(-12 * t) + 1.6 * max(0.0, t - 0.25),
        "B": lambda t: 1.1 + 1.4 * math.exp(-5 * t) - 0.6 * t,
        "C": lambda t: 1.3 + 1.2 * math.exp(-4 * t) + 0.8 * math.exp(-((t - 0.06) ** 2) / 0.002),
    }
    runs = []
    # each run's peak learning rate, warm-up steps, and evaluation loss above its noiseless training loss
    for name, top, warmup, gap in (("A", 10 * peak, warm, 0.1), ("B", peak, warm, 0.05), ("C", peak, 0, 0.08)):
        history = []
        for step in range(1, steps + 1):
            t = step / steps
            logged = {"step": step, "epoch": 3 * t, "num_input_tokens_seen": step * 4096}
            lr = cosine_lr(step - 1, steps, warmup, top)
            history.append({**logged, "loss": train[name](t) + rng.gauss(0, 0.03), "learning_rate": lr})
            if step % 6 == 0:  # B's evaluation loss turns up after t = 0.3: overfitting
                floor = 1.2 + (t - 0.3) ** 2 if name == "B" else 0.0
                history.append({**logged, "eval_loss": max(train[name](t) + gap, floor)})
        train_log, eval_log = _series(history, "loss"), _series(history, "eval_loss")
        runs.append(RunLog(f"planted {name}", Path("planted") / name, "planted", train_log, eval_log))
    return runs


def plot_side_by_side(runs: list[RunLog], smoothing: float = 0.9):
    """One column per run, loss above and learning rate below, each on its own axes: for comparing shapes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(runs), figsize=(4.3 * len(runs), 5), sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    for i, run in enumerate(runs):
        _plot_run(axes[0, i], axes[1, i], run, f"C{i}", smoothing, "step")
        axes[0, i].set_title(run.name)
        axes[0, i].legend(fontsize=7, loc="upper right")
        axes[1, i].set_xlabel("optimizer step")
    axes[0, 0].set_ylabel("loss")
    axes[1, 0].set_ylabel("learning rate")
    fig.tight_layout()
    return fig


def diagnosis_of(answer: str) -> str | None:
    """Which of the three problems a free-text answer names ("lr too high", "overfit", "missing warmup" count)."""
    text = " ".join("".join(c if c.isalnum() else " " for c in str(answer).lower()).split())
    if "overfit" in text.replace(" ", "") or "memoris" in text or "memoriz" in text:
        return "overfitting"
    if "warm" in text:
        return "no warm-up"
    rate = any(w in text for w in ("learning rate", "lr", "step size"))
    if "diverg" in text or (rate and any(w in text for w in ("high", "big", "large", "x10", "10x", "ten times"))):
        return "learning rate x10"
    return None


def diagnosis_feedback(diagnosis: dict[str, str]) -> list[str]:
    """A line per planted run: right, wrong (with a hint of where to look), or not tried yet."""
    choices = ", ".join(sorted(PLANTED_TRUTH.values()))
    lines = []
    for name, truth in PLANTED_TRUTH.items():
        guess = (diagnosis or {}).get(name)
        named = diagnosis_of(guess)  # None for None
        if guess is None:
            lines.append(f"planted {name}: no diagnosis yet (choose from: {choices})")
        elif named == truth:
            lines.append(f"planted {name}: right, {truth}")
        else:
            wrong = f"{guess!r} is none of {choices}" if named is None else f"not {named}"
            lines.append(f"planted {name}: {wrong}; {HINTS[truth]}")
    return lines


def save_figure(fig, name: str = "loss_curves", out_dir: Path = PLOTS_DIR) -> list[Path]:
    """Save ``fig`` as PNG and SVG under ``out_dir``; NotADirectoryError (one line) where a folder of it is a file."""
    out_dir = Path(out_dir)
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"{blocking} is a file, so the plots cannot be saved under {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(RUNS_DIR), help="where to look for runs (default: runs/)")
    parser.add_argument("--out", default=str(PLOTS_DIR), help="where the PNG and SVG go (default: runs/plots/)")
    parser.add_argument("--x", default="step", choices=list(AXES), help="the x axis")
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA weight, 0 (raw) to below 1")
    args = parser.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        parser.exit(2, f"error: --smoothing must be in [0, 1), got {args.smoothing}\n")
    if not Path(args.runs).is_dir():
        print(f"error: --runs {args.runs}: no such folder", file=sys.stderr)
        return 2
    runs = find_runs(Path(args.runs))
    if not runs:
        print(f"No training runs under {args.runs} yet: run notebook 02 (QLoRA) or 03 (full fine-tune) first.")
    try:
        paths = save_figure(plot_runs(runs, card_reference(), args.smoothing, args.x), out_dir=Path(args.out))
    except NotADirectoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print("wrote", path)
    for run in runs:
        print(run.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
