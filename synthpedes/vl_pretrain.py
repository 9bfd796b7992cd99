"""SynthPEDES-VL pre-training data: VQA, aggregation, attribute yes/no and matching rows.

    python -m synthpedes.vl_pretrain --dataset-root SYNTH --out DATA --stage matching --num-samples 60000

reads a SynthPEDES folder (``reid_raw.json`` + ``attributes.json``, written by
``python -m synthpedes.dataset``) and writes a ``datasets`` DatasetDict (``save_to_disk``,
split ``train``) in TRL's vision conversational format: ``messages`` (user: [image, text] or
[text]; assistant: [text]) and ``images`` (a list of absolute image path strings, empty for
text-only rows), plus the metadata columns ``length`` (a rough token count for
``train_sampling_strategy: group_by_length``), ``task``, ``label``, ``image_pid``.

Only identities of the TRAIN split are used, so the test split stays held out for evaluation.
Every answer comes from the generator's ground truth. Tasks (``TASKS``):

- ``vqa_full``: the full human-centred prompt (T_vqa) -> the 15 numbered answer sentences;
- ``vqa_single``: one aspect question -> its answer sentence;
- ``attr_word``: a one-word attribute question ("What colour are the shoes?") -> "black";
  ``attr_color`` asks only the four colour questions (the first thing the model learns to read);
- ``attr_yesno``: a generic attribute question ("Is the upper-body garment red?") -> Yes/No,
  balanced;
- ``loc_easy`` / ``loc_hard``: the anchor-localization prompt T_loc with a caption -> Yes/No.
  Positives are the identity's own captions (a fresh caption of its attributes or an annotated
  one). Easy negatives are captions of another train identity that contradict the image; hard
  negatives are captions of the same identity with one or two mentioned attributes changed
  (a counterfactual person), so only comparing attribute by attribute tells them apart;
- ``aggr``: text only, T_aggr(caption, facts) -> the merged description.

Stages (``STAGES``) set the task mix: ``attributes`` (recognition and single-attribute yes/no,
captions with one attribute group) first, then ``matching`` (mostly T_loc, easy and hard).
Everything is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from synthpedes.dataset import (
    BAG_COLORS,
    BAG_TYPES,
    GROUP_KEYS,
    HAIR_COLORS,
    LOWER_COLORS,
    LOWER_TYPES,
    SHOE_COLORS,
    UPPER_COLORS,
    UPPER_TYPES,
    PersonAttributes,
    _phrases,
    consistent,
    load_ground_truth,
    make_caption,
    mentioned_facts,
    vqa_answers,
)
from mllm_tune.core.prompts import DEFAULT_PROMPTS, PromptSet

logger = logging.getLogger(__name__)

TASKS = ("vqa_full", "vqa_single", "attr_color", "attr_word", "attr_yesno", "color_yesno", "loc_easy", "loc_hard",
         "loc_color", "loc_near", "aggr", "color_yesno_mt", "loc_color_mt", "attr_type", "type_yesno", "loc_small")
NEAR_POOL = 24  # identities a loc_near negative is chosen from
# the colour questions, learned first (few readouts of large regions)
COLOR_KEYS = ("upper_color", "lower_color", "hair_color", "shoes_color")
# shapes rather than colours: what a retriever's near misses differ in once the colours agree
TYPE_KEYS = ("gender", "hair_length", "upper_type", "sleeve", "lower_type", "lower_length", "bag", "hat", "glasses")

# Task weights per curriculum stage. "attributes" teaches what is in the image and the Yes/No
# answer on one attribute at a time; "matching" teaches the T_loc conjunction, keeping some
# attribute rows so recognition is not forgotten.
STAGES: dict[str, dict[str, float]] = {
    "attributes": {"vqa_full": 0.08, "vqa_single": 0.40, "attr_yesno": 0.27, "loc_easy": 0.10, "loc_hard": 0.15},
    "matching": {"vqa_full": 0.06, "vqa_single": 0.06, "attr_word": 0.12, "attr_yesno": 0.08, "loc_easy": 0.25,
                 "loc_hard": 0.38, "aggr": 0.05},
    # colours only: a few readouts of large regions, learned much faster than all attributes at once
    "colors": {"attr_color": 0.75, "attr_word": 0.10, "loc_easy": 0.075, "loc_hard": 0.075},
    # attribute grounding: short answers that carry only what the image shows
    "grounding": {"vqa_full": 0.04, "vqa_single": 0.06, "attr_word": 0.55, "attr_yesno": 0.17, "loc_easy": 0.08,
                  "loc_hard": 0.10},
    # comparison: the colour the model reads against a colour word in the prompt, alone
    # (color_yesno) and inside a caption whose only wrong fact is a colour (loc_color)
    # (a few full T_vqa and aggregation rows keep those answer formats)
    "compare": {"attr_color": 0.23, "color_yesno": 0.28, "loc_color": 0.24, "loc_easy": 0.10, "loc_hard": 0.03,
                "vqa_single": 0.08, "vqa_full": 0.02, "aggr": 0.02},
    # compare + two-turn bridges (say the colours, then answer) for the same Yes/No questions
    "bridge": {"attr_color": 0.18, "color_yesno": 0.20, "loc_color": 0.20, "color_yesno_mt": 0.12, "loc_color_mt": 0.12,
               "loc_easy": 0.06, "vqa_single": 0.06, "vqa_full": 0.03, "aggr": 0.03},
    # the bridge mix with slot-swapped colour negatives and retriever-like near-miss captions
    "slots": {"attr_color": 0.14, "color_yesno": 0.18, "loc_color": 0.18, "loc_near": 0.14, "color_yesno_mt": 0.08,
              "loc_color_mt": 0.08, "loc_hard": 0.06, "vqa_single": 0.07, "vqa_full": 0.035, "aggr": 0.035},
    # the shapes (garment types, lengths, bag, hat, gender), keeping colours and T_loc
    "types": {"attr_type": 0.28, "type_yesno": 0.14, "attr_color": 0.07, "color_yesno": 0.07, "loc_near": 0.14,
              "loc_hard": 0.12, "loc_color": 0.04, "vqa_single": 0.07, "vqa_full": 0.035, "aggr": 0.035},
    # hair and shoe colours inside captions: what a retriever's near misses differ in
    "small": {"loc_small": 0.30, "loc_color": 0.10, "loc_near": 0.10, "color_yesno": 0.12, "attr_color": 0.12,
              "loc_hard": 0.06, "vqa_single": 0.08, "vqa_full": 0.06, "aggr": 0.06},
    "all": {"vqa_full": 0.08, "vqa_single": 0.10, "attr_word": 0.17, "attr_yesno": 0.15, "loc_easy": 0.20,
            "loc_hard": 0.25, "aggr": 0.05},
}
# The largest number of caption groups (besides gender) a T_loc caption may mention per stage.
# Share of wrong colours drawn from the person's other slots, per stage (0: uniform, as before).
STAGE_SWAP = {"slots": 0.6, "types": 0.6, "small": 0.6}
STAGE_MAX_GROUPS = {"attributes": 1, "colors": 1, "compare": 2, "bridge": 2, "slots": 3, "types": 3, "small": 3, "grounding": 2, "matching": 4, "all": 4}

# Alternatives of each attribute, used to draw a different value (a counterfactual person).
_VALUES: dict[str, Sequence[object]] = {
    "gender": ("man", "woman"),
    "hair_length": ("short", "long"),
    "hair_color": HAIR_COLORS,
    "upper_type": UPPER_TYPES,
    "upper_color": UPPER_COLORS,
    "sleeve": ("short", "long"),
    "lower_type": LOWER_TYPES,
    "lower_color": LOWER_COLORS,
    "lower_length": ("short", "long"),
    "shoes_color": SHOE_COLORS,
    "bag": BAG_TYPES,
    "bag_color": BAG_COLORS,
    "hat": (True, False),
    "glasses": (True, False),
}

# One-word attribute questions: the answer is the attribute alone, so the whole loss of the row
# sits on what the image shows (in a sentence answer most tokens follow from the question).
_WORD_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("gender", "Is the person a man or a woman?"),
    ("hair_length", "Is the hair short or long?"),
    ("hair_color", "What colour is the hair?"),
    ("upper_color", "What colour is the upper-body garment?"),
    ("upper_type", "What type is the upper-body garment?"),
    ("sleeve", "Are the sleeves short or long?"),
    ("lower_color", "What colour are the trousers or skirt?"),
    ("lower_type", "What type is the lower garment?"),
    ("lower_length", "Is the lower garment short or long?"),
    ("shoes_color", "What colour are the shoes?"),
    ("bag", "What bag does the person carry?"),
    ("bag_color", "What colour is the bag?"),
    ("hat", "Is the person wearing a hat?"),
    ("glasses", "Is the person wearing glasses?"),
)
WORD_SUFFIX = " Answer with one word."

# Generic yes/no attribute questions: (attribute key, question template with {v}).
_YESNO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("gender", "Is the person a {v}?"),
    ("hair_length", "Does the person have {v} hair?"),
    ("hair_color", "Is the person's hair {v}?"),
    ("upper_color", "Is the upper-body garment {v}?"),
    ("upper_type", "Is the person wearing a {v}?"),
    ("sleeve", "Are the sleeves {v}?"),
    ("lower_color", "Are the trousers or skirt {v}?"),
    ("lower_type", "Is the lower garment {v}?"),
    ("lower_length", "Is the lower garment {v}?"),
    ("shoes_color", "Are the shoes {v}?"),
    ("bag", "Is the person carrying a {v}?"),
    ("bag_color", "Is the bag {v}?"),
    ("hat", "Is the person wearing a hat?"),
    ("glasses", "Is the person wearing glasses?"),
)
YESNO_SUFFIX = " Answer with Yes or No only."
# the readout turn of loc_color_mt: all four colours in one short answer
READOUT_QUESTION = "What colours are the upper-body garment, the lower garment, the hair and the shoes?"
READOUT_NAMES = {"upper_color": "upper", "lower_color": "lower", "hair_color": "hair", "shoes_color": "shoes"}
IMAGE_TOKENS_GUESS = 8
# Aspects of T_vqa whose ground-truth answer depends on the image (the others are constant).
INFORMATIVE_ASPECTS = (0, 1, 2, 3, 5, 6, 8, 9, 10)


# -- attribute edits -------------------------------------------------------------------------

def _normalise(a: PersonAttributes) -> PersonAttributes | None:
    """Make an edited person valid (the generator's constraints), or None when impossible."""
    d = asdict(a)
    if d["upper_type"] in ("jacket", "coat", "sweater") and d["sleeve"] == "short":
        return None
    if d["lower_type"] == "shorts" and d["lower_length"] != "short":
        return None
    if d["lower_type"] in ("trousers", "jeans") and d["lower_length"] != "long":
        return None
    if d["bag"] == "none":
        d["bag_color"] = ""
    elif not d["bag_color"]:
        return None
    return PersonAttributes(**d)


def other_value(d: dict, key: str, rng: random.Random, swap_p: float = 0.0) -> object:
    """A value of ``key`` different from the person's. With probability ``swap_p`` a wrong colour
    is one the person wears elsewhere (upper colour := the trousers' colour): a negative that
    only slot-by-slot reading rejects. Without such rows the model learned "is this colour
    anywhere in the image" and accepted a retriever's near misses, which share colours across
    slots (docs/synthpedes_vl.md)."""
    options = [v for v in _VALUES[key] if v != d[key]]
    if key in COLOR_KEYS and swap_p > 0 and rng.random() < swap_p:
        worn = [v for v in options if v in {d[k] for k in COLOR_KEYS if k != key}]
        if worn:
            return rng.choice(worn)
    return rng.choice(options)


def counterfactual(a: PersonAttributes, keys: Sequence[str], n_changes: int, rng: random.Random,
                   swap_p: float = 0.0) -> PersonAttributes | None:
    """A person equal to ``a`` except for ``n_changes`` attributes drawn from ``keys``
    (``swap_p``: see :func:`other_value`)."""
    keys = [k for k in keys if k != "bag_color" or a.bag != "none"]
    if len(keys) < n_changes:
        return None
    for _ in range(20):
        d = asdict(a)
        for k in rng.sample(keys, n_changes):
            if k == "bag_color" and d["bag"] == "none":
                break
            d[k] = other_value(d, k, rng, swap_p)
            if k == "bag" and d["bag"] != "none" and not d["bag_color"]:
                d["bag_color"] = rng.choice(BAG_COLORS)
            if k == "lower_type":  # keep the length consistent with the new garment
                d["lower_length"] = {"shorts": "short", "trousers": "long", "jeans": "long"}.get(d["lower_type"], d["lower_length"])
            if k == "upper_type" and d["upper_type"] in ("jacket", "coat", "sweater"):
                d["sleeve"] = "long"
        b = _normalise(PersonAttributes(**d))
        if b is not None and b != a:
            return b
    return None


def caption_with_groups(a: PersonAttributes, rng: random.Random, max_groups: int) -> tuple[str, list[str]]:
    """A generator caption of ``a`` mentioning at most ``max_groups`` groups besides gender."""
    for _ in range(50):
        text, groups = make_caption(a, rng)
        if len([g for g in groups if g != "gender"]) <= max_groups:
            return text, groups
    return text, groups


# -- the rows --------------------------------------------------------------------------------

def _row(image: str | None, prompt: str, answer: str, task: str, label: str = "", pid: int = -1) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image] if image else [],
        # rough token count (about 4 characters a token, plus the image): lets the trainer group
        # rows of similar length (train_sampling_strategy: group_by_length), so a long VQA row
        # does not pad a whole batch of short Yes/No rows
        "length": (len(prompt) + len(answer)) // 4 + (IMAGE_TOKENS_GUESS if image else 0),
        "task": task,
        "label": label,
        "image_pid": pid,
    }


def vqa_full_answer(a: PersonAttributes) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(vqa_answers(a), 1))


def merged_description(a: PersonAttributes, groups: Sequence[str]) -> str:
    """One sentence mentioning exactly ``groups`` of ``a`` (the aggregation target)."""
    p = _phrases(a)
    subj = f"A {a.gender}" if "gender" in groups else "A person"
    parts = []
    if "hair" in groups:
        parts.append(f"has {p['hair']}")
    wear = [p[g] for g in ("upper", "lower", "shoes", "hat", "glasses") if g in groups and g in p]
    if wear:
        parts.append("wears " + (wear[0] if len(wear) == 1 else ", ".join(wear[:-1]) + " and " + wear[-1]))
    if "bag" in groups and "bag" in p:
        parts.append(f"carries {p['bag']}")
    if not parts:
        return f"{subj}."
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{subj} {body}."


_FACT_GROUPS = {1: "hair", 2: "upper", 3: "lower", 5: "shoes", 9: "bag"}


class Builder:
    """Draws rows of each task from the train identities of a SynthPEDES folder."""

    def __init__(self, dataset_root: str | Path, seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS,
                 split: str = "train", max_groups: int = 4, swap_p: float = 0.0):
        root = Path(dataset_root).resolve()
        ann = root / "reid_raw.json"
        if not ann.is_file():
            raise FileNotFoundError(f"{ann} not found: --dataset-root must be a folder written by "
                                    "`python -m synthpedes.dataset`")
        records = json.loads(ann.read_text(encoding="utf-8"))
        self.gt = load_ground_truth(root)
        self.images: list[tuple[str, int, list[str], list[list[str]]]] = []
        for r in records:
            if r["split"] != split:
                continue
            mentions = self.gt["mentions"].get(r["file_path"], [])
            self.images.append((str(root / "imgs" / r["file_path"]), int(r["id"]), list(r["captions"]), mentions))
        if not self.images:
            raise ValueError(f"{ann} has no '{split}' images")
        self.pids = sorted({pid for _, pid, _, _ in self.images})
        self.rng = random.Random(seed)
        self.prompts = prompts
        self.max_groups = max_groups
        self.swap_p = swap_p
        self._label_count: dict[str, int] = {}

    # one row per task ------------------------------------------------------------------------
    def _pick(self):
        path, pid, caps, mentions = self.rng.choice(self.images)
        return path, pid, caps, mentions, self.gt["ids"][pid]

    def vqa_full(self) -> dict:
        path, pid, _, _, a = self._pick()
        return _row(path, self.prompts.render_vqa(), vqa_full_answer(a), "vqa_full", pid=pid)

    def vqa_single(self) -> dict:
        path, pid, _, _, a = self._pick()
        i = self.rng.choice(INFORMATIVE_ASPECTS)
        return _row(path, self.prompts.vqa_aspects[i], vqa_answers(a)[i], "vqa_single", pid=pid)

    def attr_color(self) -> dict:
        return self.attr_word(keys=COLOR_KEYS, task="attr_color")

    def attr_word(self, keys: Sequence[str] | None = None, task: str = "attr_word") -> dict:
        path, pid, _, _, a = self._pick()
        d = asdict(a)
        key, q = self.rng.choice([kq for kq in _WORD_QUESTIONS if (kq[0] != "bag_color" or a.bag != "none")
                                  and (keys is None or kq[0] in keys)])
        v = d[key]
        answer = ("Yes" if v else "No") if isinstance(v, bool) else str(v)
        return _row(path, q + WORD_SUFFIX, answer, task, pid=pid)

    def attr_type(self) -> dict:
        return self.attr_word(keys=TYPE_KEYS, task="attr_type")

    def type_yesno(self) -> dict:
        return self.attr_yesno(keys=TYPE_KEYS, task="type_yesno")

    def color_yesno(self) -> dict:
        return self.attr_yesno(keys=COLOR_KEYS, task="color_yesno")

    def attr_yesno(self, keys: Sequence[str] | None = None, task: str = "attr_yesno") -> dict:
        path, pid, _, _, a = self._pick()
        d = asdict(a)
        want_yes = self._next_label(task)
        questions = [kq for kq in _YESNO_QUESTIONS if keys is None or kq[0] in keys]
        while True:
            key, q = self.rng.choice(questions)
            if key == "bag_color" and a.bag == "none":
                continue
            if key in ("hat", "glasses"):
                if d[key] != want_yes:  # no value to change in the question: ask another one
                    continue
                return _row(path, q + YESNO_SUFFIX, "Yes" if want_yes else "No", task,
                            "Yes" if want_yes else "No", pid)
            values = [v for v in _VALUES[key] if v != "none"]  # "carrying a none" is no question
            if want_yes and d[key] not in values:
                continue
            break
        if want_yes:
            v = d[key]
        elif self.swap_p > 0 and key in COLOR_KEYS:
            v = other_value(d, key, self.rng, self.swap_p)
        else:
            v = self.rng.choice([x for x in values if x != d[key]])
        label = "Yes" if v == d[key] else "No"
        return _row(path, q.format(v=v) + YESNO_SUFFIX, label, task, label, pid)

    def _next_label(self, task: str) -> bool:
        """Alternate Yes/No per task, so every task's labels are balanced exactly."""
        n = self._label_count.get(task, 0)
        self._label_count[task] = n + 1
        return n % 2 == 0

    def _positive_caption(self, a: PersonAttributes, caps: list[str], mentions: list[list[str]]) -> str:
        annotated = [c for c, g in zip(caps, mentions) if len([x for x in g if x != "gender"]) <= self.max_groups]
        if annotated and self.rng.random() < 0.3:
            return self.rng.choice(annotated)
        return caption_with_groups(a, self.rng, self.max_groups)[0]

    def loc(self, hard: bool, color_only: bool = False, task: str | None = None, near: bool = False) -> dict:
        """T_loc; ``color_only``: a hard negative whose changed facts are colours only; ``near``: the
        negative caption describes the most similar of a few other identities."""
        path, pid, caps, mentions, a = self._pick()
        task = task or ("loc_near" if near else "loc_color" if color_only else "loc_hard" if hard else "loc_easy")
        if self._next_label(task):
            return _row(path, self.prompts.render_loc(self._positive_caption(a, caps, mentions)), "Yes", task, "Yes", pid)
        for _ in range(200):
            if hard:
                text, groups = caption_with_groups(a, self.rng, self.max_groups)
                keys = [k for g in groups for k in GROUP_KEYS[g] if not color_only or k in COLOR_KEYS]
                n = 1 if self.rng.random() < 0.7 else 2
                b = counterfactual(a, keys, n, self.rng, self.swap_p)
                if b is None:
                    continue
                # the same sentence plan, now describing the edited person
                text, groups2 = caption_with_groups(b, random.Random(self.rng.random()), self.max_groups)
                facts = mentioned_facts(b, groups2)
                if consistent(a, facts):
                    continue
                # keep only captions that differ from the truth in at most two mentioned keys
                diff = sum(asdict(a)[k] != v for k, v in facts.items())
                if diff > 2:
                    continue
            elif near:
                # a retriever's near miss: of a few other identities, the one sharing the most
                # attributes with this person, described by a caption that contradicts the image
                d = asdict(a)
                pool = [p for p in self.rng.sample(self.pids, min(NEAR_POOL, len(self.pids))) if p != pid]
                other = max(pool, key=lambda p: sum(v == d[k] for k, v in asdict(self.gt["ids"][p]).items()))
                b = self.gt["ids"][other]
                text, groups2 = caption_with_groups(b, self.rng, self.max_groups)
                if consistent(a, mentioned_facts(b, groups2)):
                    continue
            else:
                other = self.rng.choice(self.pids)
                b = self.gt["ids"][other]
                text, groups2 = caption_with_groups(b, self.rng, self.max_groups)
                if consistent(a, mentioned_facts(b, groups2)):
                    continue
            return _row(path, self.prompts.render_loc(text), "No", task, "No", pid)
        raise RuntimeError("could not draw a negative caption; is the train split too small?")

    def loc_small(self) -> dict:
        """T_loc on captions that mention the hair or the shoes; a negative differs from the image
        only in the hair or shoe colour (small regions). A retriever's near misses mostly differ
        there, and without these rows the model checked garment colours only (docs/synthpedes_vl.md)."""
        path, pid, caps, mentions, a = self._pick()
        want_yes = self._next_label("loc_small")
        for _ in range(200):
            if want_yes:
                text, groups = caption_with_groups(a, self.rng, self.max_groups)
                if {"hair", "shoes"} & set(groups):
                    return _row(path, self.prompts.render_loc(text), "Yes", "loc_small", "Yes", pid)
                continue
            key = self.rng.choice(("hair_color", "shoes_color"))
            b = counterfactual(a, [key], 1, self.rng, self.swap_p)
            if b is None:
                continue
            text, groups = caption_with_groups(b, self.rng, self.max_groups)
            if {"hair_color": "hair", "shoes_color": "shoes"}[key] not in groups or consistent(a, mentioned_facts(b, groups)):
                continue
            return _row(path, self.prompts.render_loc(text), "No", "loc_small", "No", pid)
        raise RuntimeError("could not draw a loc_small caption; is the train split too small?")

    def aggr(self) -> dict:
        _, pid, _, _, a = self._pick()
        text, groups = make_caption(a, self.rng)
        answers = vqa_answers(a)
        k = self.rng.randint(1, 3)
        aspects = self.rng.sample(sorted(_FACT_GROUPS), k)
        facts = [answers[i] for i in aspects if not (i == 9 and a.bag == "none")] or [answers[2]]
        new_groups = list(dict.fromkeys(groups + [_FACT_GROUPS[i] for i in aspects]))
        if a.bag == "none" and "bag" in new_groups:
            new_groups.remove("bag")
        if "gender" not in new_groups:
            new_groups.insert(0, "gender")  # the VQA facts use he/she
        return _row(None, self.prompts.render_aggr(text, facts), merged_description(a, new_groups), "aggr", pid=pid)

    # two-turn bridges: the model first says what it sees (one-word colours), then answers the
    # Yes/No question with that readout in its context. Comparing two words is learned in a few
    # hundred steps; comparing a word with the image directly is what stalls (docs/synthpedes_vl.md).
    def _readout_turn(self, row: dict, keys: Sequence[str]) -> dict:
        a = asdict(self.gt["ids"][row["image_pid"]])
        questions = dict(_WORD_QUESTIONS)
        if len(keys) == 1:
            q, ans = questions[keys[0]] + WORD_SUFFIX, str(a[keys[0]])
        else:
            q = READOUT_QUESTION
            ans = ", ".join(f"{READOUT_NAMES[k]} {a[k]}" for k in keys)
        user, answer = row["messages"]
        row["messages"] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": ans}]},
            {"role": "user", "content": [c for c in user["content"] if c["type"] == "text"]},
            answer,
        ]
        row["length"] += (len(q) + len(ans)) // 4
        return row

    def color_yesno_mt(self) -> dict:
        key = self.rng.choice(COLOR_KEYS)
        row = self.attr_yesno(keys=[key], task="color_yesno_mt")
        return self._readout_turn(row, [key])

    def loc_color_mt(self) -> dict:
        row = self.loc(hard=True, color_only=True, task="loc_color_mt")
        return self._readout_turn(row, list(COLOR_KEYS))

    def draw(self, task: str) -> dict:
        if task == "loc_easy":
            return self.loc(hard=False)
        if task == "loc_hard":
            return self.loc(hard=True)
        if task == "loc_color":
            return self.loc(hard=True, color_only=True)
        if task == "loc_near":
            return self.loc(hard=False, near=True)
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
        return getattr(self, task)()


LONG_TASKS = ("vqa_full", "aggr")


def arrange_batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[dict]:
    """Order rows for a sequential sampler: batches of ``batch_size`` that mix the short tasks at
    random, and separate batches of the long rows (full VQA, aggregation), in random order.

    Why: a random batch that holds one full T_vqa row is padded to ~400 tokens (4-8x the cost of
    short rows); but grouping rows by length (``group_by_length``) makes batches of one question
    type each, and then the model chases each batch's answer prior and never learned to read the
    image (measured: colour answers at chance after 100k+ samples). Mixed short batches keep the
    image the only thing that explains the answers within a batch."""
    long = [r for r in rows if r["task"] in LONG_TASKS]
    short = [r for r in rows if r["task"] not in LONG_TASKS]
    rng.shuffle(long)
    rng.shuffle(short)
    batches = [short[i:i + batch_size] for i in range(0, len(short), batch_size)]
    batches += [long[i:i + batch_size] for i in range(0, len(long), batch_size)]
    rng.shuffle(batches)
    return [r for b in batches for r in b]


def build_rows(dataset_root: str | Path, num_samples: int, stage: str = "matching", seed: int = 0,
               mix: dict[str, float] | None = None, prompts: PromptSet = DEFAULT_PROMPTS,
               batch_size: int = 0) -> list[dict]:
    """``num_samples`` rows drawn by the stage's task weights (or ``mix``); with ``batch_size``
    the rows are ordered for a sequential sampler by :func:`arrange_batches`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': choose from {', '.join(STAGES)}")
    weights = mix or STAGES[stage]
    b = Builder(dataset_root, seed=seed, prompts=prompts, max_groups=STAGE_MAX_GROUPS[stage],
                swap_p=STAGE_SWAP.get(stage, 0.0))
    # exact counts per task (largest remainder), then a seeded shuffle
    total = sum(weights.values())
    raw = {t: num_samples * w / total for t, w in weights.items()}
    counts = {t: int(v) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: raw[t] - counts[t], reverse=True)[: num_samples - sum(counts.values())]:
        counts[t] += 1
    plan = [t for t, c in counts.items() for _ in range(c)]
    b.rng.shuffle(plan)
    rows = [b.draw(t) for t in plan]
    if batch_size > 0:
        rows = arrange_batches(rows, batch_size, random.Random(f"{seed}-batches"))
    return rows


def build(dataset_root: str | Path, out: str | Path, num_samples: int = 20000, stage: str = "matching",
          seed: int = 0, mix: dict[str, float] | None = None, batch_size: int = 0):
    """Build the rows and ``save_to_disk`` a DatasetDict with a ``train`` split; returns it."""
    from datasets import Dataset, DatasetDict

    rows = build_rows(dataset_root, num_samples, stage, seed, mix, batch_size=batch_size)
    ds = DatasetDict({"train": Dataset.from_list(rows)})
    out = Path(out)
    ds.save_to_disk(str(out))
    stats = summarise(rows)
    stats.update({"dataset_root": str(Path(dataset_root).resolve()), "stage": stage, "seed": seed,
                  "batch_size": batch_size})
    (out / "vl_pretrain_stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return ds


def summarise(rows: Sequence[dict]) -> dict:
    tasks = Counter(r["task"] for r in rows)
    labels = Counter((r["task"], r["label"]) for r in rows if r["label"])
    return {"rows": len(rows), "tasks": dict(sorted(tasks.items())),
            "labels": {f"{t}:{l}": c for (t, l), c in sorted(labels.items())}}


def main(argv: Sequence[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-root", required=True, help="SynthPEDES folder (train split is used)")
    ap.add_argument("--out", required=True, help="output folder (datasets save_to_disk)")
    ap.add_argument("--stage", default="matching", choices=sorted(STAGES), help="curriculum stage (task mix)")
    ap.add_argument("--num-samples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", default=None, help='JSON task weights overriding the stage, e.g. \'{"loc_hard": 1}\'')
    ap.add_argument("--batch-size", type=int, default=0,
                    help="order rows in mixed batches of this size for train_sampling_strategy: sequential "
                         "(0: plain shuffle)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mix = json.loads(args.mix) if args.mix else None
    ds = build(args.dataset_root, args.out, args.num_samples, args.stage, args.seed, mix, args.batch_size)
    stats = json.loads((Path(args.out) / "vl_pretrain_stats.json").read_text())
    print(f"{len(ds['train'])} rows written to {args.out} (stage {args.stage})")
    for t, c in stats["tasks"].items():
        print(f"  {t:<11}{c:>8}")
    return ds


if __name__ == "__main__":
    main()
