"""Notebook 05: the card's pirate prompt on the base and fine-tuned models, side by side.

``python -m utils.sampling [--model DIR_OR_ID] [--prompt TEXT]`` also appends each answer with its settings to
``runs/sampling/answers.jsonl``, which notebook 05's check cell reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from utils import DATA_DIR, REPO_ROOT, RUNS_DIR, ConfigError
from utils.hardware import Profile

PIRATE = [
    {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
    {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
]
CARD_RENDERING = (
    "<|system|>\nYou are a friendly chatbot who always responds in the style of a pirate</s>\n"
    "<|user|>\nHow many helicopters can a human eat in one sitting?</s>\n<|assistant|>\n"
)
CARD_SAMPLING = dict(max_new_tokens=256, do_sample=True, temperature=0.7, top_k=50, top_p=0.95)
# The card's own answer. Its printed prompt ends "pirate." while its messages say "pirate": we render the messages.
CARD_ANSWER = json.loads((DATA_DIR / "card_reference.json").read_text())["pirate_answer"]
ANSWER_LOG = RUNS_DIR / "sampling" / "answers.jsonl"


def more_prompts(profile: Profile) -> list[str]:
    """The questions after the pirate prompt; to the tiny smoke models, three of their world no dialogue asks."""
    if profile.is_smoke:
        return ["Tell me about a banana.", "Where can I find a cat?", "What does a key do?"]
    return [
        "Explain what a chat template is in two sentences.",
        "Write a haiku about fine-tuning a language model.",
        "What is the capital of Australia?",
    ]


class SamplingError(ConfigError):
    """A model or option that cannot be used: one line for the user."""


@dataclass
class Answer:
    prompt: str
    text: str  # cut at the first EOS
    new_tokens: int  # the EOS included
    stopped_at_eos: bool  # or ran into max_new_tokens


_UNLOGGED: set[Path] = set()  # logs that could not be written to: said once each


def log_answer(answer: Answer, model: str, settings: dict, path: Path = ANSWER_LOG) -> None:
    """Append one answer and its settings to ``path`` (JSON Lines); a read-only or full disk is said once, not fatal."""
    record = {"model": model, **settings, "text": answer.text, "stopped_at_eos": answer.stopped_at_eos}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as exc:
        if path not in _UNLOGGED:
            _UNLOGGED.add(path)
            print(f"Note: answers cannot be logged to {path} ({exc.strerror}); the check cell will not see them.")


def logged_answers(path: Path = ANSWER_LOG) -> list[dict]:
    """The logged answers, oldest first, less lines not a JSON object with a model and a text (damaged, cut short)."""
    rows = []
    with contextlib.suppress(OSError):  # nothing logged yet
        for line in path.read_bytes().split(b"\n"):  # bytes: each line decodes on its own, and only "\n" ends one
            with contextlib.suppress(ValueError):  # UnicodeDecodeError is one
                rows.append(json.loads(line.decode("utf-8")))
    return [r for r in rows if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("model", "text"))]


def candidate_models(profile: Profile, runs_dir: Path = RUNS_DIR, hub: bool = False) -> dict[str, str]:
    """Name -> model folder or Hub id: the base, our fine-tunes found under ``runs_dir``, and the card's model."""
    from utils.assets import ensure_tiny_model

    models = {"base": profile.model_id or str(ensure_tiny_model())}
    if (runs_dir / "qlora" / "adapter" / "adapter_config.json").is_file():
        models["qlora (4-bit + adapter)"] = str(runs_dir / "qlora" / "adapter")
    for name, folder in (("qlora (merged)", runs_dir / "qlora" / "merged"), ("full", runs_dir / "full" / "model")):
        if (folder / "config.json").is_file():
            models[name] = str(folder)
    if hub:
        models["mistral-7b-sft-beta"] = "HuggingFaceH4/mistral-7b-sft-beta"
    return models


def sampling_dtype(profile: Profile):
    """The profile's compute dtype: float16 on a T4 (``torch.cuda.is_bf16_supported()`` counts emulation and says
    True there), bfloat16 on Ampere and newer, float32 on a CPU."""
    import torch

    return getattr(torch, profile.compute_dtype)


def load_for_sampling(ref: str, profile: Profile):
    """A model folder or Hub id in the profile's dtype, an adapter onto its 4-bit base; unreadable: SamplingError."""
    from transformers import AutoModelForCausalLM

    try:
        if (Path(ref) / "adapter_config.json").is_file():
            from trl import ModelConfig, get_quantization_config

            from utils.assets import TINY_MODEL_DIR
            from utils.model import load_adapter, load_model

            base_args = ModelConfig(
                model_name_or_path=profile.model_id or str(TINY_MODEL_DIR),  # load_model builds the tiny one
                dtype=profile.compute_dtype,
                attn_implementation="sdpa",
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
            )
            return load_adapter(load_model(base_args, get_quantization_config(base_args)), ref).eval()
        return AutoModelForCausalLM.from_pretrained(ref, dtype=sampling_dtype(profile), device_map="auto").eval()
    except Exception as exc:  # noqa: BLE001 - a damaged or truncated weights file (SafetensorError), an unreachable id
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SamplingError(f"cannot load {ref}: {first}") from None


def prompt_batch(tokenizer, prompts: list[str], tokenization: str = "card") -> dict:
    """Rendered ``prompts`` left-padded, in the ids the model was trained on: ``card`` (or ``card-text``), as
    ``utils.prepare_data`` writes them by default ("▁" after every ``</s>``); ``today``, the tokenizer's own."""
    from utils.card_era import era_backend

    if tokenizer.pad_token is None:  # utils.assets.load_tokenizer always sets one
        raise SamplingError("the tokenizer has no pad token to left-pad prompts with: load it with load_tokenizer")
    backend = era_backend(tokenizer, "today" if tokenization == "today" else "card")
    rows = [e.ids for e in backend.encode_batch(prompts)]
    return dict(tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt"))


def generate(model, tokenizer, prompts: list[str], seed: int = 42, eos_token_id=None, **sampling) -> list[Answer]:
    """Sample answers to rendered ``prompts`` in one batch, each cut at its first EOS; the same seed, the same text."""
    import torch
    from transformers import set_seed

    settings = {**CARD_SAMPLING, **sampling}
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    batch = {k: v.to(model.device) for k, v in prompt_batch(tokenizer, prompts).items()}
    prompt_tokens = batch["input_ids"].shape[1]
    positions = getattr(model.config, "max_position_embeddings", None) or 10**9  # none beyond these
    if prompt_tokens >= positions:
        raise SamplingError(
            f"the prompt has {prompt_tokens} tokens; the model has {positions} positions, "
            "so no room is left to answer: shorten the prompt"
        )
    settings["max_new_tokens"] = min(settings["max_new_tokens"], positions - prompt_tokens)
    set_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **settings)
    answers = []
    for prompt, row in zip(prompts, out[:, prompt_tokens:].tolist(), strict=True):
        stopped = eos in row
        tokens = row[: row.index(eos)] if stopped else row
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        answers.append(Answer(prompt, text, len(tokens) + stopped, stopped))
    return answers


def turn_marker_lines(answers: list[Answer]) -> list[str]:
    """How many of a fine-tune's ``answers`` write a turn marker (``<|user|>``, any ``<|``) before their first
    ``</s>``, up to two of them, and why: the card's recipe trains on every token."""
    written = [a for a in answers if "<|" in a.text]
    end = (
        ": such an answer goes on with a turn of its own instead of stopping, and counts neither as a stop nor as "
        "clean. With the loss on the answers only (notebook 02's Try this), no user turn is trained."
        if written
        else "; an answer that does counts neither as a stop nor as clean."
    )
    return [
        f"{len(written)} of the fine-tunes' {len(answers)} answers in sections 3 and 4 write a turn marker (<|user|> "
        f"or another <|) themselves{':' if written else '.'}",
        *(f"  {a.text!r}" for a in written[:2]),
        "The card's recipe puts the loss on every token, the user's turns included (notebook 02, section 6), so a "
        f"fine-tune of it is trained to write the user's next turn as well as its own answer{end}",
    ]


def check_model_ref(ref: str) -> str:
    """``ref`` if it is a model folder or looks like a Hub id; a missing local folder is named as such."""
    path = Path(ref)
    if path.exists():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise SamplingError(f"{ref} is not a model folder (no config.json or adapter_config.json)")
    elif ref.startswith((".", "/", "~", "runs/", "data/")) or ref.count("/") != 1 or (REPO_ROOT / ref).exists():
        raise SamplingError(f"no such model folder: {ref}")
    return ref


def main(argv: list[str] | None = None) -> int:
    from utils.assets import load_tokenizer
    from utils.hardware import choose_profile, hub_reachable

    parser = argparse.ArgumentParser(prog="python -m utils.sampling", description=__doc__.split("\n\n")[0])
    model_help = "model folder, adapter folder or Hub id (repeatable); default: every model found under runs/"
    parser.add_argument("--model", action="append", help=model_help)
    parser.add_argument("--prompt", default=None, help="a user message; default: the card's pirate prompt")
    parser.add_argument("--system", default=None, help="a system message for --prompt")
    parser.add_argument("--max_new_tokens", type=int, default=CARD_SAMPLING["max_new_tokens"])
    parser.add_argument("--temperature", type=float, default=CARD_SAMPLING["temperature"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", default="auto", help="auto, smoke, or a GPU profile (utils/hardware.py)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.exit(2, f"error: --max_new_tokens must be 1 or more, got {args.max_new_tokens}\n")
    if not 0 < args.temperature <= 100:
        parser.exit(2, f"error: --temperature must be in (0, 100], got {args.temperature}\n")
    if not 0 <= args.seed < 2**32:
        parser.exit(2, f"error: --seed must be a whole number from 0 to 2**32 - 1, got {args.seed}\n")
    settings = {k: getattr(args, k) for k in ("prompt", "system", "seed", "temperature", "max_new_tokens")}
    try:
        models = {ref: check_model_ref(ref) for ref in args.model or []}
        profile = choose_profile(args.profile)
        tokenizer = load_tokenizer(profile.model_id)
        # no --system: the card's empty system turn, as in every training dialogue without one
        messages = [{"role": "system", "content": args.system or ""}, {"role": "user", "content": args.prompt}]
        messages = PIRATE if args.prompt is None else messages
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for name, ref in (models or candidate_models(profile, hub=hub_reachable())).items():
            model = load_for_sampling(ref, profile)
            sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
            answer = generate(model, tokenizer, [prompt], args.seed, **sampling)[0]
            log_answer(answer, name, settings)
            print(f"== {name} ({answer.new_tokens} tokens, {'EOS' if answer.stopped_at_eos else 'max_new_tokens'})")
            print(answer.text)
    except SamplingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
