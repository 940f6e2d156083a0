"""What the collection adds around TRL's ``SFTTrainer``, and the run's callbacks. Notebook 02, notebook 03's launched
function and ``python -m utils.sft`` make the same calls:

    run = start_run(args)                               # the run folder: new, resumed, or finished (then stop)
    data = load_training_data(args, tokenizer)          # the prepared token ids, packed as the run asks
    trainer = SFTTrainer(..., train_dataset=data["train"], callbacks=run_callbacks(args, data))
    with_additions(trainer, args)                       # fp32 LoRA under fp16; each rank's own loss
    trainer.train(resume_from_checkpoint=run.resume_from)
    stop_if_diverged(trainer, run)                      # a NaN loss: one line naming the last good checkpoint
    trainer.save_model(adapter_dir)
    report = finish_run(trainer, run)                   # trainer_state.json, speed.json, the run marked finished
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch  # imported by transformers' TrainerCallback anyway
from accelerate import PartialState
from transformers import TrainerCallback, TrainerState

from utils import ConfigError, say, share_like_other_files
from utils.assets import TINY_MODEL_DIR, ensure_tiny_model
from utils.card_era import card_run, handbook_order, pack_constant_length, text_length
from utils.data.prepared import prepared_dataset
from utils.data.template import tokenize_dialogues, with_system_turn
from utils.hardware import ULTRACHAT_TOKENS
from utils.model import keep_standard_4bit_layout, parameter_count
from utils.recipe import Args, world_size
from utils.runs import Run, RunError, checkpoint_problem, checkpoint_steps, open_run, run_settings


def start_run(args: Args) -> Run:
    """Open ``output_dir`` for this run (``utils.runs.open_run``) and say what happens there; before any weights."""
    settings = run_settings(args.script, args.training, args.model, world_size(), args.run.card_schedule)
    state = PartialState()
    main_process = state.is_main_process
    # the main process checks, locks and records the folder first: a process that looked at the same time could find
    # its files before its run.json, and take them for a user's. A refusal is raised after the barrier, so that the
    # other processes (on other machines too) are not left waiting there for it
    refused = None
    with state.main_process_first():
        try:
            run = open_run(args.training.output_dir, settings, args.run.fresh, main_process)
        except RunError as exc:
            refused = exc
    if refused:
        raise refused
    if main_process:  # one report, not one per process
        say("\n".join([*run.skipped, run.message]))
    return run


# --- data ----------------------------------------------------------------------------------------------------------
def load_training_data(args: Args, tokenizer) -> dict:
    """The prepared splits (notebook 01's), ``input_ids`` only (TRL trains on our ids as they are), ``args.training``
    set to match: card packing done here; ``assistant_only_loss`` as a column (TRL's own switch wants ``messages``);
    evaluation off, with a note, without a held-out split."""
    import datasets

    folder = prepared_dataset(args.script.dataset_name, tokenizer, args.run.dataset_revision)
    if not os.access(folder, os.W_OK):  # a Kaggle input, a read-only mount: datasets caches each map beside the data
        datasets.disable_caching()  # so TRL's preprocessing writes to a temporary folder instead
        say(f"Note: {folder} is read-only, so TRL's preprocessing of it is kept in a temporary folder.")
    data = datasets.load_from_disk(str(folder))
    splits = {"train": args.script.dataset_train_split, "test": args.script.dataset_test_split}
    data = {split: data[name] for split, name in splits.items() if name in data}
    if "train" not in data:
        raise ConfigError(f"dataset {folder} has no {args.script.dataset_train_split!r} split")
    if args.training.assistant_only_loss:
        data = with_assistant_masks(data, tokenizer, folder)
    args.training.assistant_only_loss = False  # the assistant_masks column does the masking
    columns = ["input_ids", "assistant_masks"] if "assistant_masks" in data["train"].column_names else ["input_ids"]
    card = args.training.packing_strategy == "card"
    if card:  # packed already, in order: TRL pads nothing and the sampler keeps the order
        data = pack_like_the_card(data, folder, args.training.max_length, args.training.seed, columns)
        args.training.packing, args.training.train_sampling_strategy = False, "sequential"
    else:
        data = {split: rows.select_columns(columns) for split, rows in data.items()}
    if "test" not in data and args.training.eval_strategy != "no":  # a str enum once SFTConfig has checked it
        why = "too few held-out tokens for one packed row" if card else "no held-out rows"
        say(f"Note: {args.script.dataset_name} has {why}, so evaluation is off (eval_strategy no).")
        args.training.eval_strategy = "no"
    return data


def assistant_header(tokenizer) -> list[int]:
    """The ids of ``<|assistant|>\n`` after ``</s>\n`` (28789, 28766, 489, 11143, 28766, 28767, 13 for Mistral's)."""
    from utils.card_era import era_backend

    return era_backend(tokenizer, "today", first=False).encode("<|assistant|>\n", add_special_tokens=False).ids


def assistant_mask(ids: list[int], header: list[int], eos: int) -> list[int]:
    """1 from each ``header`` in ``ids`` to the EOS after it (for a packed row's display). A message holding the
    marker's text fools it, so training masks from the message boundaries instead (``with_assistant_masks``)."""
    ids, header = np.asarray(ids), np.asarray(header)
    n, length = len(header), len(ids)
    delta = np.zeros(length + 2, dtype=np.int32)
    if length >= n:
        starts = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids, n) == header).all(axis=1)) + n
        eos_at = np.append(np.flatnonzero(ids == eos), length)  # past the row's end: an answer that never ends
        np.add.at(delta, starts, 1)
        np.add.at(delta, eos_at[np.searchsorted(eos_at, starts)] + 1, -1)
    return (np.cumsum(delta[:length]) > 0).astype(np.int8).tolist()


def with_assistant_masks(data: dict, tokenizer, folder: Path) -> dict:
    """``data`` with an int8 ``assistant_masks`` column (in memory): each row's messages tokenized again as notebook
    01 did, the answers placed from the message boundaries; the ids must be the prepared ones."""
    import datasets

    report = json.loads((folder / "report.json").read_text())
    system_turn, tokenization = report.get("system_turn", True), report.get("tokenization", "card")
    features = datasets.Features({"assistant_masks": datasets.List(datasets.Value("int8"))})

    def masks(batch: dict) -> dict:
        ids, found = tokenize_dialogues(tokenizer, batch["messages"], system_turn, tokenization, answers=True)
        if ids != batch["input_ids"]:
            raise ConfigError(
                f"{folder} was tokenized by another tokenizer than this run's; prepare it again with notebook 01"
            )
        return {"assistant_masks": [np.asarray(m, dtype=np.int8) for m in found]}

    masked, read = {}, ["input_ids", "messages"]
    for split, rows in data.items():
        desc = f"Masking all but the assistant's tokens ({split})"
        column = rows.select_columns(read).map(
            masks, batched=True, remove_columns=read, features=features, keep_in_memory=True, desc=desc
        )
        masked[split] = datasets.concatenate_datasets([rows, column], axis=1)
    return masked


def pack_like_the_card(data: dict, folder: Path, seq_length: int, seed: int, columns=("input_ids",)) -> dict:
    """The prepared splits packed by TRL 0.7.x's ``ConstantLengthDataset``, each in the handbook's order (a0b8d49's
    ``mix_datasets`` shuffled train and test with seed 42); a split too small for one chunk is left out."""
    import datasets

    system_turn = json.loads((folder / "report.json").read_text()).get("system_turn", True)
    packed = {}
    for split, rows in data.items():
        order = handbook_order(rows.num_rows)
        messages = (m for batch in rows.select_columns(["messages"]).iter(batch_size=1000) for m in batch["messages"])
        lengths = (text_length(with_system_turn(m) if system_turn else m) for m in messages)
        chars = np.fromiter(lengths, dtype=np.int64, count=rows.num_rows)[order]
        chunks = {}
        for c in columns:  # each alike (the same buffers, cuts and shuffle): the masks stay with their tokens
            column = rows.data.column(c).combine_chunks()  # numpy views of the memory-mapped rows, in order
            offsets, values = column.offsets.to_numpy(), column.values.to_numpy()
            ids = [values[offsets[i] : offsets[i + 1]] for i in order]
            chunks[c] = pack_constant_length(ids, chars, seed=seed, seq_length=seq_length).input_ids
        if len(chunks["input_ids"]):
            packed[split] = datasets.Dataset.from_dict(chunks)
    if "train" not in packed:
        raise ConfigError(
            f"{folder} holds fewer than {seq_length} training tokens, too few for one packed row of max_length "
            f"{seq_length}: lower max_length or use packing_strategy bfd"
        )
    packed["train"].source_dialogues = data["train"].num_rows  # what TRL 0.7.x's dataset reported as its length
    return packed


# --- around TRL's SFTTrainer ----------------------------------------------------------------------------------------
def run_callbacks(args: Args, data: dict) -> list:
    """``callbacks`` for ``SFTTrainer(callbacks=...)`` over ``data``'s training rows."""
    train = data["train"]
    return callbacks(args, getattr(train, "source_dialogues", train.num_rows), train.num_rows)


def callbacks(args: Args, dialogues: int, rows: int) -> list:
    """Per-rank losses, a stop on a non-finite loss, whole token counts, step times, and the card's schedule when asked
    for (``rows``: training rows as the trainer sees them, packed ones under ``packing_strategy: card``)."""
    found: list = [RankLog(), StopOnNonFiniteLoss(), WholeTokenCounts(), StepTimer()]
    if not args.run.card_schedule:
        return found
    batch, accumulation = args.training.per_device_train_batch_size, args.training.gradient_accumulation_steps
    card = args.training.packing_strategy == "card"  # then the stop is exact: ``rows`` are the card's chunks
    # TRL 0.7.x's ConstantLengthDataset reported the dialogues as its length, and transformers 4.35 planned the epoch
    # as len(dataloader) // accumulation steps (406 on 16 x 8 x 4) while the packed stream ran out earlier (step 272)
    count = card_run(rows if card else 0, dialogues, world_size(), batch, accumulation)
    args.training.max_steps = count.planned_steps
    if card:
        why = f"{dialogues} dialogues, as TRL 0.7.x counted them); the {rows} packed rows end at step "
        why += f"{count.optimizer_steps} (epoch {count.epoch:.2f})"
    else:
        why = f"transformers 4.35's len(dataloader) // {accumulation} for {dialogues} dialogues in batches of {batch} "
        why += f"on {world_size()} process(es)), stopping when the packed data ends"
    say(f"card schedule: cosine planned over {count.planned_steps} steps ({why}")
    return [*found, CardStop(count if card else None)]


def with_additions(trainer, args: Args):
    """The trainer, counting the tokens it sees (for tokens/s), with its trainable weights in float32 under fp16 (TRL
    casts a quantized model's adapter to bfloat16, which fp16's gradient scaler cannot unscale on CUDA), and with
    several processes each rank recording its own loss (``RankLog.watch``)."""
    trainer.args.include_num_input_tokens_seen = "all"
    keep_standard_4bit_layout(trainer.model)  # a model built elsewhere too (see its docstring)
    if args.training.fp16:
        keep_trainable_fp32(trainer.model)
    if world_size() > 1:
        next(c for c in trainer.callback_handler.callbacks if isinstance(c, RankLog)).watch(trainer)
    return trainer


def keep_trainable_fp32(model) -> int:
    """Cast every trainable parameter to float32 (before the optimizer and DDP see them); return how many."""
    cast = [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]
    for param in cast:
        param.data = param.data.float()
    return len(cast)


def model_id(args: Args) -> str | None:
    """The model whose tokenizer to load: None for the embedded tiny model (built here when it is not there yet)."""
    name = args.model.model_name_or_path
    if Path(name) == TINY_MODEL_DIR:
        ensure_tiny_model()
        return None
    return name


# --- running -------------------------------------------------------------------------------------------------------
def finish_from_checkpoint(trainer, checkpoint: str) -> None:
    """Load a checkpoint that holds the run's last step instead of training from it: ``Trainer.train`` would take one
    step past ``max_steps`` there."""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def stop_if_diverged(trainer, run: Run) -> None:
    """RunError (one line) when a loss or gradient turned NaN or infinite: the run is marked failed, nothing of the
    bad step was saved, and the line names the newest checkpoint before it that can be resumed from."""
    bad = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnNonFiniteLoss) and c.step), None)
    if bad is None:
        return
    run.fail(f"{bad.what} at step {bad.step}")
    saved = checkpoint_steps(Path(trainer.args.output_dir))  # newest first
    good = next((c.name for step, c in saved if step < bad.step and checkpoint_problem(c) is None), None)
    raise RunError(
        f"training diverged at step {bad.step} ({bad.what}), so it stopped; the last good checkpoint is "
        f"{good or 'none'} (lower the learning rate or check the data, then run again to resume from it)"
    )


def finish_run(trainer, run: Run) -> dict:
    """After ``trainer.save_model``: write ``trainer_state.json`` (notebook 04's log) and the speed report, and mark
    the run finished. Returns the report."""
    trainer.save_state()
    report = speed_report(trainer)
    if trainer.is_world_process_zero():
        run.save_report(report)
        for saved in [*run.path.glob("checkpoint-*"), run.path / "adapter", run.path / "model"]:
            share_like_other_files(saved)  # safetensors wrote their weights private (0600)
        run.finish(trainer.state.global_step, trainer.state.max_steps)
    return report


def speed_report(trainer) -> dict:
    """Rows, tokens/s, seconds per step, peak GPU memory and the hours of one epoch of ultrachat_200k at this speed:
    ``StepTimer``'s steady speed, beside the whole ``train()`` call's."""
    runtime = next((h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h), math.nan)
    steps, tokens = trainer.state.global_step, trainer.state.num_input_tokens_seen or 0
    # a resumed run's runtime is this session's: so are its steps and tokens (the checkpoint's are left out)
    session_tokens = tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    fast = not runtime or runtime < 0.5  # never a speed from a 0-s run
    overall = math.nan if fast or session_tokens <= 0 else session_tokens / runtime
    timer = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer)), None)
    if timer:
        steady = timer.steady()  # None after one timed step: its time is mostly compiling and warming up
    else:  # a trainer built without StepTimer: the runtime is all there is
        session_steps = steps - getattr(trainer, "_initial_global_step", 0)
        steady = (runtime / session_steps, overall) if session_steps > 0 and not fast else None
    step_s, tok_s = steady or (None, None)
    cuda = torch.cuda.is_initialized()
    return {
        "steps": steps,
        "packed_rows": len(trainer.train_dataset),  # the training set as the trainer saw it
        "tokens_seen": int(tokens),
        "seconds_per_step": round(step_s, 3) if step_s else None,  # the steps after the first, timed alone
        "tokens_per_second": round(tok_s, 1) if tok_s else None,  # None: fewer than 2 steps this session
        "train_runtime_s": round(runtime, 1),  # all of train(): the first step, evaluation and saving included
        "tokens_per_second_overall": round(overall, 1),
        "peak_gpu_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_gpu_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "ultrachat_200k_epoch_tokens": ULTRACHAT_TOKENS,
        "ultrachat_200k_epoch_tokens_from": "the card's ~139.4k packed rows of 2,048 tokens",
        "ultrachat_200k_epoch_hours_at_this_speed": round(ULTRACHAT_TOKENS / tok_s / 3600, 1) if tok_s else None,
    }


# --- the callbacks -------------------------------------------------------------------------------------------------
class CardStop(TrainerCallback):
    """The card's schedule: more steps planned than one pass over the packed data, and a stop at its end. With
    ``count`` (``card_era.card_run``, the card's packing) the stop is where the packed rows ran out (a last, partial
    accumulation is never stepped, as in 4.35), and the epoch logged the card's way (0.67 at step 272)."""

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
    """Stop at the first step whose loss or gradients are NaN or infinite, save nothing from it, and remember where.
    The Trainer leaves non-finite losses out of the logged average, so NaN weights log a loss of 0 with a NaN gradient
    norm; under fp16 a non-finite gradient alone is the gradient scaler skipping a step, which is normal."""

    def __init__(self):
        self.step, self.what = 0, ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss, norm = (logs or {}).get("loss"), (logs or {}).get("grad_norm")
        if loss is None or self.step:
            return
        bad_norm = norm is not None and not math.isfinite(norm) and (not args.fp16 or loss == 0)
        if not math.isfinite(loss) or bad_norm:
            self.step = state.global_step
            self.what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            control.should_training_stop, control.should_save = True, False


class WholeTokenCounts(TrainerCallback):
    """A token count TRL logs as a float (it averages every metric) as an int, in the log the callbacks after it see
    (the notebook's table) and in ``trainer_state.json``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for record in (logs, state.log_history[-1] if state.log_history else None):
            for key, value in (record or {}).items():
                if key.endswith("num_tokens") and isinstance(value, float) and value.is_integer():
                    record[key] = int(value)


class StepTimer(TrainerCallback):
    """Each optimizer step's (seconds, tokens). ``steady()`` leaves out the first step (compiling, memory pools) and,
    timing steps alone, the evaluation and saving that a short run's ``train_runtime`` counts; None under two steps."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_initialized():  # the GPU's queued work done: a step's time is its own
            torch.cuda.synchronize()
        self._start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        began, seen = self._start
        self.steps.append((time.perf_counter() - began, state.num_input_tokens_seen - seen))

    def steady(self) -> tuple[float, float] | None:  # (seconds per step, tokens per second)
        timed = self.steps[1:]
        seconds, tokens = sum(s for s, _ in timed), sum(n for _, n in timed)
        return (seconds / len(timed), tokens / seconds) if timed and seconds > 0 else None


class RankLog(TrainerCallback):
    """With several processes: each rank's share of the model, its own loss beside the logged one (the mean of the
    ranks'; ``watch`` takes it from ``training_step``, summed over accumulation), and ``rank_logs/rank<N>.json``."""

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
            params = list(model.parameters())
            total = sum(parameter_count(p) for p in params)  # a 4-bit weight by its real shape
            held = sum(p.to_local().numel() if hasattr(p, "to_local") else parameter_count(p) for p in params)
            share = f"{100 * held / total:.0f}%: {'sharded' if held < total else 'a full replica'}"
            rank = f"[rank {args.process_index}/{args.world_size}]"
            say(f"{rank} this rank holds {held:,} of {total:,} parameters ({share})")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and args.world_size > 1:
            own = f"its own {self.own[-1]:.4f}, " if self.own else ""
            rank = f"[rank {args.process_index}/{args.world_size}]"
            say(f"{rank} step {state.global_step} loss: {own}logged (mean of the ranks) {logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / "rank_logs"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"rank": args.process_index, "world_size": args.world_size, "global_step": state.global_step}
        record |= {"losses": [h["loss"] for h in state.log_history if "loss" in h], "own_losses": self.own}
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(record) + "\n")
