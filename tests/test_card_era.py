"""utils.card_era: the card's token ids, ConstantLengthDataset packing and the step where the card's run stopped."""

import json
import random
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from utils import SAMPLE_DIR
from utils import card_era as ce

SYSTEM = {"role": "system", "content": ""}
EOS_THEN_ASSISTANT = [2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]  # </s>\n<|assistant|>\n, card era
# <s><|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n</s>: "▁<" (523) after BOS, "▁" (28705) after EOS
CARD_HI = [1, 523, 28766, 6574, 28766, 28767, 13, 2, 28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 23809]
CARD_HI += [2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 16230, 2, 28705, 13, 2]
HI = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


# --- moved from utils.card_era: only these tests use them ------------------------------------------------------
def read_rows(path):
    """The ``messages`` of each JSON line of ``path`` whose messages are a list of role/content string dicts (for
    checks on the shipped sample without the preparation pipeline)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            messages = json.loads(line).get("messages")
        except (ValueError, AttributeError):
            continue
        if (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages
            )
        ):
            rows.append(messages)
    return rows


@lru_cache(maxsize=2)
def sentencepiece_processor(model_file: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_file)


def sentencepiece_reference(text, model_file=None, bos=1, eos=2):
    """What Mistral's sentencepiece model gives the legacy way: BOS, then each piece between the special tokens
    ``<unk>``, ``<s>``, ``</s>`` encoded on its own (with sentencepiece's dummy-prefix ``▁``), each special token
    as its id."""
    from utils.assets import sentencepiece_file

    sp = sentencepiece_processor(model_file or str(sentencepiece_file()))
    control = {"<unk>": 0, "<s>": bos, "</s>": eos}
    ids = [bos]
    for piece in re.split("(<unk>|<s>|</s>)", text):
        ids += [control[piece]] if piece in control else sp.encode(piece) if piece else []
    return ids


def count_constant_length(
    num_tokens,
    char_lengths,
    seq_length=ce.SEQ_LENGTH,
    num_of_sequences=ce.NUM_OF_SEQUENCES,
    chars_per_token=ce.CHARS_PER_TOKEN,
):
    """``(chunks, buffers, tokens dropped)`` of ``pack_constant_length`` from row lengths alone (tokens per row
    including BOS and the separator EOS)."""
    tokens = np.asarray(num_tokens, dtype=np.int64)
    spans = ce.buffer_spans(char_lengths, ce.max_buffer_size(seq_length, num_of_sequences, chars_per_token))
    per_buffer = [int(tokens[start:end].sum()) for start, end in spans]
    chunks = sum(t // seq_length for t in per_buffer)
    return chunks, len(spans), sum(t % seq_length for t in per_buffer)


def chunk_range_for_steps(steps, processes=16, per_device_batch=8, accumulation=4):
    """The chunk counts (inclusive range) for which a run stops at ``steps`` optimizer steps (when that is below
    the planned number): 272 on 16 x 8 x 4 needs 139,137 to 139,648 chunks."""
    per_step = per_device_batch * processes
    return (steps * accumulation - 1) * per_step + 1, (steps * accumulation + accumulation - 1) * per_step


@pytest.fixture(scope="module")
def tok():
    from utils.assets import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def sample():
    rows = [*read_rows(SAMPLE_DIR / "ultrachat_200k/train_sft.jsonl")]
    rows += read_rows(SAMPLE_DIR / "ultrachat_200k/test_sft.jsonl")
    return [m if m[0]["role"] == "system" else [SYSTEM, *m] for m in rows]


# --- token ids ---------------------------------------------------------------------------------------------------
def test_eos_is_followed_by_the_word_start_in_the_card_ids(tok):
    assert (
        ce.era_backend(tok, "card").encode("</s>\n<|assistant|>\n", add_special_tokens=False).ids == EOS_THEN_ASSISTANT
    )
    today = ce.era_backend(tok, "today").encode("</s>\n<|assistant|>\n", add_special_tokens=False).ids
    assert today == [2, *EOS_THEN_ASSISTANT[2:]]


def test_empty_system_turn_prefix_and_bos(tok):
    card, today = ce.tokenize_dialogues(tok, [HI])[0], ce.tokenize_dialogues(tok, [HI], "today")[0]
    assert card == CARD_HI
    assert today == [t for i, t in enumerate(CARD_HI) if not (t == 28705 and CARD_HI[i - 1] == 2)]
    # one BOS, then the first piece with its word start ("▁<" = 523, not "<" = 28789), in both schemes
    assert card[:2] == today[:2] == [1, 523] and card.count(1) == 1
    # the embedded tokenizer is legacy, as Mistral's: called on text it puts the "▁" after </s> too
    assert card == tok(ce.render_text(HI) + "</s>")["input_ids"]


def test_runs_of_spaces_split_as_sentencepiece_did(tok, tmp_path):
    import shutil

    from transformers import LlamaTokenizer

    from utils.assets import sentencepiece_file

    shutil.copy(sentencepiece_file(), tmp_path / "tokenizer.model")
    by_id = LlamaTokenizer.from_pretrained(tmp_path, legacy=True)  # transformers 5.x's own conversion: merges by id
    assert ce.era_backend(by_id, "today").encode("a  b", add_special_tokens=False).ids == [264, 259, 28726]  # ▁a ▁▁ b
    card, today = ce.era_backend(by_id, "card"), ce.era_backend(tok, "today")  # the embedded one's merges are by score
    assert card.encode("a  b", add_special_tokens=False).ids == [264, 28705, 287]  # ▁a ▁ ▁b
    assert today.encode("a  b", add_special_tokens=False).ids == [264, 28705, 287]
    assert card.encode("    if x:", add_special_tokens=False).ids == [260, 513, 1318, 28747]
    assert json.loads(card.to_str())["model"]["merges"][:3] == [["▁", "t"], ["i", "n"], ["e", "r"]]  # by score


def test_card_ids_equal_sentencepiece_on_every_sample_dialogue(tok, sample):
    card = ce.tokenize_dialogues(tok, sample)
    reference = [sentencepiece_reference(ce.render_text(m) + "</s>") for m in sample]
    assert len(sample) == 61
    assert sum(a == b for a, b in zip(card, reference, strict=True)) == 61
    today = ce.tokenize_dialogues(tok, sample, "today")
    assert sum(a == b for a, b in zip(card, today, strict=True)) == 0


SAID = [SYSTEM, {"role": "user", "content": "Say </s> please"}, {"role": "assistant", "content": "ok"}]
SAID_ALL = [SYSTEM, {"role": "user", "content": "What do <s>, </s> and <unk> mean?"}]
SAID_ALL += [{"role": "assistant", "content": "<s> starts </s>"}]


def test_special_token_text_in_a_message_became_control_tokens_in_the_card(tok):
    """The card's tokenizer split every text at its special tokens, the template's or a message's alike, and gave
    each piece between them its "▁": " </s> " in a message was "▁", EOS, "▁" (28705, 2, 28705)."""
    card = ce.tokenize_dialogues(tok, [SAID])[0]
    assert card[16:22] == [28735, 339, 28705, 2, 28705, 4665]  # S ay ▁ </s> ▁ ▁please
    assert card.count(2) == 5  # the template's three, the separator, and the one typed in the message
    for said in (SAID, SAID_ALL):  # <s> (1) and <unk> (0) too: sentencepiece between every special token
        assert ce.tokenize_dialogues(tok, [said])[0] == sentencepiece_reference(ce.render_text(said) + "</s>")
    assert ce.tokenize_dialogues(tok, [SAID_ALL])[0].count(1) == 3 and 0 in ce.tokenize_dialogues(tok, [SAID_ALL])[0]


def test_the_embedded_tokenizer_called_on_text_gives_the_card_ids(tok):
    """Built legacy (the "▁" after </s>) with its merges in sentencepiece-score order, as the Hub's tokenizer.json of
    2023 (transformers 5.x's own conversion of tokenizer.model orders them by id: "a  b" was ▁a ▁▁ b)."""
    rows = [m for path in sorted(SAMPLE_DIR.glob("*/*.jsonl")) for m in read_rows(path)]
    rows = [m if m[0]["role"] == "system" else [SYSTEM, *m] for m in rows]
    loaded = [tok(ce.render_text(m) + "</s>")["input_ids"] for m in rows]
    assert sum(a == b for a, b in zip(ce.tokenize_dialogues(tok, rows), loaded, strict=True)) == len(rows) == 589
    assert tok("a  b")["input_ids"] == [1, 264, 28705, 287]  # ▁a ▁ ▁b, as sentencepiece
    # Not equal: a piece that starts with a space gets no second "▁" (today's Metaspace, not 2023's Prepend): text
    # that starts with spaces, or follows special-token text typed in a message
    assert tok("    if x:")["input_ids"] == [1, 2287, 513, 1318, 28747] != sentencepiece_reference("    if x:")
    card = ce.tokenize_dialogues(tok, [SAID])[0]
    assert tok(ce.render_text(SAID) + "</s>")["input_ids"] == card[:20] + card[21:]  # ▁ </s> ▁please


def test_special_token_text_stays_text_on_request_and_today(tok):
    text = ce.tokenize_dialogues(tok, [SAID], text_specials=True)[0]
    today = ce.tokenize_dialogues(tok, [SAID], "today")[0]  # today's scheme keeps it text, as before
    assert text.count(2) == today.count(2) == 4  # the template's three and the separator, none from the text
    assert text[16:22] == today[15:21] == [28735, 339, 1867, 28713, 28767, 4665]  # S ay ▁</ s > ▁please, as text
    card = ce.tokenize_dialogues(tok, [SAID])[0]
    assert text[:18] == card[:18] and text[21:] == card[21:]  # the same length here, by chance


@pytest.mark.parametrize(
    "config", [{"legacy": True}, {"legacy": False}, {}, {"legacy": True, "add_prefix_space": False}]
)
def test_a_hub_style_tokenizer_gives_the_card_ids_whatever_its_flags(tok, sample, tmp_path, config):
    """A tokenizer.json as the Hub's of 2023 (normaliser, merges by score), loaded by transformers 5.x whose
    LlamaTokenizer rebuilds the pipeline from tokenizer_config.json: plain ids depend on the flags, ours do not."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_text(ce.era_backend(tok, "card").to_str())
    specials = {str(i): {"content": c, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])}
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**base, "added_tokens_decoder": specials, **config}))
    hub = AutoTokenizer.from_pretrained(tmp_path)
    assert [hub.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    plain = hub(ce.render_text(HI) + "</s>")["input_ids"]
    assert (plain == CARD_HI) == (config.get("legacy", False) and config.get("add_prefix_space", True))
    assert ce.tokenize_dialogues(hub, sample) == ce.tokenize_dialogues(tok, sample)
    assert ce.tokenize_dialogues(hub, [HI], "today") == ce.tokenize_dialogues(tok, [HI], "today")


def test_unknown_scheme_is_refused(tok):
    with pytest.raises(ValueError, match="scheme must be one of card, today"):
        ce.tokenize_dialogues(tok, [HI], "2024")


# --- packing -----------------------------------------------------------------------------------------------------
ROWS = [[1, 10, 11, 2], [1, 20, 2], [1, 30, 31, 32, 2], [1, 40, 2], [1, 50, 51, 52, 53, 54, 2], [1, 60, 2]]
CHARS = [5, 5, 5, 3, 10, 1]
SMALL = dict(seq_length=4, num_of_sequences=2, chars_per_token=1.5)  # buffers of 4 * 1.5 * 2 = 12 characters


def trl_constant_length(rows, chars, seq_length, num_of_sequences, chars_per_token, seed):
    """TRL 0.7.1-0.7.4 ``ConstantLengthDataset.__iter__`` (infinite=False) as written there, with the tokenizer
    replaced by a lookup of each row's ids (BOS included) and the separator EOS (2) appended as it does."""
    texts = ["x" * n for n in chars]
    lookup = {i: ids[:-1] for i, ids in enumerate(rows)}
    iterator, more_examples, out = iter(range(len(texts))), True, []
    max_buffer_size = seq_length * chars_per_token * num_of_sequences
    random.seed(seed)
    while more_examples:
        buffer, buffer_len = [], 0
        while True:
            if buffer_len >= max_buffer_size:
                break
            try:
                buffer.append(next(iterator))
                buffer_len += len(texts[buffer[-1]])
            except StopIteration:
                more_examples = False
                break
        all_token_ids = []
        for tokenized_input in [lookup[i] for i in buffer]:
            all_token_ids.extend(tokenized_input + [2])
        examples = []
        for i in range(0, len(all_token_ids), seq_length):
            input_ids = all_token_ids[i : i + seq_length]
            if len(input_ids) == seq_length:
                examples.append(input_ids)
        random.shuffle(examples)
        out += examples
    return out


def test_buffers_end_with_the_row_that_reaches_the_budget():
    assert ce.max_buffer_size(**SMALL) == 12.0
    assert ce.buffer_spans(CHARS, 12.0) == [(0, 3), (3, 5), (5, 6)]
    assert ce.buffer_spans([6, 6, 6], 12.0) == [(0, 2), (2, 3)]  # rows end at a boundary: no empty buffer
    assert ce.max_buffer_size() == pytest.approx(7_549_747.2)


def test_packing_by_hand_without_shuffle():
    packed = ce.pack_constant_length(ROWS, CHARS, shuffle=False, **SMALL)
    assert packed.input_ids.tolist() == [
        [1, 10, 11, 2],
        [1, 20, 2, 1],
        [30, 31, 32, 2],
        [1, 40, 2, 1],
        [50, 51, 52, 53],
    ]
    assert packed.buffer.tolist() == [0, 0, 0, 1, 1]  # buffer 1 drops "54, 2", buffer 2 ("1, 60, 2") yields nothing
    assert packed.position_ids.tolist() == [[0, 1, 2, 3]] * 5
    assert count_constant_length([len(r) for r in ROWS], CHARS, **SMALL) == (5, 3, 5)


@pytest.mark.parametrize("seed", [0, 42, 7])
def test_packing_equals_trl_constant_length_dataset(seed):
    packed = ce.pack_constant_length(ROWS, CHARS, seed=seed, **SMALL)
    assert packed.input_ids.tolist() == trl_constant_length(ROWS, CHARS, seed=seed, **SMALL)
    rng = np.random.default_rng(seed)  # and on 300 random rows, several buffers
    rows = [[1, *rng.integers(3, 32000, rng.integers(1, 40)).tolist(), 2] for _ in range(300)]
    chars = rng.integers(1, 200, 300).tolist()
    small = dict(seq_length=16, num_of_sequences=8, chars_per_token=3.6)
    expected = trl_constant_length(rows, chars, seed=seed, **small)
    assert ce.pack_constant_length(rows, chars, seed=seed, **small).input_ids.tolist() == expected
    assert count_constant_length([len(r) for r in rows], chars, **small)[0] == len(expected)


def test_packing_seed_42_order():
    packed = ce.pack_constant_length(ROWS, CHARS, seed=42, **SMALL)
    assert packed.input_ids.tolist() == [
        [1, 20, 2, 1],
        [1, 10, 11, 2],
        [30, 31, 32, 2],
        [50, 51, 52, 53],
        [1, 40, 2, 1],
    ]


def test_text_length_counts_the_formatted_text(sample):
    assert ce.text_length(HI) == len("<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n") == 56
    assert [ce.text_length(m) for m in sample] == [len(ce.render_text(m)) for m in sample]


def test_handbook_order_is_datasets_shuffle_seed_42():
    # datasets.Dataset.from_dict({"i": list(range(10))}).shuffle(seed=42)["i"] (datasets 5.2 and 2.x alike)
    assert ce.handbook_order(10).tolist() == [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]


def test_sample_packs_into_three_card_rows(tok, sample):
    ids = ce.tokenize_dialogues(tok, sample)
    chars = [ce.text_length(m) for m in sample]
    assert (sum(map(len, ids)), sum(chars)) == (6214, 20010)
    assert count_constant_length([len(i) for i in ids], chars) == (3, 1, 70)


# --- the stop ----------------------------------------------------------------------------------------------------
def test_the_cards_run_stops_at_272_of_406():
    run = ce.card_run(139_137, 207_865)  # 16 processes x 8 x accumulation 4
    assert (run.planned_steps, run.dataloader_len, run.micro_batches) == (406, 1624, 1088)
    assert run.optimizer_steps == 272 and round(run.epoch, 2) == 0.67 and run.last_batch_rows == 1
    assert ce.card_run(139_648, 207_865).optimizer_steps == 272  # 1,091 batches: 3 trailing ones never stepped
    assert ce.card_run(139_136, 207_865).optimizer_steps == 271
    assert ce.card_run(139_649, 207_865).optimizer_steps == 273
    assert chunk_range_for_steps(272) == (139_137, 139_648)


def test_other_shapes_of_the_run():
    one_gpu = dict(processes=1, per_device_batch=1, accumulation=1024)  # alignment-handbook issue #55's command
    assert ce.card_run(139_264, 207_865, **one_gpu).planned_steps == 202
    assert ce.card_run(139_264, 207_865, **one_gpu).optimizer_steps == 136
    assert ce.card_run(139_263, 207_865, **one_gpu).optimizer_steps == 135
    assert ce.card_run(10**7, 207_865).optimizer_steps == 406  # more data than planned: max_steps stops it
    tiny = ce.card_run(3, 55)  # one batch per epoch (< accumulation): the Trainer steps on it
    assert (tiny.planned_steps, tiny.micro_batches, tiny.optimizer_steps, tiny.epoch) == (1, 1, 1, 1.0)
    assert ce.card_run(0, 55).optimizer_steps == 0
