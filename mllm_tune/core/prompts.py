"""Every prompt the project sends to an MLLM, and the parsers of their answers.

This is the single source of prompt text (SPEC §5, §6): the anchor-localization question
(T_loc), the human-centred VQA question (T_vqa), the aggregation prompt (T_aggr), and the RDA
decomposition (T_dec) and rewrite (T_rwt) prompts. The wording is the project's own.

Users replace any template from a YAML or JSON file (``load_prompts(path)``); keys are the
field names of :class:`PromptSet`. Placeholders use ``str.format`` names, listed per field.

Running with the ICL authors' wording (their released adapter was trained on it) without this
repository holding their sentences: pass the user's own copy of the released THI script
(``vllm_infer_ICL.py``) as the prompt file, ``--prompts path/to/vllm_infer_ICL.py``.
:func:`prompts_from_released_script` reads its three prompt strings (T_loc, T_vqa, T_aggr) from
the file and selects the released answer handling (``answer_handling: released``). The same by
hand, in a YAML file: ``loc`` (with ``{caption}``), ``vqa`` (the questions written inline, no
placeholder needed), ``aggr`` (with ``{items}``: the Python list ``[caption, fact, ...]`` the
released script formats into it) and ``answer_handling: released``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable

# The 15 human-centred aspects of T_vqa, in the order they are asked (SPEC §5).
VQA_ASPECTS: tuple[str, ...] = (
    "Is the person a man or a woman?",
    "How long is the person's hair, and what colour is it?",
    "What colour and type is the upper-body garment, and are its sleeves long or short?",
    "What colour and type are the trousers or skirt, and are they long or short?",
    "Are there patterns or prints on the clothes? Describe them.",
    "What colour and style are the shoes?",
    "Is the person wearing glasses?",
    "Is the person wearing a scarf?",
    "Is the person holding something in the hand? If so, what is it and what colour is it?",
    "Is the person carrying a backpack or a bag? If so, what colour is it?",
    "Is the person wearing a hat?",
    "Is the person wearing a belt or a waistband?",
    "What is the person doing?",
    "What is in the background?",
    "Are there other people in the background?",
)

_DEFAULT_LOC = (
    "Look at the pedestrian in the image and read this description:\n"
    '"{caption}"\n'
    "Does the description accurately match the person in the image? "
    "Answer with Yes or No only."
)

_DEFAULT_VQA = (
    "Look carefully at the pedestrian in the image and answer each question below in a short "
    "sentence. Number your answers like the questions.\n{questions}"
)

_DEFAULT_AGGR = (
    "Merge the facts below into one short, fluent description of a single pedestrian. Keep every "
    "detail of the original description, add the new facts, drop repeated or contradicting "
    "ones, and do not invent anything.\n"
    "Example\n"
    "Original: A woman with long hair walks on the street.\n"
    "Facts: She wears a red coat. She carries a black handbag. Her shoes are white.\n"
    "Merged: A woman with long hair wears a red coat and white shoes and carries a black "
    "handbag while walking on the street.\n"
    "Now do the same. Reply with the merged description only.\n"
    "Original: {caption}\n"
    "Facts: {facts}\n"
    "Merged:"
)

_DEFAULT_DEC = (
    "Split this description of a pedestrian into short sentences, each about one attribute "
    "(gender, hair, upper clothes, lower clothes, shoes, bag, accessories, action). "
    "Write one sentence per line and nothing else.\n"
    "Description: {text}"
)

_DEFAULT_RWT = (
    "Rewrite the sentence below in {m} different ways that keep exactly the same meaning. "
    "Write one rewrite per line and nothing else.\n"
    "Sentence: {sentence}"
)


@dataclass(frozen=True)
class PromptSet:
    """The prompt templates. Placeholders: loc {caption}; vqa {questions} (optional: a template
    may write the questions inline); aggr {caption} and {facts}, or {items}; dec {text}; rwt
    {sentence}, {m}.

    ``answer_handling`` picks how a T_vqa answer becomes facts: ``ours``
    (:func:`split_answer_sentences`, robust to numbering variants) or ``released`` (the authors'
    rule, :func:`released_vqa_facts`)."""

    loc: str = _DEFAULT_LOC
    vqa: str = _DEFAULT_VQA
    aggr: str = _DEFAULT_AGGR
    dec: str = _DEFAULT_DEC
    rwt: str = _DEFAULT_RWT
    vqa_aspects: tuple[str, ...] = VQA_ASPECTS
    answer_handling: str = "ours"

    # -- rendering -------------------------------------------------------------------------
    def render_loc(self, caption: str) -> str:
        return self.loc.format(caption=_clean(caption, "caption"))

    def render_vqa(self) -> str:
        if "{questions}" not in self.vqa:  # questions written inline (the released wording)
            return self.vqa
        questions = "\n".join(f"{i}. {q}" for i, q in enumerate(self.vqa_aspects, 1))
        return self.vqa.format(questions=questions)

    def render_aggr(self, caption: str, facts: Iterable[str]) -> str:
        caption, facts = _clean(caption, "caption"), list(facts)
        if "{items}" in self.aggr:  # the released form: one Python list of caption and facts
            return self.aggr.format(items=str([caption, *facts]))
        return self.aggr.format(caption=caption, facts=" ".join(facts))

    def parse_vqa(self, answer: str) -> list[str]:
        """The facts of a T_vqa answer, by this set's ``answer_handling``."""
        if self.answer_handling == "released":
            return released_vqa_facts(answer)
        return split_answer_sentences(answer)

    def render_dec(self, text: str) -> str:
        return self.dec.format(text=_clean(text, "text"))

    def render_rwt(self, sentence: str, m: int) -> str:
        return self.rwt.format(sentence=_clean(sentence, "sentence"), m=m)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vqa_aspects"] = list(self.vqa_aspects)
        return d


_PLACEHOLDERS = {
    "loc": {"caption"},
    "vqa": set(),
    "aggr": {"caption", "facts"},  # or {items} alone
    "dec": {"text"},
    "rwt": {"sentence", "m"},
}

DEFAULT_PROMPTS = PromptSet()


def _clean(text: str, what: str) -> str:
    text = " ".join(str(text).split())
    if not text:
        raise ValueError(f"empty {what}: a prompt cannot be built from an empty {what}")
    return text


ANSWER_HANDLING = ("ours", "released")
# variable of the released THI script -> (our field, {its placeholder: ours})
_RELEASED_NAMES = {"prompt1": ("loc", {"cap": "caption"}), "prompt2": ("vqa", {}), "prompt3": ("aggr", {"cap": "items"})}


def prompts_from_released_script(path: str | Path) -> dict[str, str]:
    """The T_loc / T_vqa / T_aggr strings of the user's copy of the released THI script, as
    PromptSet fields (plus ``answer_handling: released``). Reads the file's syntax tree; nothing
    of it is executed."""
    import ast

    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise ValueError(f"prompt file {path} is not valid Python ({exc.msg}, line {exc.lineno})") from exc
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in _RELEASED_NAMES:
                    field_name, renames = _RELEASED_NAMES[target.id]
                    text = node.value.value
                    for theirs, ours in renames.items():
                        text = text.replace("{" + theirs + "}", "{" + ours + "}")
                    out[field_name] = text
    missing = [f"{name} (T_{field_name})" for name, (field_name, _) in _RELEASED_NAMES.items() if field_name not in out]
    if missing:
        raise ValueError(f"prompt file {path}: no string assigned to {', '.join(missing)}; pass the released THI "
                         "script (vllm_infer_ICL.py) or a YAML/JSON prompt file")
    out["answer_handling"] = "released"
    return out


def load_prompts(path: str | Path | None) -> PromptSet:
    """Load a PromptSet from YAML/JSON (overriding only the keys the file gives) or from the
    user's copy of the released THI script (a ``.py`` file)."""
    if path is None:
        return DEFAULT_PROMPTS
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".py":
        return _checked(path, prompts_from_released_script(path))
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"prompt file {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"prompt file {path} must hold a mapping of template names to strings")
    return _checked(path, data)


def _checked(path: Path, data: dict) -> PromptSet:
    known = {f.name for f in fields(PromptSet)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"prompt file {path}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    if data.get("answer_handling", "ours") not in ANSWER_HANDLING:
        raise ValueError(f"prompt file {path}: answer_handling must be one of {', '.join(ANSWER_HANDLING)}")
    for key, want in _PLACEHOLDERS.items():
        if key in data:
            have = set(re.findall(r"{(\w+)}", data[key]))
            if key == "aggr" and "items" in have:
                continue
            if not want <= have:
                raise ValueError(
                    f"prompt file {path}: template '{key}' must contain the placeholder(s) "
                    f"{sorted('{' + w + '}' for w in want - have)}"
                )
    if "vqa_aspects" in data:
        data["vqa_aspects"] = tuple(data["vqa_aspects"])
    return replace(DEFAULT_PROMPTS, **data)


# -- answer parsers ------------------------------------------------------------------------

_YES = re.compile(r"yes", re.IGNORECASE)


def is_yes(answer: str) -> bool:
    """The released THI rule: an answer counts as Yes when it contains 'yes' in any case."""
    return bool(_YES.search(answer or ""))


_NUMBERED = re.compile(r"^\s*(?:\(?\d{1,2}[\.\):]|[-*\u2022])\s*")
# an answer number inside a line: "... hair. 3. Red coat" or "1. Woman 2. Long hair"
_INLINE_NUMBER = re.compile(r"(?:^|\s+)\(?\d{1,2}[\.\):](?=\s|$)")
_YESNO_PREFIX = re.compile(r"^(?:yes|no)\s*[,\.:;!-]\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_EMPTY_FACTS = {"yes", "no", "n/a", "none", "unknown"}


def split_answer_sentences(answer: str) -> list[str]:
    """Turn a (numbered) VQA answer into short standalone sentences.

    Robust to numbered lines ("1. ...", "2) ..."), several numbered answers on one line,
    bullets, missing numbers, "Yes, ..." / "No, ..." prefixes (the prefix is dropped, the fact
    kept) and preamble lines such as "Here are the answers:". A bare "Yes"/"No" carries no
    standalone fact and is dropped; so are empty lines.
    """
    out: list[str] = []
    for raw in (answer or "").splitlines():
        line = raw.strip()
        if not line or line.endswith(":"):
            continue
        for segment in _INLINE_NUMBER.split(line):
            for part in _SENTENCE_END.split(segment.strip()):
                part = _NUMBERED.sub("", part).strip()
                part = _YESNO_PREFIX.sub("", part).strip()
                if not part or part.rstrip(".!").strip().lower() in _EMPTY_FACTS:
                    continue
                part = part[0].upper() + part[1:]
                if part[-1] not in ".!?":
                    part += "."
                out.append(part)
    return out


def released_vqa_facts(answer: str) -> list[str]:
    """The released script's reading of a VQA answer, rule for rule: every line holding ':' is
    dropped; of the rest, the text between the first and the second '. ' is kept (the first
    sentence of "N. sentence. more"), 'Yes, ' / 'No, ' removed, first letter upper-cased, a final
    '.' added; a line without '. ' becomes an empty item (kept, as the release keeps it)."""
    facts = []
    for line in (answer or "").split("\n"):
        if ":" in line:
            continue
        parts = line.split(". ")
        if len(parts) < 2:
            facts.append("")
            continue
        item = parts[1].replace("Yes, ", "").replace("No, ", "")
        item = item[:1].upper() + item[1:]
        facts.append(item if item.endswith(".") else item + ".")
    return facts


def split_lines(answer: str) -> list[str]:
    """One item per non-empty line, with numbering or bullets removed (T_dec, T_rwt answers)."""
    items = []
    for raw in (answer or "").splitlines():
        line = _NUMBERED.sub("", raw).strip().strip('"').strip()
        if line:
            items.append(line)
    return items
