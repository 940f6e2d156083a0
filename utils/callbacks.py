"""The trainer callbacks of a run (``utils.training.callbacks`` chooses them)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from utils import say


class CardStop(TrainerCallback):
    """The card's schedule: the trainer plans more steps than one pass over the packed data, and stops at its end.
    With ``count`` (``utils.card_era.card_run``, for the card's packing) it stops where the packed rows ran out (the
    last, partial accumulation is never stepped, as in transformers 4.35) and logs the epoch the card's way:
    accumulated batches over those expected from the dialogue count (the card's 0.67 at step 272)."""

    def __init__(self, count=None):
        self.count = count

    def on_step_end(self, args, state, control, **kwargs):
        if self.count is not None:
            state.epoch = state.global_step * args.gradient_accumulation_steps / self.count.dataloader_len
            if state.global_step >= self.count.optimizer_steps:
                control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_training_stop = True  # the packed rows ended before the planned steps


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first step whose loss or gradients are NaN or infinite, save nothing from it, and remember where
    (for ``utils.training.stop_if_diverged``). The Trainer leaves non-finite losses out of the logged average
    (``logging_nan_inf_filter``), so NaN weights log a loss of 0 with a NaN gradient norm; under fp16 a non-finite
    gradient alone is the gradient scaler skipping a step, which is normal."""

    def __init__(self):
        self.step, self.what = 0, ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if loss is None or self.step:
            return
        bad_norm = norm is not None and not math.isfinite(norm) and (not args.fp16 or loss == 0)
        if not math.isfinite(loss) or bad_norm:
            self.step = state.global_step
            self.what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            control.should_training_stop = True
            control.should_save = False


class WholeTokenCounts(TrainerCallback):
    """A token count TRL logs as a float (it averages every metric: "48088.000000" in the notebook's table) as an int,
    in the log the callbacks after it see and in ``trainer_state.json``; so it comes before the progress callback."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for record in (logs, state.log_history[-1] if state.log_history else None):
            for key, value in (record or {}).items():
                if key.endswith("num_tokens") and isinstance(value, float) and value.is_integer():
                    record[key] = int(value)


class StepTimer(TrainerCallback):
    """Each optimizer step's wall time and tokens. ``steady()`` leaves out the first step (compiling, memory pools)
    and, timing steps alone, the evaluation and saving between them, which a short run's ``train_runtime`` counts
    (on an H200, 30 steps of Mistral-7B took 4.2 s each by the runtime)."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []  # (seconds, tokens) per optimizer step
        self._start: tuple[float, int] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self._start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            _synchronize()
            began, seen = self._start
            self.steps.append((time.perf_counter() - began, state.num_input_tokens_seen - seen))
            self._start = None

    def steady(self) -> tuple[float, float] | None:
        """Seconds per step and tokens per second over the steps after the first; None with fewer than two steps."""
        timed = self.steps[1:]
        seconds, tokens = sum(s for s, _ in timed), sum(n for _, n in timed)
        return (seconds / len(timed), tokens / seconds) if timed and seconds > 0 else None


def _synchronize() -> None:
    """Wait for the GPU's queued work, so that a step's time is its own."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class RankLog(TrainerCallback):
    """With several processes: each rank's share of the model, its own loss beside the logged one (the mean of the
    ranks' own), and ``rank_logs/rank<N>.json``. ``watch`` records the own loss from the trainer's
    ``training_step`` (summed over gradient accumulation)."""

    def __init__(self):
        self.micro: list[float] = []  # this rank's losses since the last optimizer step
        self.own: list[float] = []  # one per optimizer step

    def watch(self, trainer) -> None:
        step = trainer.training_step

        def recorded(*args, **kwargs):
            loss = step(*args, **kwargs)
            self.micro.append(float(loss))
            return loss

        trainer.training_step = recorded

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.own.append(sum(self.micro))
        self.micro = []
        if state.global_step == 1 and args.world_size > 1 and model is not None:  # wrapped (and sharded) by now
            from utils.model import parameter_count  # a 4-bit weight by its real shape

            params = list(model.parameters())
            total = sum(parameter_count(p) for p in params)
            held = sum(p.to_local().numel() if hasattr(p, "to_local") else parameter_count(p) for p in params)
            say(
                f"[rank {args.process_index}/{args.world_size}] this rank holds {held:,} of {total:,} parameters "
                f"({100 * held / total:.0f}%: {'sharded' if held < total else 'a full replica'})"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and args.world_size > 1:
            own = f"its own {self.own[-1]:.4f}, " if self.own else ""
            say(
                f"[rank {args.process_index}/{args.world_size}] step {state.global_step} loss: {own}"
                f"logged (mean of the ranks) {logs['loss']:.4f}"
            )

    def on_train_end(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / "rank_logs"
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "global_step": state.global_step,
            "losses": [h["loss"] for h in state.log_history if "loss" in h],
            "own_losses": self.own,
        }
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(record) + "\n")
