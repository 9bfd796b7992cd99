"""mllm_tune.core.prompts: answer parsers (numbered VQA answers, Yes/No), rendering, prompt files."""

from __future__ import annotations

import json

import pytest

from mllm_tune.core.prompts import DEFAULT_PROMPTS, VQA_ASPECTS, is_yes, load_prompts, split_answer_sentences, split_lines


@pytest.mark.parametrize(
    "answer,expected",
    [
        # numbered lines, both styles, with Yes/No prefixes dropped and bare Yes/No lines dropped
        (
            "1. The person is a woman.\n2. She has long black hair.\n3) Yes, she wears a red coat.\n4. No.\n"
            "5. No, there is no pattern.",
            ["The person is a woman.", "She has long black hair.", "She wears a red coat.", "There is no pattern."],
        ),
        # missing numbers, several sentences per line
        ("The person is a man. He has short hair.", ["The person is a man.", "He has short hair."]),
        # no space after the number / after the comma
        ("1.Yes,the person wears glasses.", ["The person wears glasses."]),
        ("Yes. She is wearing a hat.", ["She is wearing a hat."]),
        # decimals are not numbering
        ("1. The man is 1.8 m tall.", ["The man is 1.8 m tall."]),
        # bullets, missing full stop, blank lines, (1) style
        ("- The person wears jeans.\n\n* Black shoes\n(3) Short sleeves", ["The person wears jeans.", "Black shoes.",
                                                                          "Short sleeves."]),
        ("No, the person is not wearing a scarf.", ["The person is not wearing a scarf."]),
        ("1. Yes\n2. no\n3. N/A\n4. Unknown.", []),
        ("", []),
        (None, []),
        ("  \n ", []),
        ("1. The person carries a bag, e.g. a backpack.", ["The person carries a bag, e.g. a backpack."]),
        ("12. Two people walk behind her!", ["Two people walk behind her!"]),
    ],
)
def test_split_answer_sentences(answer, expected):
    assert split_answer_sentences(answer) == expected


# Answers with several numbered items on one line, or a preamble header (seen from real MLLMs).
def test_split_inline_numbering_without_full_stops():
    assert split_answer_sentences("1. Woman 2. Long hair 3. Red coat") == ["Woman.", "Long hair.", "Red coat."]


def test_split_numbered_answers_on_one_line():
    assert split_answer_sentences("10. There are 2 people. 11. Walking.") == ["There are 2 people.", "Walking."]
    assert split_answer_sentences("2. She wears a T-shirt. 3. the trousers are blue.") == [
        "She wears a T-shirt.", "The trousers are blue."]


def test_split_drops_preamble_header():
    out = split_answer_sentences("Here are the answers:\n1. A man.\n2. Short brown hair.")
    assert out == ["A man.", "Short brown hair."]


def test_split_lines():
    assert split_lines('1. a\n2. "b"\n\n- c\n  3) d  ') == ["a", "b", "c", "d"]
    assert split_lines("") == [] and split_lines(None) == []


@pytest.mark.parametrize("answer,yes", [("Yes", True), ("yes.", True), ("YES, it does", True), ("No", False),
                                        ("", False), (None, False), ("Yesterday", True)])
def test_is_yes_is_the_released_substring_rule(answer, yes):
    assert is_yes(answer) is yes  # 'Yesterday' counts: the released rule is a substring test


def test_rendering():
    loc = DEFAULT_PROMPTS.render_loc("  A man   in a red coat. ")
    assert "A man in a red coat." in loc and "Yes or No" in loc
    vqa = DEFAULT_PROMPTS.render_vqa()
    assert all(f"{i}. {q}" in vqa for i, q in enumerate(VQA_ASPECTS, 1)) and len(VQA_ASPECTS) == 15
    aggr = DEFAULT_PROMPTS.render_aggr("A man.", ["He wears a hat.", "He has a bag."])
    assert "A man." in aggr and "He wears a hat. He has a bag." in aggr
    assert "3 different ways" in DEFAULT_PROMPTS.render_rwt("He wears a hat.", 3)
    assert "A man walks." in DEFAULT_PROMPTS.render_dec("A man walks.")
    with pytest.raises(ValueError, match="empty caption"):
        DEFAULT_PROMPTS.render_loc("   ")


def test_load_prompts(tmp_path):
    assert load_prompts(None) is DEFAULT_PROMPTS
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"loc": "Is this {caption}? Yes/No"}))
    p = load_prompts(f)
    assert p.render_loc("a man") == "Is this a man? Yes/No" and p.vqa == DEFAULT_PROMPTS.vqa
    y = tmp_path / "p.yaml"
    y.write_text("rwt: 'Say {sentence} {m} times'\nvqa_aspects: ['Q1?', 'Q2?']\n")
    p = load_prompts(y)
    assert p.vqa_aspects == ("Q1?", "Q2?") and "2. Q2?" in p.render_vqa()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"loc": "no placeholder"}))
    with pytest.raises(ValueError, match=r"\{caption\}"):
        load_prompts(bad)
    bad.write_text(json.dumps({"nope": "x"}))
    with pytest.raises(ValueError, match="unknown key"):
        load_prompts(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid"):
        load_prompts(bad)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.yaml")
