"""A simulated MLLM for SynthPEDES: answers come from the generator's ground truth.

This is a SIMULATION, not a model: ``simulated = True`` and every output built on it says so.
It lets THI and RDA run end to end, fast and with known-correct answers, and, with
``error_rate > 0``, measures how answer errors propagate.

Answers per task:
- ``loc`` (T_loc): the caption is parsed out of the prompt (with the same template that built
  it) and looked up in ``reid_raw.json``; the image is looked up by its path.
  ``loc_rule="consistent"`` (default) answers Yes iff every attribute the caption mentions holds
  for the person in the image: what a perfect visual judge can know from the text alone, so an
  ambiguous caption gets Yes on other identities that fit it. ``loc_rule="identity"`` answers Yes
  iff the caption was written for the image's identity (an upper bound no MLLM can reach).
- ``vqa`` (T_vqa): the 15 ground-truth answer sentences (``synthetic.vqa_answers``), numbered.
- ``aggr`` (T_aggr): the caption followed by the facts not already in it (deterministic merge).
- ``dec`` / ``rwt``: deterministic sentence split / light rewrites, for RDA plumbing.
T_loc scores (``localize``): p_yes is a simulated confidence, on the side of the answer: a Yes
gets 0.8 +- 0.15 (a hash-seeded jitter, so confidences among Yes carry no identity information a
visual judge could not have), a No gets 0.45 * f^2 +- 0.04 where f is the fraction of the
caption's attributes that hold for the person (a near miss is an unsure No); a flipped answer
(error) flips its p_yes to 1 - p_yes. So p_yes > 0.5 exactly when the answer is Yes.
Errors: with probability ``error_rate`` (decided by a hash of seed, task, prompt and image, so it
does not depend on batching) a loc answer is flipped and each VQA sentence is replaced by the
one of a randomly drawn person.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

from synthpedes.dataset import (
    PersonAttributes,
    consistent,
    load_ground_truth,
    mentioned_facts,
    sample_attributes,
    vqa_answers,
)
from mllm_tune.core.prompts import DEFAULT_PROMPTS, PromptSet, split_answer_sentences

from mllm_tune.core.backends.base import BackendError, LocAnswer, MLLMBackend, MLLMRequest, check_loc_requests

SIMULATION_LABEL = "SIMULATION: oracle backend answering from SynthPEDES ground truth (no MLLM)"
LOC_RULES = ("consistent", "identity")


def _template_regex(template: str) -> re.Pattern[str]:
    """A regex that parses the fields back out of a rendered template."""
    parts = re.split(r"{(\w+)}", template)
    rx = []
    for i, part in enumerate(parts):
        rx.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>.*?)")
    return re.compile("".join(rx) + r"\Z", re.DOTALL)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _fraction_held(person: PersonAttributes, facts: dict[str, object]) -> float:
    if not facts:
        return 1.0
    return sum(consistent(person, {k: v}) for k, v in facts.items()) / len(facts)


class OracleBackend(MLLMBackend):
    kind = "oracle"
    simulated = True
    scores_loc = True

    def __init__(
        self,
        dataset_root: str | Path,
        error_rate: float = 0.0,
        seed: int = 0,
        loc_rule: str = "consistent",
        prompts: PromptSet = DEFAULT_PROMPTS,
        latency: float = 0.0,
        **_: Any,
    ) -> None:
        if loc_rule not in LOC_RULES:
            raise ValueError(f"oracle loc_rule must be one of {LOC_RULES}, got {loc_rule!r}")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"oracle error_rate must be in [0, 1], got {error_rate}")
        self.root = Path(dataset_root)
        ann = self.root / "reid_raw.json"
        if not ann.is_file():
            raise BackendError(
                f"the oracle backend works on SynthPEDES only: {ann} not found. Generate a dataset with "
                "`python -m synthpedes.dataset --out DIR` and pass --dataset-root DIR"
            )
        truth = load_ground_truth(self.root)
        self.attrs: dict[int, PersonAttributes] = truth["ids"]
        self.error_rate = float(error_rate)
        self.seed = int(seed)
        self.loc_rule = loc_rule
        self.prompts = prompts
        self.latency = float(latency)  # seconds per request: simulates an MLLM's cost (benchmarks, kill tests)
        self._img_dir = (self.root / "imgs").resolve()
        self._image_id: dict[str, int] = {}
        # caption text -> [(id, facts)]; the same text can be written for several ids
        self._captions: dict[str, list[tuple[int, dict[str, object]]]] = {}
        for rec in json.loads(ann.read_text(encoding="utf-8")):
            pid = int(rec["id"])
            self._image_id[rec["file_path"]] = pid
            groups = truth["mentions"].get(rec["file_path"], [])
            for j, cap in enumerate(rec["captions"]):
                facts = mentioned_facts(self.attrs[pid], groups[j]) if j < len(groups) else {}
                self._captions.setdefault(_norm(cap), []).append((pid, facts))
        self._rx = {t: _template_regex(getattr(prompts, t)) for t in ("loc", "aggr", "dec", "rwt")}

    def identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "simulated": True,
            "label": SIMULATION_LABEL,
            "dataset_root": str(self.root.resolve()),
            "error_rate": self.error_rate,
            "seed": self.seed,
            "loc_rule": self.loc_rule,
        }

    # -- lookups ---------------------------------------------------------------------------
    def _rng(self, req: MLLMRequest, salt: str = "") -> random.Random:
        # the image by its path inside the dataset, so a dataset generated elsewhere (same seed)
        # gets the same simulated errors
        img = "-" if req.image is None else (self._relative(req.image) or str(req.image))
        h = hashlib.sha256(f"{self.seed}|{req.task}|{req.prompt}|{img}|{salt}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "big"))

    def _relative(self, image: str) -> str | None:
        """The image's path inside the dataset's imgs/ folder, or None when it lies elsewhere."""
        try:
            return Path(image).resolve().relative_to(self._img_dir).as_posix()
        except ValueError:
            return None

    def image_id(self, image: str | None) -> int:
        if image is None:
            raise BackendError("oracle: this task needs an image, the request has none")
        rel = self._relative(image)
        if rel is None:
            raise BackendError(f"oracle: image {image} is not under {self._img_dir}; the oracle only knows "
                               "the SynthPEDES folder it was built on")
        if rel not in self._image_id:
            raise BackendError(f"oracle: image {rel} is not annotated in {self.root / 'reid_raw.json'}")
        return self._image_id[rel]

    def _fields(self, task: str, prompt: str) -> dict[str, str]:
        m = self._rx[task].match(prompt)
        if m is None:
            raise BackendError(f"oracle: the {task} prompt does not follow the {task} template it was built with; "
                               "pass the same PromptSet to the oracle and to the code that renders prompts")
        return m.groupdict()

    # -- answers ---------------------------------------------------------------------------
    def _loc(self, req: MLLMRequest) -> str:
        return self._loc_scored(req).text

    def _loc_scored(self, req: MLLMRequest) -> LocAnswer:
        caption = _norm(self._fields("loc", req.prompt)["caption"])
        pid = self.image_id(req.image)
        entries = self._captions.get(caption)
        if not entries:
            raise BackendError(f"oracle: caption not found in {self.root / 'reid_raw.json'}: {caption[:80]!r}")
        if self.loc_rule == "identity":
            yes = any(e[0] == pid for e in entries)
        else:
            yes = any(consistent(self.attrs[pid], facts) for _, facts in entries)
        # fraction of the caption's attributes that hold for this person (best reading of the text)
        held = max((_fraction_held(self.attrs[pid], facts) for _, facts in entries), default=0.0)
        jitter = self._rng(req, "p_yes").uniform(-1.0, 1.0)
        p = 0.8 + 0.15 * jitter if yes else min(0.49, max(0.0, 0.45 * held * held + 0.04 * jitter))
        if self.error_rate and self._rng(req).random() < self.error_rate:
            yes, p = not yes, 1.0 - p
        return LocAnswer("Yes" if yes else "No", round(p, 6))

    def localize(self, requests: Sequence[MLLMRequest]) -> list[LocAnswer]:
        check_loc_requests(requests)
        if self.latency:
            time.sleep(self.latency * len(requests))
        return [self._loc_scored(r) for r in requests]

    def _vqa(self, req: MLLMRequest) -> str:
        pid = self.image_id(req.image)
        sents = vqa_answers(self.attrs[pid])
        if self.error_rate:
            rng = self._rng(req)
            for i in range(len(sents)):
                if rng.random() < self.error_rate:
                    sents[i] = vqa_answers(sample_attributes(rng))[i]
        return "\n".join(f"{i}. {s}" for i, s in enumerate(sents, 1))

    def _aggr(self, req: MLLMRequest) -> str:
        f = self._fields("aggr", req.prompt)
        caption = _norm(f["caption"])
        seen = {caption.lower()}
        out = [caption if caption.endswith((".", "!", "?")) else caption + "."]
        for s in split_answer_sentences(f["facts"].replace(". ", ".\n")):
            if s.lower() not in seen and s.lower().rstrip(".") not in caption.lower():
                seen.add(s.lower())
                out.append(s)
        return " ".join(out)

    def _dec(self, req: MLLMRequest) -> str:
        text = _norm(self._fields("dec", req.prompt)["text"])
        parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|,\s+|\s+and\s+", text) if p.strip()]
        return "\n".join(p.rstrip(".") + "." for p in parts)

    def _rwt(self, req: MLLMRequest) -> str:
        f = self._fields("rwt", req.prompt)
        s = _norm(f["sentence"]).rstrip(".")
        m = int(f["m"])
        forms = [f"{s}.", f"It can be seen that {s[0].lower() + s[1:]}.", f"Notably, {s[0].lower() + s[1:]}.",
                 f"In the picture, {s[0].lower() + s[1:]}.", f"Also, {s[0].lower() + s[1:]}."]
        return "\n".join(forms[i % len(forms)] for i in range(m))

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        handlers = {"loc": self._loc, "vqa": self._vqa, "aggr": self._aggr, "dec": self._dec, "rwt": self._rwt}
        if self.latency:
            time.sleep(self.latency * len(requests))
        return [handlers[r.task](r) for r in requests]
