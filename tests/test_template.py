"""The chat template and the embedded Mistral-7B tokenizer."""

import json

from utils import SAMPLE_DIR, sampling
from utils.data.template import render, with_system_turn
from utils.sampling import PIRATE

# the specification (issue 2): the card's messages rendered with add_generation_prompt=True
CARD_RENDERING = (
    "<|system|>\nYou are a friendly chatbot who always responds in the style of a pirate</s>\n"
    "<|user|>\nHow many helicopters can a human eat in one sitting?</s>\n<|assistant|>\n"
)


def test_pirate_prompt_renders_exactly(tokenizer):
    assert PIRATE[0]["content"] == "You are a friendly chatbot who always responds in the style of a pirate"
    assert PIRATE[1] == {"role": "user", "content": "How many helicopters can a human eat in one sitting?"}
    assert tokenizer.apply_chat_template(PIRATE, tokenize=False, add_generation_prompt=True) == CARD_RENDERING
    assert sampling.CARD_RENDERING == CARD_RENDERING  # what notebook 05 asserts against


def test_embedded_tokenizer_is_mistral_7b(tokenizer):
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert tokenizer.unk_token_id == 0
    # Like the Hub tokenizer: BOS added, no EOS; "Hello world" -> ▁Hello ▁world
    assert tokenizer("Hello world")["input_ids"] == [1, 22557, 1526]
    assert tokenizer.decode([1, 22557, 1526], skip_special_tokens=True) == "Hello world"


def test_embedded_tokenizer_matches_sentencepiece(tokenizer):
    import sentencepiece

    from utils.assets import sentencepiece_file

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_file()))
    for text in ["How many helicopters can a human eat?", "Ünïcödé, 日本語 and emoji 🙂", "x = 1\nprint(x)"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_eos_is_one_token_in_rendered_text(tokenizer):
    ids = tokenizer(render(PIRATE + [{"role": "assistant", "content": "Arr!"}]))["input_ids"]
    assert ids[0] == 1
    assert ids.count(2) == 4  # three turns, plus the EOS that closes the dialogue
    assert ids[-4:] == [2, 28705, 13, 2]  # "</s>", "▁" (the legacy tokenizer's word start), "\n", "</s>"


def test_render_equals_jinja_template_on_the_sample(tokenizer):
    lines = (SAMPLE_DIR / "ultrachat_200k" / "test_sft.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, *rows[0]["messages"]]})
    for row in rows:
        expected = tokenizer.apply_chat_template(with_system_turn(row["messages"]), tokenize=False)
        assert render(row["messages"]) == expected + tokenizer.eos_token
        plain = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert render(row["messages"], system_turn=False) == plain + tokenizer.eos_token
