"""Tokenizer, chat template and model for each profile: Hub ids on real hardware, embedded defaults otherwise.

The embedded defaults need no network:
- the real Mistral-7B tokenizer (sentencepiece, 32,000 pieces, BOS 1, EOS 2) shipped inside ``mistral-common``,
  converted once to a fast tokenizer and cached under ``runs/assets/``: legacy, with its merges in sentencepiece-score
  order, as the Hub's ``tokenizer.json`` of 2023, so that ``tokenizer(text)`` gives the card's ids on the Zephyr
  template's text (every sample dialogue, a test counts them; not on a piece between special tokens that starts with
  a space, such as text after ``</s>`` typed in a message: ``utils.card_era`` gives those);
- a tiny ``MistralForCausalLM`` (same architecture, random weights), built once and cached there too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from utils import CONFIGS_DIR, DATA_DIR, REPO_ROOT, ConfigError, temporary_folder

CHAT_TEMPLATE_FILE = CONFIGS_DIR / "chat_template.jinja"
ASSETS_DIR = REPO_ROOT / "runs" / "assets"
EMBEDDED_TOKENIZER_DIR = ASSETS_DIR / "mistral-7b-tokenizer"
TINY_MODEL_DIR = ASSETS_DIR / "tiny-mistral"
TINY_BASE_DIR = DATA_DIR / "tiny_base"  # the shipped weights (tools/tiny_base.py pretrains them)

# A Mistral-7B in miniature: same vocabulary, GQA, RoPE and sliding-window settings, 4 layers of width 64.
TINY_MISTRAL = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    sliding_window=4096,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def chat_template() -> str:
    """The Zephyr chat template of the alignment-handbook recipe (``configs/chat_template.jinja``)."""
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


def sentencepiece_file() -> Path:
    """Path of the Mistral-7B v1 sentencepiece model shipped by ``mistral-common``."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common {mistral_common.__version__} does not ship {path.name}")
    return path


def card_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[list[str]]:
    """BPE merges in the order transformers 4.34/4.35 wrote them for a sentencepiece BPE model: grouped by the
    merged piece in id order, ``(id(left), id(right))`` within it, then stably sorted by the piece's score."""
    merges = []
    for piece in sorted(vocab, key=vocab.__getitem__):
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, scores.get(piece, 0.0)) for left, right in pairs]
    merges.sort(key=lambda merge: merge[2], reverse=True)
    return [[left, right] for left, right, _ in merges]


@lru_cache(maxsize=2)
def sentencepiece_processor(model_file: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_file)


@lru_cache(maxsize=2)
def sentencepiece_merges(model_file: str) -> tuple[dict[str, int], list[list[str]]]:
    """The model's vocabulary and its merges in the card's order (scores of <unk>, <s>, </s> taken as 0, as then)."""
    sp = sentencepiece_processor(model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {piece: (sp.get_score(i) if i > 2 else 0.0) for piece, i in vocab.items()}
    return vocab, card_merges(vocab, scores)


def build_embedded_tokenizer(out_dir: Path = EMBEDDED_TOKENIZER_DIR):
    """Convert the shipped sentencepiece model to a fast tokenizer with our chat template; save it to ``out_dir``.

    Like the Hub's Mistral-7B tokenizer it adds BOS ``<s>`` (id 1) and no EOS when called on text. ``legacy=True``,
    as Mistral was trained and as the card's tokenizer worked: "▁" (28705) after every special token that text
    follows, so ``tokenizer(...)``, a ``pipeline`` and every model folder saved with it give the card's ids after
    ``</s>`` (``utils.card_era``). Its BPE merges are put in sentencepiece-score order, as transformers 4.34/4.35
    wrote them (5.x's conversion orders them by id, which splits runs of spaces differently: "a  b" → ▁a ▁▁ b where
    sentencepiece gives ▁a ▁ ▁b); loading keeps the merges of ``tokenizer.json``.
    """
    from tokenizers import Tokenizer
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sentencepiece_file(), Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False, legacy=True)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    _, state["model"]["merges"] = sentencepiece_merges(str(sentencepiece_file()))
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.chat_template = chat_template()
    tokenizer.init_kwargs["legacy"] = True  # written to tokenizer_config.json: loading rebuilds the pipeline from it
    tokenizer.init_kwargs["merges_by_score"] = True  # marks this build (an earlier one has merges by id)
    _save_atomically(out_dir, tokenizer)
    return tokenizer


def _embedded_is_current() -> bool:
    """The embedded tokenizer is built, legacy and with merges by score (a build of an earlier release lacks them)."""
    try:
        config = json.loads((EMBEDDED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    current = config.get("legacy") is True and config.get("merges_by_score") is True
    return (EMBEDDED_TOKENIZER_DIR / "tokenizer.json").is_file() and current


def load_tokenizer(model_id: str | None = None, revision: str = "main"):
    """The tokenizer of ``model_id`` (a Hub id at ``revision``, or a local folder), or the embedded Mistral-7B
    tokenizer when ``model_id`` is None or cannot be loaded.

    Either way it carries our Zephyr chat template.
    """
    from transformers import AutoTokenizer

    if (
        model_id is not None
        and model_id.startswith(("/", "./", "../", "~"))
        and not Path(model_id).expanduser().exists()
    ):
        raise ConfigError(f"tokenizer {model_id} does not exist; give a tokenizer folder or a Hub id")
    if model_id is None:
        if not _embedded_is_current():
            build_embedded_tokenizer()
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER_DIR)
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
    return "embedded" if Path(name).resolve() == Path(EMBEDDED_TOKENIZER_DIR).resolve() else name


def ensure_tiny_model(out_dir: Path = TINY_MODEL_DIR, source: Path = TINY_BASE_DIR) -> Path:
    """The embedded default's model: the tiny pretrained Mistral shipped in ``data/tiny_base`` (pretrained by
    ``tools/tiny_base.py``), copied once into ``out_dir`` with the embedded tokenizer beside it, so it loads like a
    Hub model (``from_pretrained(out_dir)``, ``pipeline(model=out_dir)``); copied again when the shipped weights
    change (``source.json`` holds their SHA-256)."""
    import hashlib

    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    stamp = {"source": str(source.name), "model.safetensors sha256": digest, "tokenizer legacy, merges by score": True}
    try:
        if json.loads((out_dir / "source.json").read_text()) == stamp and (out_dir / "tokenizer.json").is_file():
            return out_dir
    except (OSError, ValueError):
        pass  # not built yet, or built from something else: (re)build

    class Copy:  # _save_atomically calls save_pretrained(folder) on each object
        def save_pretrained(self, folder):
            for name in ("config.json", "generation_config.json", "model.safetensors"):
                shutil.copy(source / name, Path(folder) / name)
            (Path(folder) / "source.json").write_text(json.dumps(stamp) + "\n")

    _save_atomically(out_dir, Copy(), load_tokenizer(None))
    return out_dir


def _save_atomically(out_dir: Path, *objects) -> None:
    """``save_pretrained`` each object into a temporary sibling, then rename, so a crash never leaves half a folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(out_dir.parent, f".{out_dir.name}-")
    for obj in objects:
        obj.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
