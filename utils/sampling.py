"""Notebook 05: the card's pirate prompt on the base and fine-tuned models, side by side.

    python -m utils.sampling          # one sampled answer per model found, with the card's settings
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from utils import RUNS_DIR
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
SFT_BETA_ID = "HuggingFaceH4/mistral-7b-sft-beta"


@dataclass
class Answer:
    """One generated answer: its text, how many tokens it took, and whether it ended with EOS."""

    prompt: str
    text: str
    new_tokens: int
    stopped_at_eos: bool


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


def load_model(ref: str, profile: Profile, dtype):
    """A model folder or Hub id in ``dtype``; an adapter folder goes onto the 4-bit base it was trained on."""
    from transformers import AutoModelForCausalLM

    if (Path(ref) / "adapter_config.json").is_file():
        from trl import ModelConfig

        from utils import sft
        from utils.assets import ensure_tiny_model

        base_args = ModelConfig(model_name_or_path=profile.model_id or str(ensure_tiny_model()),
                                dtype=str(dtype).removeprefix("torch."), attn_implementation="sdpa",
                                load_in_4bit=True, bnb_4bit_quant_type="nf4")
        return sft.load_adapter(sft.load_model(base_args, sft.bnb_config(base_args)), ref).eval()
    return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, device_map="auto").eval()


def generate(model, tokenizer, prompts: list[str], seed: int = 42, eos_token_id: int | None = None,
             **sampling) -> list[Answer]:
    """Sample answers for rendered ``prompts`` in one left-padded batch; stop each at EOS.

    ``set_seed`` before the batch makes a re-run print the same text. Answers are cut at the first EOS, and
    ``stopped_at_eos`` says whether they ended there or ran into ``max_new_tokens``.
    """
    import torch
    from transformers import set_seed

    settings = {**CARD_SAMPLING, **sampling}
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end of every row
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(model.device)
    set_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **settings)
    answers = []
    for prompt, row in zip(prompts, out[:, batch["input_ids"].shape[1]:].tolist()):
        stopped = eos in row
        tokens = row[: row.index(eos)] if stopped else row
        answers.append(Answer(prompt, tokenizer.decode(tokens, skip_special_tokens=True), len(tokens) + stopped, stopped))
    return answers


def main(argv: list[str] | None = None) -> int:
    import torch

    from utils.assets import load_tokenizer
    from utils.hardware import choose_profile, hub_reachable

    profile = choose_profile("auto")
    tokenizer = load_tokenizer(profile.model_id)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    prompt = tokenizer.apply_chat_template(PIRATE, tokenize=False, add_generation_prompt=True)
    for name, ref in candidate_models(profile, hub=hub_reachable()).items():
        answer = generate(load_model(ref, profile, dtype), tokenizer, [prompt])[0]
        print(f"== {name} ({answer.new_tokens} tokens, {'EOS' if answer.stopped_at_eos else 'max_new_tokens'})")
        print(answer.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
