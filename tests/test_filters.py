"""Each filter and the truecasing on their own cases."""

import pytest

from utils.data.filters import (
    content_problem,
    disclaimer_in,
    load_disclaimers,
    structure_problem,
    truecase,
    truecase_messages,
)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


S = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([U("Hi"), A("Hello")], None),
        ([S, U("Hi"), A("Hello")], None),
        ([U("Hi"), A("Hello"), U("More?"), A("Sure")], None),
        ("Hi", "structure:not_a_list"),
        ([], "structure:empty_dialogue"),
        ([U("Hi"), "Hello"], "structure:bad_message"),
        ([U("Hi"), {"role": "assistant"}], "structure:bad_message"),
        ([U("Hi"), {"role": "narrator", "content": "Once"}, A("x")], "structure:bad_role"),
        ([U("Hi"), A(7)], "structure:content_not_string"),
        ([U("Hi"), A(" \n ")], "structure:empty_content"),
        ([U(""), A("Hello")], "structure:empty_content"),
        ([U("Hi"), A("Hello"), S], "structure:misplaced_system"),
        ([A("Hello"), U("Hi"), A("Yes")], "structure:starts_with_assistant"),
        ([S, A("Hello"), U("Hi"), A("Yes")], "structure:starts_with_assistant"),
        ([U("Hi"), U("Hi again"), A("Hello")], "structure:not_alternating"),
        ([U("Hi"), A("Hello"), A("Hello again")], "structure:not_alternating"),
        ([U("Hi")], "structure:ends_with_user"),
        ([U("Hi"), A("Hello"), U("Bye")], "structure:ends_with_user"),
        ([S], "structure:empty_dialogue"),
        ([U("Hi"), {"role": "assistant", "content": "Hello", "name": "Bob"}], "structure:unexpected_key"),
        ([U("Hi"), {"role": "assistant", "content": "Hello", "name": None}], None),  # a null field says nothing
    ],
)
def test_structure(messages, reason):
    assert structure_problem(messages) == reason


def test_disclaimers_match_case_and_curly_apostrophes():
    phrases = load_disclaimers()
    assert "as an ai language model" in phrases
    assert disclaimer_in([U("Hi"), A("AS AN AI LANGUAGE MODEL I can't")], phrases) == "as an ai language model"
    assert (
        disclaimer_in([U("Hi"), A("I don\u2019t have personal opinions.")], phrases) == "i don't have personal opinions"
    )
    assert (
        disclaimer_in([U("I do not have emotions, do you?"), A("Sometimes.")], phrases) is None
    )  # user turns don't count
    assert disclaimer_in([U("Hi"), A("Hello there")], phrases) is None


def test_content_problems():
    assert content_problem([U("Hi"), A("Hello")], max_chars=7) is None
    assert content_problem([U("Hi"), A("Hello!")], max_chars=7) == "too_large"
    assert content_problem([U("lone \ud800"), A("x")], max_chars=100) == "invalid_unicode"


def test_a_disclaimer_file_that_is_not_text_is_one_line(tmp_path):
    binary = tmp_path / "phrases.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=f"^{binary} is not a UTF-8 text file$"):
        load_disclaimers(binary)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"as an ai\x00\x00\n")
    with pytest.raises(ValueError, match="holds NUL bytes"):
        load_disclaimers(nul)


def test_disclaimer_list_is_configurable(tmp_path):
    path = tmp_path / "phrases.txt"
    path.write_text("# comment\n\nI'm sorry, but\n", encoding="utf-8")
    phrases = load_disclaimers(path)
    assert phrases == ["i'm sorry, but"]
    assert disclaimer_in([U("Hi"), A("I\u2019m sorry, but no.")], phrases) == "i'm sorry, but"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello. how are you?", "Hello. How are you?"),
        ("Wow! that works? yes.", "Wow! That works? Yes."),
        ("One.\nnext line", "One.\nNext line"),
        ("See https://example.org/a. it helps.", "See https://example.org/a. It helps."),
        ("Visit www.example.com/x?y=1. then go", "Visit www.example.com/x?y=1. Then go"),
        ("call `a. b` now. done", "call `a. b` now. Done"),
        ("```\nx = 1. y\n```\nok. fine", "```\nx = 1. y\n```\nok. Fine"),
    ],
)
def test_truecase_fixes(text, expected):
    assert truecase(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Hello. How are you?",
        "Use a helper, e.g. the one below, i.e. this one.",
        "Ask Dr. smith or Mr. jones.",
        "It costs 3.5 dollars.",
        "Wait... what",
        "I bought one. iPhones are popular. eBay too.",
        "```python\nfor x in y:  # one. two\n    pass\n```",
        "Run `make. test` first",
        "see https://example.org/a.b/c?x=y.z",
        "",
    ],
)
def test_truecase_leaves_right_text_alone(text):
    assert truecase(text) == text


def test_truecase_messages_counts_changed_messages_and_copies():
    messages = [U("hello. how are you?"), A("Fine. thanks.")]
    fixed, changed = truecase_messages(messages)
    assert changed == 2
    assert fixed == [U("hello. How are you?"), A("Fine. Thanks.")]
    assert messages[0]["content"] == "hello. how are you?"  # the input is not modified
    same, zero = truecase_messages([U("Hi."), A("Hello.")])
    assert zero == 0 and same == [U("Hi."), A("Hello.")]


@pytest.mark.parametrize(
    "text",
    [
        "Made in the U.S. and sold in the U.K. and Canada.",
        "Acme Inc. and Widgets Ltd. and Smith & Co. merged.",
        "It opened in Jan. and closed in Dec. after a busy Feb. and Sept. of work.",
        "Lay it 3 ft. per row, 2 in. deep, with 1 lb. or 4 oz. of seed.",
        "Bring fruit, e.g. apples, i.e. something sweet, vs. sweets, etc. and water.",
        "Ask Dr. and Mr. and Mrs. and Ms. Lee about No. and approx. numbers.",
    ],
)
def test_truecase_leaves_words_after_abbreviations_alone(text):
    assert truecase(text) == text


def test_abbreviations_are_configurable():
    from utils.data.filters import ABBREVIATIONS, load_abbreviations

    needed = """u.s. u.k. inc. ltd. co. jan. feb. mar. apr. jun. jul. aug. sep. oct. nov. dec. ft. in. lb. oz. e.g. i.e.
                vs. etc. dr. mr. mrs. ms. no. approx.""".split()
    assert set(needed) <= ABBREVIATIONS == load_abbreviations()
    assert truecase("It ended. and then") == "It ended. And then"  # a real sentence end is still fixed


def test_truecase_matches_the_plain_pattern():
    """The truecasing regex takes each token whole instead of backtracking through it: the same result as the plain
    pattern, on texts made of the characters that matter."""
    import random
    import re

    from utils.data.filters import _capitalise

    plain = re.compile(
        r"(?P<keep>```.*?(?:```|\Z)|`[^`\n]*`|(?:https?://|www\.)\S*[^\s.,!?;:'\")\]])"
        r"|(?P<end>\S*[.!?])(?P<space>\s+)(?P<word>[a-z][a-z']*\b)",
        re.DOTALL,
    )
    rng = random.Random(0)
    pieces = [*"ab .!?\n`:/'(", "http://", "www.", "```", "e.g.", "U.S.", "Dr.", "x.", "..", " the"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        assert truecase(text) == plain.sub(_capitalise, text), text
