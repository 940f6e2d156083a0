"""What a learner is shown about a run: the settings that differ from the recipe, one packed row token by token,
what the loss sees, and the speed report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from utils.recipe import CLI, PROFILE, Settings, read_recipe, split_config

ULTRACHAT_200K_TRAIN_ROWS = 207_865
ULTRACHAT_TOKENS_PER_DIALOGUE = 1_400  # ultrachat_200k with the Zephyr template and Mistral tokenizer, typical
SHOWN_FIELDS = (
    "model_name_or_path",
    "dtype",
    "attn_implementation",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "packing_strategy",
    "optim",
    "bf16",
    "fp16",
    "logging_steps",
    "save_steps",
    "report_to",
    "eval_strategy",
    "dataset_name",
)


def recipe_changes(argv: list[str], settings: Settings) -> list[tuple[str, Any, Any, str]]:
    """(setting, recipe value, this run's value, who changed it) for each shown setting the profile or the command
    line changed from the recipe file: the diff a learner needs beside the recipe's table."""
    path, _ = split_config(argv)
    recipe = read_recipe(path) if path else {}
    changes = []
    for name in SHOWN_FIELDS:
        source = settings.sources.get(name)
        if source not in (PROFILE, CLI):
            continue
        value = getattr(settings.values[name], "value", settings.values[name])
        old = recipe.get(name, "(TRL default)")
        if name in recipe and _same(old, value):
            continue
        changes.append((name, old, value, source))
    return changes


def _same(a, b) -> bool:
    try:
        return a == b or float(a) == float(b)
    except (TypeError, ValueError):
        return False


def print_recipe_changes(argv: list[str], settings: Settings) -> None:
    """Print ``recipe_changes`` as 'setting: recipe -> this run (who)' lines, or that the recipe runs as written."""
    path, _ = split_config(argv)
    changes = recipe_changes(argv, settings)
    if not changes:
        print(f"{path} runs as written.")
        return
    print(f"Changed from {path} for this run (profile {settings.profile.name} and the arguments given):")
    width = max(len(name) for name, *_ in changes)
    for name, old, new, source in changes:
        print(f"  {name:<{width}}  {old!s:>22} -> {new}  ({source})")


# --- one packed row ------------------------------------------------------------------------------------------------
def fullest_row(trainer) -> int:
    """Index of the packed training row that holds the most dialogues (TRL's ``seq_lengths`` column; 0 when the rows
    were packed before TRL saw them, as ``packing_strategy: card`` does)."""
    if "seq_lengths" not in trainer.train_dataset.column_names:
        return 0
    lengths = trainer.train_dataset["seq_lengths"]
    return max(range(len(lengths)), key=lambda i: len(lengths[i]))


def packed_row_table(trainer, row: int = 0, start: int = 0, count: int = 48):
    """One collated training row as a table: token, id, label (or "masked"), position id, dialogue index.

    Padding-free packing puts several dialogues in one row; ``position_ids`` restart at 0 where each begins, and
    attention is kept inside each dialogue. The labels are the input ids: the model predicts each next token.
    """
    import pandas as pd

    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[row]])
    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    positions = batch["position_ids"][0].tolist() if "position_ids" in batch else list(range(len(ids)))
    dialogue, dialogues = -1, []
    for p in positions:
        dialogue += p == 0
        dialogues.append(dialogue)
    table = pd.DataFrame(
        {
            "token": tokenizer.convert_ids_to_tokens(ids),
            "id": ids,
            "label": [("masked" if lab == -100 else lab) for lab in labels],
            "position id": positions,
            "dialogue": dialogues,
        }
    )
    return table.iloc[start : start + count]


def with_assistant_only(table, tokenizer):
    """``table`` (``packed_row_table``) with a column "assistant only": the label where TRL's ``assistant_only_loss``
    (``--assistant_only_loss true`` here) keeps the loss, on the assistant's answers and the EOS ending each, and
    "masked" on the system and user turns and the template's markers."""
    from utils.training import assistant_header, assistant_mask

    mask = assistant_mask(table["id"].tolist(), assistant_header(tokenizer), tokenizer.eos_token_id)
    table = table.copy()
    table["assistant only"] = [lab if m else "masked" for lab, m in zip(table["label"], mask, strict=True)]
    return table


def loss_token_shares(rows: list[list[int]], tokenizer) -> dict[str, float]:
    """The share of training tokens that carry a label with the loss on every token (the card's way; only the
    first token of each dialogue has none) and on the assistant's answers only."""
    from utils.training import assistant_header, assistant_mask

    header, eos = assistant_header(tokenizer), tokenizer.eos_token_id
    total = sum(map(len, rows))
    assistant = sum(sum(assistant_mask(ids, header, eos)) for ids in rows)
    return {"every token": (total - len(rows)) / total, "assistant only": assistant / total}


def show_packed_row(table) -> None:
    """Display ``packed_row_table``: coloured HTML (a colour per dialogue, EOS in bold, "masked" in grey) where the
    front end renders HTML, the plain table otherwise."""
    import html

    from IPython.display import display

    palette = ["#e8f0fe", "#fde8e8", "#e6f4ea", "#fef7e0", "#f3e8fd", "#e0f7fa"]
    columns = list(table.columns)
    rows = []
    for index, r in table.iterrows():
        cells = [str(index)]
        for column in columns:
            value = r[column]
            if column == "token":
                value = html.escape(value).replace("\n", "\\n")
                value = f"<b>{value}</b>" if r["token"] in ("</s>", "<s>") else value
            elif value == "masked":
                value = '<span style="color:#999">masked</span>'
            cells.append(str(value))
        colour = palette[r["dialogue"] % len(palette)]
        rows.append(f'<tr style="background:{colour}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("#", *columns))
    content = f'<table style="font-family:monospace;font-size:12px"><tr>{head}</tr>{"".join(rows)}</table>'
    display({"text/html": content, "text/plain": table.to_string()}, raw=True)


def label_checks(trainer) -> dict:
    """Collate one training batch and check what the loss sees: EOS kept in the labels, share of loss tokens."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(4, len(trainer.train_dataset)))])
    ids, labels = batch["input_ids"], batch["labels"]
    eos = trainer.processing_class.eos_token_id
    eos_positions = ids == eos
    return {
        "rows": int(ids.shape[0]),  # padding-free batches are one long row
        "tokens": int(ids.numel()),
        "eos_tokens": int(eos_positions.sum()),
        "eos_tokens_in_loss": int((labels[eos_positions] == eos).sum()),
        "loss_token_share": round(float((labels != -100).float().mean()), 4),
        "pad_token": trainer.processing_class.pad_token,
    }


# --- the speed report ----------------------------------------------------------------------------------------------
def speed_report(trainer) -> dict:
    """The training set's row count, tokens/s, seconds per step, peak GPU memory (allocated and reserved), and the
    estimated time for one epoch of ultrachat_200k at this speed.

    Speed is the steady one (``StepTimer``: the steps after the first, without evaluation and saving); the whole
    ``train()`` call's runtime and tokens/s are reported beside it.

    The epoch's token count comes from the prepared data's report when it is the real dataset, otherwise from
    ultrachat_200k's typical 1,400 tokens per dialogue (the sample's dialogues are much shorter).
    """
    import torch

    from utils.callbacks import StepTimer

    summary = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
    runtime = summary.get("train_runtime", float("nan"))
    steps = trainer.state.global_step
    tokens = trainer.state.num_input_tokens_seen or 0
    # a resumed run's runtime is this session's: so are its steps and tokens (the checkpoint's are left out)
    session_tokens = tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    fast = not runtime or runtime < 0.5  # never a speed from a 0-s run
    overall = float("nan") if fast or session_tokens <= 0 else session_tokens / runtime
    timer = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer)), None)
    steady = timer.steady() if timer else None
    if timer is None:  # no step times (a trainer built without StepTimer): the runtime is all there is
        session_steps = steps - getattr(trainer, "_initial_global_step", 0)
        steady = (runtime / session_steps, overall) if session_steps > 0 and not fast else None
    step_s, tok_s = steady or (None, None)  # one timed step: its time is mostly compiling and warming up
    epoch_tokens, basis = ULTRACHAT_200K_TRAIN_ROWS * ULTRACHAT_TOKENS_PER_DIALOGUE, "1,400 tokens x 207,865 dialogues"
    prepared = _prepared_report(trainer)
    if prepared.get("dialogues", 0) >= 100_000:
        epoch_tokens, basis = prepared["total_tokens"], "the prepared data's report.json"
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rows = trainer.train_dataset
    return {
        "steps": steps,
        "packed_rows": len(rows) if hasattr(rows, "__len__") else None,  # the training set as the trainer saw it
        "tokens_seen": int(tokens),
        "seconds_per_step": round(step_s, 3) if step_s else None,  # the steps after the first, timed alone
        "tokens_per_second": round(tok_s, 1) if tok_s else None,  # None: fewer than 2 steps this session
        "train_runtime_s": round(runtime, 1),  # all of train(): the first step, evaluation and saving included
        "tokens_per_second_overall": round(overall, 1),
        "peak_gpu_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_gpu_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "ultrachat_200k_epoch_tokens": int(epoch_tokens),
        "ultrachat_200k_epoch_tokens_from": basis,
        "ultrachat_200k_epoch_hours_at_this_speed": round(epoch_tokens / tok_s / 3600, 1) if tok_s else None,
    }


def _prepared_report(trainer) -> dict:
    """The train split's statistics from the prepared data's report.json, when the trainer's data came from one."""
    files = getattr(trainer.train_dataset, "cache_files", None) or []
    for file in files:
        for folder in Path(file["filename"]).parents:
            report = folder / "report.json"
            if report.is_file():
                try:
                    return json.loads(report.read_text())["outputs"].get("train", {})
                except (OSError, ValueError, KeyError, AttributeError):
                    return {}
    return {}
