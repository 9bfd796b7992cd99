"""T_loc as a probability: which tokens mean Yes / No, and P(Yes) from logits or logprobs.

One function family serves every place that scores an anchor-localization answer: the hf
backend (one forward pass), the vllm backend (logprobs of the Yes/No ids at the first generated
token), the openai backend (``top_logprobs`` of the first token, matched by text) and the SFT
eval (teacher-forced logits at the first answer position). All of them compute

    p_yes = sum_{t in YES} p(t) / sum_{t in YES u NO} p(t)

at the first answer position: P(Yes) renormalised over the tokenizer's Yes/No tokens, so the
mass the model puts elsewhere (a "The", a newline) does not count for either side. With
``p_yes > 0.5`` as the rule this is the greedy decision whenever the argmax token is one of
those tokens (which it is for a tuned model); when it is not, the greedy text decides.

Variants: the chat template writes the answer right after the assistant header, so "Yes"/"No"
without a leading space is what training teaches; "yes"/"no" and " Yes"/" No" (with a space)
are counted too because a model can put a little mass on them. A variant is used only when the
tokenizer encodes it as a single token (on the Qwen2 tokenizer " yes" is two tokens and is
skipped; "YES" likewise). The ids are read from the tokenizer at load time, never hard-coded:
Qwen2-VL/2.5-VL/3-VL share the Qwen2 vocabulary (there "yes" is 9693 and "no" 2152, the ids
Qwen3-Reranker scores); the shipped SynthPEDES-VL tokenizer has its own: "Yes" 551, "No" 284,
"yes" 686, "no" 286, " Yes" 692, " No" 689, " no" 287 (" yes" is two tokens there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

YES_STRINGS: tuple[str, ...] = ("Yes", "yes", " Yes", " yes", "YES")
NO_STRINGS: tuple[str, ...] = ("No", "no", " No", " no", "NO")


@dataclass(frozen=True)
class YesNoIds:
    """The single-token Yes and No variants of one tokenizer (ids and their strings)."""

    yes: tuple[int, ...]
    no: tuple[int, ...]
    yes_strings: tuple[str, ...]
    no_strings: tuple[str, ...]

    @property
    def all(self) -> tuple[int, ...]:
        return self.yes + self.no

    def as_dict(self) -> dict[str, Any]:
        return {"yes": dict(zip(self.yes_strings, self.yes)), "no": dict(zip(self.no_strings, self.no))}


def _single_token(tokenizer: Any, s: str) -> int | None:
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def yes_no_ids(tokenizer: Any) -> YesNoIds:
    """The Yes/No token ids of ``tokenizer`` (a tokenizer or a processor holding one).

    "Yes" and "No" themselves must be single tokens (every Qwen-VL tokenizer has them); the other
    variants join when they are single tokens and distinct. Raises ValueError otherwise."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    yes: dict[int, str] = {}
    no: dict[int, str] = {}
    for strings, into in ((YES_STRINGS, yes), (NO_STRINGS, no)):
        for s in strings:
            i = _single_token(tok, s)
            if i is not None and i not in yes and i not in no:
                into[i] = s
    if "Yes" not in yes.values() or "No" not in no.values():
        raise ValueError(f"the tokenizer {type(tok).__name__} does not encode 'Yes' and 'No' as single distinct tokens; "
                         "T_loc scores (p_yes) need them")
    return YesNoIds(tuple(yes), tuple(no), tuple(yes.values()), tuple(no.values()))


def p_yes_from_logits(logits: torch.Tensor, ids: YesNoIds) -> torch.Tensor:
    """P(Yes) renormalised over the Yes/No ids from next-token ``logits`` [..., V] (float32 math)."""
    lg = logits.float()
    y = torch.logsumexp(lg[..., list(ids.yes)], dim=-1)
    n = torch.logsumexp(lg[..., list(ids.no)], dim=-1)
    return torch.sigmoid(y - n)  # = e^y / (e^y + e^n), stable at any scale


def p_yes_from_logprobs(logprobs: Mapping[Any, float], yes: Iterable[Any], no: Iterable[Any]) -> float | None:
    """P(Yes) from a first-token logprob table ``{token id or text: logprob}`` (vLLM's per-id
    logprobs, an OpenAI ``top_logprobs`` list turned into a dict). ``yes``/``no`` name the keys
    that count. Returns None when neither side is in the table (nothing to say)."""
    ys = [float(logprobs[k]) for k in yes if k in logprobs and logprobs[k] is not None]
    ns = [float(logprobs[k]) for k in no if k in logprobs and logprobs[k] is not None]
    if not ys and not ns:
        return None
    y = _logsumexp(ys)
    n = _logsumexp(ns)
    if y == -math.inf and n == -math.inf:
        return None
    d = y - n
    return 1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0


def _logsumexp(xs: list[float]) -> float:
    xs = [x for x in xs if x != -math.inf and not math.isnan(x)]
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def token_text_side(text: str) -> str | None:
    """'yes' / 'no' / None: which side an answer's first token (as text) is on."""
    t = (text or "").strip().lower()
    return "yes" if t == "yes" else "no" if t == "no" else None


def yes_no_text(p_yes: float) -> str:
    """The text answer a scored T_loc call stores when its argmax is a Yes/No token."""
    return "Yes" if p_yes > 0.5 else "No"
