"""Tokenizer, chat template and model for each profile: Hub ids on real hardware, embedded defaults otherwise.

The embedded defaults need no network: the real Mistral-7B tokenizer shipped inside ``mistral-common``, converted
once to a fast tokenizer, and a tiny pretrained ``MistralForCausalLM`` (same architecture), cached in runs/assets/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path

from utils import CONFIGS_DIR, DATA_DIR, REPO_ROOT, ConfigError, temporary_folder

EMBEDDED_TOKENIZER_DIR = REPO_ROOT / "runs" / "assets" / "mistral-7b-tokenizer"
TINY_MODEL_DIR = REPO_ROOT / "runs" / "assets" / "tiny-mistral"
TINY_BASE_DIR = DATA_DIR / "tiny_base"  # the shipped weights (tools/tiny_base.py pretrains them)


def chat_template() -> str:
    """The Zephyr chat template of the alignment-handbook recipe (``configs/chat_template.jinja``)."""
    return (CONFIGS_DIR / "chat_template.jinja").read_text(encoding="utf-8")


def sentencepiece_file() -> Path:
    """The Mistral-7B v1 sentencepiece model that ``mistral-common`` ships."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@lru_cache(maxsize=2)
def sentencepiece_merges(model_file: str) -> tuple[dict[str, int], list[list[str]]]:
    """The vocabulary and BPE merges as transformers 4.34/4.35 wrote them: by merged piece in id order, then by
    ``(id(left), id(right))``, then stably by the piece's score (0 for <unk>, <s>, </s>, as then)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():  # in id order
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, sp.get_score(i) if i > 2 else 0.0) for left, right in pairs]
    merges.sort(key=lambda merge: merge[2], reverse=True)
    return vocab, [[left, right] for left, right, _ in merges]


def build_embedded_tokenizer(out_dir: Path = EMBEDDED_TOKENIZER_DIR):
    """The shipped sentencepiece model as a fast tokenizer with our chat template, saved to ``out_dir``. Like the Hub's
    of 2023: BOS, no EOS; ``legacy=True`` as Mistral was trained ("▁" (28705) after every special token text follows:
    the card's ids after ``</s>``); merges in score order (5.x's conversion sorts by id: runs of spaces split else)."""
    from transformers import LlamaTokenizer

    vocab, merges = sentencepiece_merges(str(sentencepiece_file()))
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=[tuple(pair) for pair in merges],
        legacy=True,
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=["<s>", "</s>"],  # as converting tokenizer.model lists them
    )
    tokenizer.chat_template = chat_template()
    tokenizer.init_kwargs["legacy"] = True  # written to tokenizer_config.json: loading rebuilds the pipeline from it
    tokenizer.init_kwargs["merges_by_score"] = True  # marks this build (an earlier one has merges by id)
    _save_atomically(out_dir, tokenizer.save_pretrained)
    return tokenizer


def load_tokenizer(model_id: str | None = None, revision: str = "main"):
    """The tokenizer of ``model_id`` (a Hub id at ``revision``, or a local folder), or the embedded Mistral-7B one
    when ``model_id`` is None or cannot be loaded; either way with our Zephyr chat template."""
    from transformers import AutoTokenizer

    if model_id is None:
        config = {}
        with contextlib.suppress(OSError, ValueError):  # rebuilt unless built with merges by score (and legacy)
            config = json.loads((EMBEDDED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
        if not (config.get("merges_by_score") is True and (EMBEDDED_TOKENIZER_DIR / "tokenizer.json").is_file()):
            build_embedded_tokenizer()
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER_DIR)
    elif model_id.startswith(("/", "./", "../", "~")) and not Path(model_id).expanduser().exists():
        raise ConfigError(f"tokenizer {model_id} does not exist; give a tokenizer folder or a Hub id")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)  # never trust_remote_code
        except Exception as exc:  # noqa: BLE001 - offline, gated or missing: fall back with one line
            print(f"Could not load the {model_id} tokenizer ({type(exc).__name__}); using the embedded Mistral-7B one.")
            return load_tokenizer(None)
    tokenizer.chat_template = chat_template()
    if tokenizer.pad_token is None:  # Mistral has none; <unk> keeps EOS out of every padding mask
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def tokenizer_name(tokenizer) -> str:
    """How a report names ``tokenizer``: its Hub id or folder, or "embedded" for the embedded Mistral-7B one."""
    name = str(tokenizer.name_or_path)
    return "embedded" if Path(name).resolve() == EMBEDDED_TOKENIZER_DIR.resolve() else name


def ensure_tiny_model(out_dir: Path = TINY_MODEL_DIR, source: Path = TINY_BASE_DIR) -> Path:
    """The tiny pretrained Mistral of ``source``, copied into ``out_dir`` with the embedded tokenizer beside it, so it
    loads like a Hub model; copied again when the shipped weights change (``source.json`` holds their SHA-256)."""
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    stamp = {"source": str(source.name), "model.safetensors sha256": digest, "tokenizer legacy, merges by score": True}
    with contextlib.suppress(OSError, ValueError):  # not built yet, or built from something else: (re)build
        if json.loads((out_dir / "source.json").read_text()) == stamp and (out_dir / "tokenizer.json").is_file():
            return out_dir
    tokenizer = load_tokenizer(None)

    def fill(folder: Path) -> None:
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(source / name, folder / name)
        (folder / "source.json").write_text(json.dumps(stamp) + "\n")
        tokenizer.save_pretrained(folder)

    _save_atomically(out_dir, fill)
    return out_dir


def _save_atomically(out_dir: Path, fill) -> None:
    """``fill(folder)`` a temporary sibling of ``out_dir``, then rename it, so a crash never leaves half a folder."""
    tmp = temporary_folder(out_dir.parent, f".{out_dir.name}-")
    fill(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
