"""Yes/No metrics of the model's answer on the held-out pairs, logged with the eval metrics.

The answer of an anchor-localization pair is "Yes" or "No" (SPEC §4). With teacher forcing, the
prediction at the first answer position sees exactly the prompt and the image, so it is the first
step of greedy decoding, and the distribution there is the one the backends score T_loc with
(``mllm_tune.core.yes_no``). Two things are read at that position of every eval row, both from the
forward pass that computes ``eval_loss`` (no second forward pass):

- the greedy answer: TRL's fused LM head reports, per labelled position, whether the top-1 token
  equals the label (``is_top1``); the flag at the first labelled position gives the accuracy;
- P(Yes): TRL's fused head never builds logits, so a forward hook on the language backbone (the
  module whose ``last_hidden_state`` the fused head projects) keeps the final hidden state h at the
  first answer position of each row, and the logits of the Yes/No tokens alone are
  ``h . W[ids]^T (+ b[ids])``, W being the output embedding (``lm_head``). ``p_yes_from_logits``
  turns them into p_yes, the same function the backends use, so the numbers here are the ones
  ``--mllm hf`` would give. Cost per batch: indexing B hidden vectors and a (B, H) x (H, ~8) matmul in
  float32; the ~8 rows of W are copied once per evaluation (under ZeRO-3 gathered once, with
  TRL's ``maybe_gather_lm_head_ctx``; under FSDP2 from the full tensor). Models that scale or
  soft-cap their logits (none of the Qwen-VL class) get a warning: their p_yes would be off.

Logged per evaluation (pairs whose first gold answer token is a Yes or No variant; NaN where a
metric has nothing to measure):

- ``eval_yesno_accuracy`` (all pairs), ``eval_yesno_accuracy_yes`` / ``eval_yesno_accuracy_no``
  (recall on positive / negative pairs) and ``eval_yesno_pairs``: the greedy first token;
- ``eval_yesno_auc``: ROC-AUC of p_yes against the gold answer, i.e. the probability that a random
  positive pair scores higher than a random negative one, ties counted half (NaN unless both
  classes are present). A LoRA can raise it, ranking pairs better, without changing any argmax;
- ``eval_yesno_ece``: expected calibration error of p_yes as a probability of "Yes": the pairs
  fall into 10 equal-width bins of p_yes ([0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]) and
  ECE = sum_b (n_b / n) |mean gold Yes in b - mean p_yes in b| (0 is perfectly calibrated);
- ``eval_yesno_brier``: mean (p_yes - gold Yes)^2.

Works the same under DDP and ZeRO-3: the per-row numbers are gathered with
``accelerator.gather_for_metrics`` and every rank computes the metrics from all rows.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from mllm_tune.core.yes_no import YesNoIds, p_yes_from_logits, yes_no_ids

logger = logging.getLogger(__name__)

ECE_BINS = 10


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """First token ids of the answers "Yes" and "No" (as the chat template writes them)."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise ValueError("the tokenizer does not separate 'Yes' and 'No' by their first token")
    return int(yes[0]), int(no[0])


# -- scores of p_yes against the gold answer (pure functions) --------------------------------------


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def roc_auc(scores: Any, labels: Any) -> float:
    """ROC-AUC of ``scores`` for the binary ``labels`` (true = positive).

    The Mann-Whitney form: the share of (positive, negative) pairs in which the positive scores
    higher, a tie counting one half. Computed from mid-ranks in O(n log n). NaN when either class
    is missing."""
    s, y = _scores_and_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_s)) + 1])
    ends = np.concatenate([starts[1:], [s.size]])
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based mean rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> float:
    """ECE of ``probs`` as probabilities that ``labels`` is true, over ``n_bins`` equal-width bins.

    Bin k holds k/n_bins <= p < (k+1)/n_bins (the last bin includes 1.0); each non-empty bin adds
    (its share of the rows) x |mean label - mean p| in it. NaN for no rows."""
    p, y = _scores_and_labels(probs, labels)
    if p.size == 0:
        return float("nan")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    bins = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    gap = np.bincount(bins, weights=y.astype(np.float64) - p, minlength=n_bins)  # per bin: sum(y) - sum(p)
    return float(np.abs(gap).sum() / p.size)


def brier_score(probs: Any, labels: Any) -> float:
    """Mean squared difference between ``probs`` and the 0/1 ``labels``. NaN for no rows."""
    p, y = _scores_and_labels(probs, labels)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


# -- per-row stats at the first answer position ---------------------------------------------------


def first_answer_positions(label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, has_label) per row: the first True of ``label_mask`` (B, T) and whether there is one."""
    mask = label_mask.bool()
    return torch.argmax(mask.to(torch.int8), dim=1), mask.any(dim=1)


def _id_tensor(ids: int | Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor([ids] if isinstance(ids, int) else list(ids), dtype=torch.long, device=device)


def first_answer_stats(is_top1: torch.Tensor, label_mask: torch.Tensor, shifted_labels: torch.Tensor,
                       yes_id: int | Sequence[int], no_id: int | Sequence[int]) -> torch.Tensor:
    """Per row: [has_yes_no_answer, gold_is_yes, greedy_first_token_correct] as a (B, 3) tensor.

    All inputs are aligned with next-token prediction (position t predicts label t+1), i.e. the
    shape of TRL's fused outputs. ``yes_id`` / ``no_id`` are one id or several (the Yes/No
    variants). Rows whose first answer token is neither a Yes nor a No id count as invalid (has = 0).
    """
    first, has_label = first_answer_positions(label_mask)
    rows = torch.arange(first.size(0), device=first.device)
    gold = shifted_labels[rows, first]
    correct = is_top1[rows, first].bool() & has_label
    is_yes = torch.isin(gold, _id_tensor(yes_id, gold.device))
    valid = has_label & (is_yes | torch.isin(gold, _id_tensor(no_id, gold.device)))
    return torch.stack([valid, is_yes & valid, correct & valid], dim=1).float()


class YesNoAccumulator:
    """Collects per-row stats over one evaluation and turns them into metrics.

    A row is [valid, gold_is_yes, greedy_correct] and optionally a 4th column p_yes (NaN where it
    could not be computed); the p_yes metrics are reported only when that column is there."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def add(self, stats: torch.Tensor) -> None:
        self.rows.append(stats.detach().float().cpu())

    def reset(self) -> None:
        self.rows.clear()

    def __bool__(self) -> bool:
        return bool(self.rows)

    def result(self) -> dict[str, float]:
        if not self.rows:
            return {}
        s = torch.cat(self.rows)
        valid, yes, correct = s[:, 0] > 0, s[:, 1] > 0, s[:, 2] > 0
        no = valid & ~yes
        n, ny, nn = int(valid.sum()), int(yes.sum()), int(no.sum())

        def frac(a: torch.Tensor, b: int) -> float:
            return float(a.sum()) / b if b else float("nan")

        out = {
            "yesno_accuracy": frac(correct & valid, n),
            "yesno_accuracy_yes": frac(correct & yes, ny),
            "yesno_accuracy_no": frac(correct & no, nn),
            "yesno_pairs": float(n),
        }
        if s.size(1) > 3:
            scored = valid & torch.isfinite(s[:, 3])
            p, gold = s[scored, 3].double().numpy(), yes[scored].numpy()
            out.update({
                "yesno_auc": roc_auc(p, gold),
                "yesno_ece": expected_calibration_error(p, gold),
                "yesno_brier": brier_score(p, gold),
            })
        return out


# -- the Yes/No rows of the LM head and the hidden state at the first answer position --------------


def _unwrap(model: Any, accelerator: Any = None) -> Any:
    """The transformers model under DDP / DeepSpeed / PEFT wrappers (the one TRL patched)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    return get_base() if callable(get_base) else model


def yes_no_head(model: Any, ids: YesNoIds) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 copies of the Yes/No rows of the output embedding: weight (k, H) and bias (k,) or None.

    Row order is ``ids.all`` (Yes variants, then No variants). Under ZeRO-3 the partitioned weight
    is gathered for the copy (every rank must call this); under FSDP2 the full tensor is used."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    index = torch.as_tensor(ids.all, dtype=torch.long)
    with maybe_gather_lm_head_ctx(weight, bias), torch.no_grad():
        w, b = weight, bias
        if hasattr(w, "full_tensor"):  # FSDP2 DTensor
            w = w.full_tensor()
            b = b.full_tensor() if b is not None else None
        w_rows = w[index.to(w.device)].detach().float().clone()
        b_rows = b[index.to(b.device)].detach().float().clone() if b is not None else None
    return w_rows, b_rows


def yes_no_logits(hidden: torch.Tensor, w_rows: torch.Tensor, b_rows: torch.Tensor | None) -> torch.Tensor:
    """Logits (…, k) of the Yes/No tokens from final hidden states (…, H), in float32."""
    h = hidden.float().to(w_rows.device)
    logits = h @ w_rows.T
    return logits + b_rows if b_rows is not None else logits


def local_ids(ids: YesNoIds) -> YesNoIds:
    """``ids`` renumbered as columns of ``yes_no_logits`` (Yes variants first, then No)."""
    ny = len(ids.yes)
    return YesNoIds(tuple(range(ny)), tuple(range(ny, ny + len(ids.no))), ids.yes_strings, ids.no_strings)


class _HiddenAtPositions:
    """Forward hook on the language backbone: keeps ``last_hidden_state[row, position[row]]`` (B, H)."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self.hidden: torch.Tensor | None = None

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        h = getattr(output, "last_hidden_state", None)
        if h is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
            h = output[0]
        if h is None or h.dim() != 3 or h.size(0) != self.positions.size(0):
            return
        pos = self.positions.to(h.device)
        self.hidden = h[torch.arange(h.size(0), device=h.device), pos].detach()


_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


class YesNoEvalMixin:
    """Mix into TRL's SFTTrainer (before it in the bases) to add the Yes/No metrics to eval logs."""

    yesno_enabled: bool = True

    def _yesno_setup(self) -> None:
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._yesno_ids = answer_token_ids(tok)
        self._yesno_acc = YesNoAccumulator()
        self._yesno_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        try:
            self._yesno_variants: YesNoIds | None = yes_no_ids(tok)
        except ValueError as exc:
            logger.warning("Yes/No eval: %s; logging the greedy accuracy only", exc)
            self._yesno_variants = None
            return
        config = getattr(_unwrap(self.model), "config", None)
        text_config = config.get_text_config() if config is not None else None
        scaled = [k for k in _SCALED_LOGITS if getattr(text_config, k, None) not in (None, 1, 1.0)]
        if scaled:
            logger.warning("Yes/No eval: the model's config scales its logits (%s); eval_yesno_auc/ece/brier read the "
                           "plain h . W logits and can be off", ", ".join(scaled))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
        if self.model.training or not self.yesno_enabled or "labels" not in inputs:
            if hasattr(self, "_yesno_head"):
                self._yesno_head = None  # weights move: copy the head rows again at the next evaluation
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not hasattr(self, "_yesno_acc"):
            self._yesno_setup()
        labels = inputs["labels"]
        ids = self._yesno_variants
        hook = handle = None
        if ids is not None:
            inner = _unwrap(model, self.accelerator)
            backbone = getattr(inner, "base_model", None)  # what TRL's fused head runs before projecting
            if isinstance(backbone, torch.nn.Module) and backbone is not inner:
                if self._yesno_head is None:
                    self._yesno_head = yes_no_head(inner, ids)  # once per evaluation (a collective under ZeRO-3)
                positions, _ = first_answer_positions(labels[:, 1:] != -100)
                hook = _HiddenAtPositions(positions)
                handle = backbone.register_forward_hook(hook)
        rec = _Recorder(model)
        try:
            result = super().compute_loss(rec, inputs, return_outputs, num_items_in_batch)
        finally:
            if handle is not None:
                handle.remove()
        out = rec.outputs
        if out is not None and getattr(out, "is_top1", None) is not None and getattr(out, "label_mask", None) is not None:
            shifted = labels[:, 1:] if out.label_mask.size(1) == labels.size(1) - 1 else labels
            yes_id, no_id = (ids.yes, ids.no) if ids is not None else self._yesno_ids
            stats = first_answer_stats(out.is_top1, out.label_mask, shifted.to(out.is_top1.device), yes_id, no_id)
            p_yes = torch.full((stats.size(0), 1), float("nan"), device=stats.device)
            if hook is not None and hook.hidden is not None and self._yesno_same_rows(hook.positions, out.label_mask):
                logits = yes_no_logits(hook.hidden, *self._yesno_head)
                p_yes = p_yes_from_logits(logits, local_ids(ids)).to(stats.device)[:, None]
            self._yesno_acc.add(self.accelerator.gather_for_metrics(torch.cat([stats, p_yes], dim=1)))
        return result

    def _yesno_same_rows(self, positions: torch.Tensor, label_mask: torch.Tensor) -> bool:
        """Whether the hook read the positions the fused head scored (not so with prompt-learning PEFT,
        whose virtual tokens shift the sequence): otherwise p_yes is left out (NaN)."""
        first, _ = first_answer_positions(label_mask)
        same = first.shape == positions.shape and bool((first.cpu() == positions.cpu()).all())
        if not same and not getattr(self, "_yesno_warned", False):
            logger.warning("Yes/No eval: the labelled positions of the fused head differ from the labels'; "
                           "eval_yesno_auc/ece/brier are left out")
            self._yesno_warned = True
        return same

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        acc = getattr(self, "_yesno_acc", None)
        if acc and not self.model.training:
            logs.update({f"eval_{k}": v for k, v in acc.result().items()})
            acc.reset()
            self._yesno_head = None
        super().log(logs, start_time)


class _Recorder:
    """Calls the model and keeps its outputs, so metrics can read what the loss forward made."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.outputs: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.outputs = self._model(*args, **kwargs)
        return self.outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
