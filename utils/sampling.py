"""Notebook 05: the card's pirate prompt on the base and fine-tuned models, side by side.

python -m utils.sampling                                   # every model found under runs/, the card's prompt
python -m utils.sampling --model runs/qlora/merged --prompt "Name three rivers." --max_new_tokens 64 --seed 1

Each answer is also appended to ``runs/sampling/answers.jsonl`` with its settings: notebook 05's check cell reads it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from utils import REPO_ROOT, RUNS_DIR, ConfigError
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
MORE_PROMPTS = [
    "Explain what a chat template is in two sentences.",
    "Write a haiku about fine-tuning a language model.",
    "What is the capital of Australia?",
]
# The tiny smoke models know only their small world: three of the questions no training dialogue asks
# (utils.tiny_world.CHECK_QUESTIONS).
SMOKE_PROMPTS = ["Tell me about a banana.", "Where can I find a cat?", "What does a key do?"]
SFT_BETA_ID = "HuggingFaceH4/mistral-7b-sft-beta"


def more_prompts(profile: Profile) -> list[str]:
    """The questions asked after the pirate prompt: ``MORE_PROMPTS``, or ``SMOKE_PROMPTS`` for the tiny models."""
    return SMOKE_PROMPTS if profile.is_smoke else MORE_PROMPTS


# The card's own answer to the pirate prompt (its model card, "Intended uses & limitations"). Its printed prompt ends
# "pirate." while its messages say "pirate": we render the messages, as the card's code does.
CARD_ANSWER = (
    "Ah, me hearty matey! But yer question be a puzzler! A human cannot eat a helicopter in one sitting, as "
    "helicopters are not edible. They be made of metal, plastic, and other materials, not food!"
)


class SamplingError(ConfigError):
    """A model or option that cannot be used: one line for the user."""


@dataclass
class Answer:
    """One generated answer: its text, how many tokens it took, and whether it ended with EOS."""

    prompt: str
    text: str
    new_tokens: int
    stopped_at_eos: bool


ANSWER_LOG = RUNS_DIR / "sampling" / "answers.jsonl"


_UNLOGGED: set[Path] = set()  # logs that could not be written to: said once each


def log_answer(answer: Answer, model: str, settings: dict, path: Path = ANSWER_LOG) -> None:
    """Append one answer and the settings that produced it to ``path`` (JSON Lines). Where it cannot be written (a
    read-only or full disk) sampling goes on: one line says so, once."""
    import json

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
    """The answers ``log_answer`` wrote, oldest first; a line that is not a JSON object with a model and a text (a
    damaged or hand-edited line, or one cut inside a character by a stopped write) is skipped."""
    import json

    try:
        data = path.read_bytes()
    except OSError:  # nothing logged yet
        return []
    rows = []
    for line in data.split(b"\n"):  # bytes: each line decodes on its own, and only "\n" ends one
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except ValueError:  # UnicodeDecodeError is one
            continue
    return [
        r for r in rows if isinstance(r, dict) and isinstance(r.get("model"), str) and isinstance(r.get("text"), str)
    ]


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
        models["mistral-7b-sft-beta"] = SFT_BETA_ID
    return models


def sampling_dtype(profile: Profile):
    """The profile's compute dtype: float16 on a T4 (``torch.cuda.is_bf16_supported()`` counts emulation and says
    True there), bfloat16 on Ampere and newer, float32 on a CPU."""
    import torch

    return getattr(torch, profile.compute_dtype)


def load_for_sampling(ref: str, profile: Profile):
    """A model folder or Hub id in the profile's dtype; an adapter folder goes onto the 4-bit base it was trained on.
    A folder whose weights cannot be read is a SamplingError naming it."""
    from transformers import AutoModelForCausalLM

    dtype = sampling_dtype(profile)
    try:
        if (Path(ref) / "adapter_config.json").is_file():
            from trl import ModelConfig, get_quantization_config

            from utils.assets import ensure_tiny_model
            from utils.model import load_adapter, load_model

            base_args = ModelConfig(
                model_name_or_path=profile.model_id or str(ensure_tiny_model()),
                dtype=profile.compute_dtype,
                attn_implementation="sdpa",
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
            )
            return load_adapter(load_model(base_args, get_quantization_config(base_args)), ref).eval()
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, device_map="auto").eval()
    except Exception as exc:  # noqa: BLE001 - a damaged or truncated weights file (SafetensorError), an unreachable id
        raise SamplingError(f"cannot load {ref}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def prompt_batch(tokenizer, prompts: list[str], tokenization: str = "card") -> dict:
    """``input_ids`` and ``attention_mask`` of rendered ``prompts``, left-padded (a decoder-only model continues
    from the right end of every row), in the ids the model was trained on.

    ``card`` (and ``card-text``, the same on a rendered prompt): the card's ids, "▁" (28705) after every ``</s>``
    (``utils.card_era``), as ``utils.prepare_data`` writes them by default; ``today``: the tokenizer's own ids.
    """
    import torch

    from utils.card_era import era_backend

    scheme = "today" if tokenization == "today" else "card"
    rows = [e.ids for e in era_backend(tokenizer, scheme).encode_batch(prompts)]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def generate(
    model,
    tokenizer,
    prompts: list[str],
    seed: int = 42,
    eos_token_id: int | None = None,
    tokenization: str = "card",
    **sampling,
) -> list[Answer]:
    """Sample answers for rendered ``prompts`` in one left-padded batch; stop each at EOS.

    The prompts are tokenized as the training data was (``prompt_batch``). ``set_seed`` before the batch makes a
    re-run print the same text. Answers are cut at the first EOS, and ``stopped_at_eos`` says whether they ended
    there or ran into ``max_new_tokens``.
    """
    import torch
    from transformers import set_seed

    settings = {**CARD_SAMPLING, **sampling}
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    batch = {k: v.to(model.device) for k, v in prompt_batch(tokenizer, prompts, tokenization).items()}
    prompt_tokens = batch["input_ids"].shape[1]
    room = max_new_tokens_allowed(model, prompt_tokens)
    if room < 1:
        raise SamplingError(
            f"the prompt has {prompt_tokens} tokens; the model has {model.config.max_position_embeddings} positions, "
            "so no room is left to answer: shorten the prompt"
        )
    if settings["max_new_tokens"] > room:  # the model has no positions beyond max_position_embeddings
        settings["max_new_tokens"] = room
    set_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, eos_token_id=eos, pad_token_id=pad, **settings)
    answers = []
    for prompt, row in zip(prompts, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
        stopped = eos in row
        tokens = row[: row.index(eos)] if stopped else row
        answers.append(
            Answer(prompt, tokenizer.decode(tokens, skip_special_tokens=True), len(tokens) + stopped, stopped)
        )
    return answers


def turn_marker_lines(answers: list[Answer]) -> list[str]:
    """How many of a fine-tune's ``answers`` write a turn marker (``<|user|>``, any ``<|``) before their first
    ``</s>``, up to two of them, and where that comes from: the card's recipe trains on every token."""
    written = [a for a in answers if "<|" in a.text]
    lines = [
        f"{len(written)} of the fine-tunes' {len(answers)} answers in sections 3 and 4 write a turn marker (<|user|> "
        f"or another <|) themselves{':' if written else '.'}"
    ]
    lines += [f"  {a.text!r}" for a in written[:2]]
    why = (
        "The card's recipe puts the loss on every token, the user's turns included (notebook 02, section 6), so a "
        "fine-tune of it is trained to write the user's next turn as well as its own answer"
    )
    if written:
        lines.append(
            f"{why}: such an answer goes on with a turn of its own instead of stopping, and counts neither as a stop "
            "nor as clean. With the loss on the answers only (notebook 02's Try this), no user turn is trained."
        )
    else:
        lines.append(f"{why}; an answer that does counts neither as a stop nor as clean.")
    return lines


def max_new_tokens_allowed(model, prompt_tokens: int) -> int:
    """How many tokens fit after a prompt of ``prompt_tokens`` within the model's ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    return max(0, limit - prompt_tokens)


def check_model_ref(ref: str) -> str:
    """``ref`` if it is a model folder or looks like a Hub id; a missing local folder is named as such."""
    path = Path(ref)
    if path.exists():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise SamplingError(f"{ref} is not a model folder (no config.json or adapter_config.json)")
        return ref
    if (
        ref.startswith((".", "/", "~"))
        or ref.count("/") != 1
        or (REPO_ROOT / ref).exists()
        or ref.startswith(("runs/", "data/"))
    ):
        raise SamplingError(f"no such model folder: {ref}")
    return ref


def parse_args(argv: list[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        help="model folder, adapter folder or Hub id (repeatable); default: every model found under runs/",
    )
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
    return args


def main(argv: list[str] | None = None) -> int:
    from utils.assets import load_tokenizer
    from utils.hardware import choose_profile, hub_reachable

    args = parse_args(argv)
    try:
        refs = [check_model_ref(ref) for ref in args.model or []]
    except SamplingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    profile = choose_profile(args.profile)
    tokenizer = load_tokenizer(profile.model_id)
    messages = (
        PIRATE
        if args.prompt is None
        else [  # no --system: the card's empty system turn, as in every training dialogue without one
            {"role": "system", "content": args.system or ""},
            {"role": "user", "content": args.prompt},
        ]
    )
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    models = {ref: ref for ref in refs} or candidate_models(profile, hub=hub_reachable())
    for name, ref in models.items():
        try:
            model = load_for_sampling(ref, profile)
            answer = generate(
                model,
                tokenizer,
                [prompt],
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
            )[0]
        except SamplingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        settings = {k: getattr(args, k) for k in ("prompt", "system", "seed", "temperature", "max_new_tokens")}
        log_answer(answer, name, settings)
        print(f"== {name} ({answer.new_tokens} tokens, {'EOS' if answer.stopped_at_eos else 'max_new_tokens'})")
        print(answer.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
