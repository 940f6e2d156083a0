"""What a learner is shown about a run: the settings that differ from the recipe, one packed row token by token,
and what the loss sees."""

from __future__ import annotations

from typing import Any

from utils.recipe import CLI, PROFILE, Settings, read_recipe, split_config

SHOWN_FIELDS = """model_name_or_path dtype attn_implementation learning_rate num_train_epochs max_steps max_length
    per_device_train_batch_size gradient_accumulation_steps activation_checkpointing activation_checkpointing_kwargs
    packing_strategy optim bf16 fp16 logging_steps save_steps report_to eval_strategy dataset_name""".split()


def recipe_changes(argv: list[str], settings: Settings) -> list[tuple[str, Any, Any, str]]:
    """(setting, recipe value, this run's value, who changed it) for each shown setting the profile or the command
    line changed from the recipe file."""
    path, _ = split_config(argv)
    recipe = read_recipe(path) if path else {}
    changes = []
    for name in (n for n in SHOWN_FIELDS if settings.sources.get(n) in (PROFILE, CLI)):
        value = getattr(settings.values[name], "value", settings.values[name])
        if name not in recipe or not _same(recipe[name], value):
            changes.append((name, recipe.get(name, "(TRL default)"), value, settings.sources[name]))
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
    """Index of the packed training row holding the most dialogues (TRL's ``seq_lengths``; 0 for rows packed before
    TRL saw them, as ``packing_strategy: card`` does)."""
    if "seq_lengths" not in trainer.train_dataset.column_names:
        return 0
    lengths = trainer.train_dataset["seq_lengths"]
    return max(range(len(lengths)), key=lambda i: len(lengths[i]))


def packed_row_table(trainer, row: int = 0, start: int = 0, count: int = 48):
    """One collated training row as a table: token, id, label (or "masked"), position id, dialogue index (padding-free
    packing restarts ``position_ids`` at 0 where each dialogue begins, and keeps attention inside it)."""
    import pandas as pd

    batch = trainer.data_collator([trainer.train_dataset[row]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    positions = batch["position_ids"][0].tolist() if "position_ids" in batch else list(range(len(ids)))
    table = pd.DataFrame(
        {
            "token": trainer.processing_class.convert_ids_to_tokens(ids),
            "id": ids,
            "label": ["masked" if lab == -100 else lab for lab in labels],
            "position id": positions,
            "dialogue": (pd.Series(positions) == 0).cumsum() - 1,
        }
    )
    return table.iloc[start : start + count]


def with_assistant_only(table, tokenizer):
    """``table`` (``packed_row_table``) with a column "assistant only": the label where ``--assistant_only_loss true``
    keeps the loss (the assistant's answers and the EOS ending each), else "masked"."""
    from utils.training import assistant_header, assistant_mask

    mask = assistant_mask(table["id"].tolist(), assistant_header(tokenizer), tokenizer.eos_token_id)
    kept = [lab if m else "masked" for lab, m in zip(table["label"], mask, strict=True)]
    return table.assign(**{"assistant only": kept})  # a copy


def loss_token_shares(rows: list[list[int]], tokenizer) -> dict[str, float]:
    """The share of training tokens that carry a label with the loss on every token (the card's way: all but
    each dialogue's first) and on the assistant's answers only."""
    from utils.training import assistant_header, assistant_mask

    header, eos = assistant_header(tokenizer), tokenizer.eos_token_id
    total = sum(map(len, rows))
    assistant = sum(sum(assistant_mask(ids, header, eos)) for ids in rows)
    return {"every token": (total - len(rows)) / total, "assistant only": assistant / total}


def show_packed_row(table) -> None:
    """Display ``packed_row_table`` as coloured HTML (a colour per dialogue, EOS in bold, "masked" grey), or plain."""
    import html

    from IPython.display import display

    palette = ["#e8f0fe", "#fde8e8", "#e6f4ea", "#fef7e0", "#f3e8fd", "#e0f7fa"]
    rows = []
    for index, r in table.iterrows():
        cells = [str(index)]
        for column, value in r.items():
            if column == "token":
                value = html.escape(value).replace("\n", "\\n")
                value = f"<b>{value}</b>" if r["token"] in ("</s>", "<s>") else value
            elif value == "masked":
                value = '<span style="color:#999">masked</span>'
            cells.append(str(value))
        colour = palette[r["dialogue"] % len(palette)]
        rows.append(f'<tr style="background:{colour}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("#", *table.columns))
    content = f'<table style="font-family:monospace;font-size:12px"><tr>{head}</tr>{"".join(rows)}</table>'
    display({"text/html": content, "text/plain": table.to_string()}, raw=True)


def label_checks(trainer) -> dict:
    """What the loss sees in the run's first batch (``per_device_train_batch_size`` packed rows): the EOS tokens kept
    in the labels, the share of tokens with a label."""
    size = min(trainer.args.per_device_train_batch_size, len(trainer.train_dataset))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(size)])
    ids, labels = batch["input_ids"], batch["labels"]
    eos = trainer.processing_class.eos_token_id
    eos_positions = ids == eos
    return {
        "rows": size,  # packed rows (padding-free batches are one long row)
        "tokens": int(ids.numel()),
        "eos_tokens": int(eos_positions.sum()),
        "eos_tokens_in_loss": int((labels[eos_positions] == eos).sum()),
        "loss_token_share": round(float((labels != -100).float().mean()), 4),
        "pad_token": trainer.processing_class.pad_token,
    }
