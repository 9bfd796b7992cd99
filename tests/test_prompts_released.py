"""Running with the released wording without shipping it: prompts read from the user's copy of
the released THI script, and the released VQA answer handling beside ours."""

from __future__ import annotations

import textwrap

import pytest

from mllm_tune.core.prompts import DEFAULT_PROMPTS, load_prompts, released_vqa_facts

# A stand-in for the user's copy of the released script: the same structure (three strings
# assigned inside a function, formatted with {cap}), with made-up wording.
SCRIPT = textwrap.dedent('''
    import json

    def main():
        prompt1 = """Check the text against the picture.
    Text: {cap}
    Reply Yes or No."""
        prompt2 = """Answer about the person:
    1. Gender?
    2. Hair?"""
        prompt3 = """Join these into one description: {cap}
    Only the description."""
        return prompt1.format(cap="x")
''')


def test_prompts_come_from_the_script_without_running_it(tmp_path):
    f = tmp_path / "vllm_infer_ICL.py"
    f.write_text(SCRIPT + "\nraise SystemExit('executed!')\n")
    p = load_prompts(f)
    assert p.answer_handling == "released"
    assert p.render_loc("a man in red") == "Check the text against the picture.\nText: a man in red\nReply Yes or No."
    assert p.render_vqa() == "Answer about the person:\n1. Gender?\n2. Hair?"  # questions inline, as written
    assert p.render_aggr("a man", ["He wears red.", ""]) == \
        "Join these into one description: ['a man', 'He wears red.', '']\nOnly the description."
    assert p.dec == DEFAULT_PROMPTS.dec  # the RDA prompts stay ours


def test_a_script_without_the_strings_is_refused(tmp_path):
    f = tmp_path / "other.py"
    f.write_text("prompt1 = 'only {cap}'\n")
    with pytest.raises(ValueError, match=r"prompt2 \(T_vqa\), prompt3 \(T_aggr\)"):
        load_prompts(f)
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    with pytest.raises(ValueError, match="not valid Python"):
        load_prompts(bad)


def test_released_answer_handling_rule_by_rule():
    answer = ("Here are the answers:\n1. Yes, the person is a man.\n2. Long black hair. It is tied.\n"
              "3. Colour: red\nno number here\n4. no, she wears no hat")
    assert released_vqa_facts(answer) == [
        "The person is a man.",     # 'Yes, ' removed, first letter upper-cased
        "Long black hair.",         # only the first sentence of the item
        "",                         # no '. ' in the line: an empty item, kept
        "No, she wears no hat.",    # only 'No, ' with a capital N is removed, as released
    ]
    ours = DEFAULT_PROMPTS.parse_vqa(answer)
    assert "The person is a man." in ours and "" not in ours
    yaml_set = DEFAULT_PROMPTS.__class__(answer_handling="released")
    assert yaml_set.parse_vqa(answer) == released_vqa_facts(answer)


def test_yaml_by_hand_with_items_and_bad_handling(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text('aggr: "Merge {items}"\nanswer_handling: released\nvqa: "Describe the person."\n')
    p = load_prompts(f)
    assert p.render_aggr("c", ["f."]) == "Merge ['c', 'f.']" and p.render_vqa() == "Describe the person."
    f.write_text("answer_handling: mine\n")
    with pytest.raises(ValueError, match="answer_handling must be one of ours, released"):
        load_prompts(f)
