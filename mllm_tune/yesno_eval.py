"""Yes/No accuracy of the model's answer on the held-out pairs, logged with the eval metrics.

The answer of an anchor-localization pair is "Yes" or "No" (SPEC §4), so the model's greedy
answer is decided by its first answer token. With teacher forcing, the prediction at the first
answer position sees exactly the prompt and image, so its top-1 token *is* the first token greedy
decoding would emit. TRL's fused LM head already reports, per labelled position, whether the top-1
token equals the label (`is_top1`); this module reads that flag at the first labelled position of
each row, so the metric costs no extra forward pass (works the same under DDP and ZeRO-3).

Logged as `eval_yesno_accuracy` (all pairs), `eval_yesno_accuracy_yes` / `eval_yesno_accuracy_no`
(recall on positive / negative pairs) and `eval_yesno_pairs`.
"""

from __future__ import annotations

from typing import Any

import torch


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """First token ids of the answers "Yes" and "No" (as the chat template writes them)."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise ValueError("the tokenizer does not separate 'Yes' and 'No' by their first token")
    return int(yes[0]), int(no[0])


def first_answer_stats(is_top1: torch.Tensor, label_mask: torch.Tensor, shifted_labels: torch.Tensor,
                       yes_id: int, no_id: int) -> torch.Tensor:
    """Per row: [has_yes_no_answer, gold_is_yes, greedy_first_token_correct] as a (B, 3) tensor.

    All inputs are aligned with next-token prediction (position t predicts label t+1), i.e. the
    shape of TRL's fused outputs. Rows whose first answer token is neither Yes nor No count as
    invalid (has = 0).
    """
    mask = label_mask.bool()
    has_label = mask.any(dim=1)
    first = torch.argmax(mask.to(torch.int8), dim=1)  # first True position per row
    rows = torch.arange(mask.size(0), device=mask.device)
    gold = shifted_labels[rows, first]
    correct = is_top1[rows, first].bool() & has_label
    is_yes = gold == yes_id
    valid = has_label & (is_yes | (gold == no_id))
    return torch.stack([valid, is_yes & valid, correct & valid], dim=1).float()


class YesNoAccumulator:
    """Collects per-row stats over one evaluation and turns them into metrics."""

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

        return {
            "yesno_accuracy": frac(correct & valid, n),
            "yesno_accuracy_yes": frac(correct & yes, ny),
            "yesno_accuracy_no": frac(correct & no, nn),
            "yesno_pairs": float(n),
        }


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


class YesNoEvalMixin:
    """Mix into TRL's SFTTrainer (before it in the bases) to add the Yes/No metrics to eval logs."""

    yesno_enabled: bool = True

    def _yesno_setup(self) -> None:
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._yesno_ids = answer_token_ids(tok)
        self._yesno_acc = YesNoAccumulator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D401
        if self.model.training or not self.yesno_enabled or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not hasattr(self, "_yesno_acc"):
            self._yesno_setup()
        rec = _Recorder(model)
        labels = inputs["labels"]
        result = super().compute_loss(rec, inputs, return_outputs, num_items_in_batch)
        out = rec.outputs
        if out is not None and getattr(out, "is_top1", None) is not None and getattr(out, "label_mask", None) is not None:
            shifted = labels[:, 1:] if out.label_mask.size(1) == labels.size(1) - 1 else labels
            stats = first_answer_stats(out.is_top1, out.label_mask, shifted.to(out.is_top1.device), *self._yesno_ids)
            self._yesno_acc.add(self.accelerator.gather_for_metrics(stats))
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        acc = getattr(self, "_yesno_acc", None)
        if acc and not self.model.training:
            logs.update({f"eval_{k}": v for k, v in acc.result().items()})
            acc.reset()
        super().log(logs, start_time)
