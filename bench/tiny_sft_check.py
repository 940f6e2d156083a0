"""Does the embedded default learn? The pretrained tiny base, QLoRA SFT as notebook 02 runs it, and the checks.

    python bench/tiny_sft_check.py                       # about 2 minutes on 2 idle CPU cores
    python bench/tiny_sft_check.py --epochs 3 --json runs/tiny_sft_check.json --card_ids

Loads ``data/tiny_base`` (``utils.tiny_base``) in 4-bit NF4, trains LoRA r16 on every linear layer with TRL's
``SFTTrainer`` (bfd packing, fp32 on the CPU) on the dialogues of ``data/sample/ultrachat_200k``, and runs
``utils.tiny_dialogues.check_model`` before and after: of 8 sampled answers, how many stop at EOS inside the template,
how many talk like a pirate, and how many are words rather than random tokens, with and without the pirate system
prompt. The dialogues are rendered here (Zephyr template, the card's empty system turn, EOS after each dialogue), not
by notebook 01's pipeline, so the check does not depend on it; ``--card_ids`` puts the card-era token 28705 ("▁")
after every EOS that text follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import SAMPLE_DIR  # noqa: E402

ROLES = ("system", "user", "assistant")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_dialogues(folder: Path) -> dict[str, list[list[dict]]]:
    """Well-formed dialogues per split (``train_sft-pirate.jsonl`` joins ``train_sft``); other rows are skipped."""
    splits: dict[str, list[list[dict]]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        split = "test" if path.name.startswith("test") else "train"
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                messages = json.loads(line)["messages"]
            except (ValueError, TypeError, KeyError):
                continue
            if well_formed(messages):
                splits.setdefault(split, []).append(messages)
    return splits


def well_formed(messages) -> bool:
    """An optional system message first, then user/assistant turns that alternate, start with the user and end
    with the assistant, every content a non-empty string."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return False
    if not all(m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        return False
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    return (
        bool(roles) and roles == ["user", "assistant"] * (len(roles) // 2) and all(m["content"].strip() for m in turns)
    )


def token_ids(tokenizer, dialogues: list[list[dict]], card_ids: bool = False) -> list[list[int]]:
    """``<s>`` + the Zephyr rendering with the card's empty system turn + ``</s>`` for each dialogue."""
    out = []
    for messages in dialogues:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": ""}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False) + tokenizer.eos_token
        ids = tokenizer(text)["input_ids"]
        if card_ids:  # the 2023 tokenizer.json put "▁" (28705) before the text that follows each special token
            ids = [j for i, t in enumerate(ids) for j in ([t, 28705] if t == 2 and i + 1 < len(ids) else [t])]
        out.append(ids)
    return out


def load_4bit(folder: Path):
    """The base as notebook 02 loads it: 4-bit NF4 weights, float32 compute on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    from utils.model import keep_standard_4bit_layout

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa", quantization_config=quantization
    )
    keep_standard_4bit_layout(model)  # the same numbers on every CPU (see its docstring)
    return model


def checks(model, tokenizer, questions: list[str], label: str) -> dict:
    from utils.tiny_dialogues import check_model

    out = {}
    for question in questions:
        for mode, result in check_model(model.eval(), tokenizer, question).items():
            print(
                f"{label:>10} | {question[:40]:40} | {mode:6} | stops {result.stops}/8 | pirate {result.pirate}/8 | "
                f"readable {result.readable}/8"
            )
            out[f"{question} | {mode}"] = {
                "stops": result.stops,
                "pirate": result.pirate,
                "readable": result.readable,
                "answers": [a.text for a in result.answers],
            }
    return out


def train(model, tokenizer, train_ids: list[list[int]], args):
    """QLoRA SFT with notebook 02's objects: LoRA r16/alpha16/dropout 0.05 on every linear layer, bfd packing."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=args.output_dir,
        packing=True,
        packing_strategy="bfd",
        max_length=args.max_length,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        num_train_epochs=args.epochs,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to=[],
        seed=42,
        activation_checkpointing=False,
    )
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.05, target_modules=MODULES, bias="none", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"input_ids": train_ids}),
        processing_class=tokenizer,
        peft_config=lora,
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timing = {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    return trainer.model, {"steps": trainer.state.global_step, **timing, "losses": losses}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.tiny_dialogues import CHECK_QUESTION

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE_DIR / "ultrachat_200k")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--question", action="append", help=f"default: {CHECK_QUESTION!r}")
    parser.add_argument("--card_ids", action="store_true", help="train on card-era ids (28705 after each EOS)")
    parser.add_argument("--skip_base", action="store_true", help="do not check the base model")
    parser.add_argument("--output_dir", default="/tmp/tiny_sft_check")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.question = args.question or [CHECK_QUESTION]
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from utils.assets import load_tokenizer
    from utils.tiny_base import ensure_tiny_base
    from utils.tiny_dialogues import loss_ends, loss_halved

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(None)
    dialogues = read_dialogues(args.data)
    train_ids = token_ids(tokenizer, dialogues["train"], args.card_ids)
    print(f"{len(train_ids)} training dialogues, {sum(map(len, train_ids)):,} tokens")
    model = load_4bit(ensure_tiny_base())
    result: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_base:
        result["base"] = checks(model, tokenizer, args.question, "base")
    tuned, result["training"] = train(model, tokenizer, train_ids, args)
    losses = result["training"]["losses"]
    result["loss_halved"] = loss_halved(losses)
    first, last = loss_ends(losses)
    print(
        f"trained {result['training']['steps']} steps in {result['training']['seconds']} s; loss {first:.2f} -> "
        f"{last:.2f} (medians of the first and last tenth), halved: {result['loss_halved']}"
    )
    result["tuned"] = checks(tuned, tokenizer, args.question, "fine-tuned")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
