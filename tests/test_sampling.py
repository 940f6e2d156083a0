"""Notebook 05's generation: the card's prompt, reproducible sampling, EOS stops, left-padded batches."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils import sampling
from utils.assets import ensure_tiny_model


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32).eval()


def test_rendered_prompt_equals_the_card(tokenizer):
    rendered = tokenizer.apply_chat_template(sampling.PIRATE, tokenize=False, add_generation_prompt=True)
    assert rendered == sampling.CARD_RENDERING
    assert dict(max_new_tokens=256, do_sample=True, temperature=0.7, top_k=50, top_p=0.95) == sampling.CARD_SAMPLING


def test_same_seed_same_text(model, tokenizer):
    prompts = [sampling.CARD_RENDERING, "<|user|>\nHi</s>\n<|assistant|>\n"]
    first = sampling.generate(model, tokenizer, prompts, seed=7, max_new_tokens=20)
    again = sampling.generate(model, tokenizer, prompts, seed=7, max_new_tokens=20)
    other = sampling.generate(model, tokenizer, prompts, seed=8, max_new_tokens=20)
    assert [a.text for a in first] == [a.text for a in again]
    assert [a.text for a in first] != [a.text for a in other]
    assert all(a.new_tokens == 20 and not a.stopped_at_eos for a in first)


def test_generation_stops_at_eos(model, tokenizer):
    greedy = dict(do_sample=False, temperature=None, top_k=None, top_p=None, max_new_tokens=12)
    batch = tokenizer([sampling.CARD_RENDERING], return_tensors="pt")
    with torch.no_grad():
        row = model.generate(**batch, pad_token_id=0, **greedy)[0, batch["input_ids"].shape[1] :].tolist()
    stop = row[4]  # declare the 5th generated token the end of sequence
    first = row.index(stop)
    answer = sampling.generate(model, tokenizer, [sampling.CARD_RENDERING], eos_token_id=stop, **greedy)[0]
    assert answer.stopped_at_eos and answer.new_tokens == first + 1 < 12
    assert answer.text == tokenizer.decode(row[:first], skip_special_tokens=True)


def test_left_padded_batch_matches_single_prompts(model, tokenizer):
    greedy = dict(do_sample=False, temperature=None, top_k=None, top_p=None, max_new_tokens=8)
    short = "<|user|>\nHi</s>\n<|assistant|>\n"
    batch = sampling.generate(model, tokenizer, [sampling.CARD_RENDERING, short], **greedy)
    alone = [sampling.generate(model, tokenizer, [p], **greedy)[0] for p in (sampling.CARD_RENDERING, short)]
    assert [a.text for a in batch] == [a.text for a in alone]
    assert tokenizer.padding_side == "left"


def test_a_tokenizer_without_a_pad_token_is_one_line(model, tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    with pytest.raises(sampling.SamplingError, match="^the tokenizer has no pad token to left-pad prompts with"):
        sampling.generate(model, bare, ["[INST] Hi [/INST]"])


def test_candidate_models_in_smoke(tmp_path):
    from utils.hardware import SMOKE

    assert list(sampling.candidate_models(SMOKE, runs_dir=tmp_path)) == ["base"]
    (tmp_path / "full" / "model").mkdir(parents=True)
    (tmp_path / "full" / "model" / "config.json").write_text("{}")
    models = sampling.candidate_models(SMOKE, runs_dir=tmp_path, hub=True)
    assert list(models) == ["base", "full", "mistral-7b-sft-beta"]
    assert models["mistral-7b-sft-beta"] == "HuggingFaceH4/mistral-7b-sft-beta"


def test_max_new_tokens_is_capped_by_the_models_positions(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model.config, "max_position_embeddings", 40)  # 4,096 in the real config: same rule, faster
    answer = sampling.generate(
        model, tokenizer, ["<|user|>\nHi</s>\n<|assistant|>\n"], max_new_tokens=10**9, eos_token_id=-1
    )[0]  # no EOS: runs to the cap
    prompt_tokens = len(tokenizer("<|user|>\nHi</s>\n<|assistant|>\n")["input_ids"])
    assert answer.new_tokens == 40 - prompt_tokens


def test_the_command_line(capsys, tmp_path):
    model_dir = str(ensure_tiny_model())
    assert (
        sampling.main(
            [
                "--model",
                model_dir,
                "--prompt",
                "Name a river.",
                "--max_new_tokens",
                "5",
                "--seed",
                "3",
                "--profile",
                "smoke",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"== {model_dir} (5 tokens, max_new_tokens)" in out
    assert sampling.main(["--model", str(tmp_path / "nope"), "--profile", "smoke"]) == 2
    assert capsys.readouterr().err == f"error: no such model folder: {tmp_path / 'nope'}\n"
    assert sampling.main(["--model", "runs/qlora/merged-typo", "--profile", "smoke"]) == 2
    assert capsys.readouterr().err == "error: no such model folder: runs/qlora/merged-typo\n"
    with pytest.raises(SystemExit) as exit_:
        sampling.main(["--max_new_tokens", "0"])
    assert exit_.value.code == 2


# --- bad input: one line, exit 2 ------------------------------------------------------------------------------------
def test_a_negative_seed_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        sampling.main(["--seed=-1", "--profile", "smoke"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --seed must be a whole number from 0 to 2**32 - 1, got -1\n"


def test_a_prompt_longer_than_the_models_positions_is_one_line(capsys, monkeypatch, tmp_path):
    import shutil

    model_dir = tmp_path / "short"
    shutil.copytree(ensure_tiny_model(), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    code = sampling.main(["--model", str(model_dir), "--prompt", "word " * 40, "--profile", "smoke"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert err.startswith("error: the prompt has ") and err.endswith(
        "tokens; the model has 16 positions, so no room is left to answer: shorten the prompt"
    )


def test_a_truncated_model_file_is_one_line(capsys, tmp_path):
    import shutil

    model_dir = tmp_path / "broken"
    shutil.copytree(ensure_tiny_model(), model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert sampling.main(["--model", str(model_dir), "--profile", "smoke"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith(f"error: cannot load {model_dir}: ")


def test_answers_that_write_a_turn_marker_are_counted_and_explained():
    from utils.sampling import Answer, turn_marker_lines

    clean = Answer("p", "A wave rolls onto the beach.", 8, True)
    wrote = Answer("p", "A wave rolls onto the beach.\n\n<|g|>\nIs a rope bigger than a sailor?", 30, True)
    lines = turn_marker_lines([clean, wrote, clean])
    assert lines[0] == (
        "1 of the fine-tunes' 3 answers in sections 3 and 4 write a turn marker (<|user|> or another <|) themselves:"
    )
    assert lines[1] == "  'A wave rolls onto the beach.\\n\\n<|g|>\\nIs a rope bigger than a sailor?'"
    assert lines[2].startswith("The card's recipe puts the loss on every token, the user's turns included")
    assert lines[2].endswith("With the loss on the answers only (notebook 02's Try this), no user turn is trained.")
    none = turn_marker_lines([clean] * 4)
    assert none[0] == (
        "0 of the fine-tunes' 4 answers in sections 3 and 4 write a turn marker (<|user|> or another <|) themselves."
    )
    assert len(none) == 2 and none[1].endswith("; an answer that does counts neither as a stop nor as clean.")
