"""Fine-tune a CLIP retriever on a PEDES training split, optionally with RDA text (SPEC §6).

    python -m mllm_tune.retriever_train --model CLIP_FOLDER --dataset-root DIR --output-dir OUT
    python -m mllm_tune.retriever_train --config recipes/retriever_clip.yaml --model ... (CLI wins)
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m mllm_tune.retriever_train ...

Each training example is one caption with its own image. Loss: a matching loss between the
image and caption features of a batch, with every pair of the same identity a positive:
TAL (RDE's triplet alignment loss, default) or SDM (IRRA's similarity distribution matching),
both at temperature ``tau`` (0.015) and, for TAL, margin 0.1. With ``--rda-file`` the same loss
on the recombined RDA text is added with weight gamma = max(0.1, 1 - 0.03 * epoch) (epochs
counted from 1) or a fixed ``--rda-gamma``; captions without an RDA line use their own text
there. Token noise (``--token-noise``, p = 0.2) is applied to both texts.

Evaluation after every epoch on ``--val-split`` with ``mllm_tune.core.metrics.rank_metrics``; the best
epoch by val R1 is saved with ``save_pretrained`` (a folder ``load_retriever`` reads). With
``--test-split`` the untrained and the trained model are both scored on it. Results go to
``OUT/train_results.json`` and a table in ``OUT/train_results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class RetrieverTrainError(ValueError):
    """Bad input to a retriever fine-tuning run (the command line prints it as one `error:` line)."""


@dataclass
class TrainConfig:
    model: str = ""  # a CLIP folder or retriever spec (irra:PATH works too)
    dataset_root: str = ""
    output_dir: str = ""
    dataset: str = "cuhk-pedes"
    train_split: str = "train"
    val_split: str | None = "val"  # "none" to skip
    test_split: str | None = None
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 4e-5
    warmup_epochs: float = 5.0
    max_grad_norm: float | None = None  # clip gradients (helps models trained from scratch)
    min_lr_ratio: float = 0.0
    loss: str = "tal"  # tal | sdm
    tau: float = 0.015
    margin: float = 0.1
    rda_file: str | None = None
    rda_gamma: float | None = None  # None: max(0.1, 1 - 0.03 * epoch)
    token_noise: float = 0.2
    flip: bool = True
    pad_crop: int = 0  # random translation: pad by this many pixels and crop back (IRRA's crop augmentation)
    image_size: str | None = None  # HxW; default: the model's own person-crop size (384x128 for 224/16)
    text_length: int | None = None
    seed: int = 0
    eval_batch_size: int = 128
    num_workers: int = 0
    cache_images: str = "auto"  # auto | yes | no: keep resized training images in memory
    mixed_precision: str = "no"
    threads: int | None = None  # torch CPU threads; 1 is much faster for tiny models on a busy CPU
    save: str = "best"  # best (by val R1) | last
    progress: bool = True


# -- losses ------------------------------------------------------------------------------------

def _same_identity(pids: torch.Tensor) -> torch.Tensor:
    return pids.view(-1, 1) == pids.view(1, -1)


def sdm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, tau: float,
             eps: float = 1e-8) -> torch.Tensor:
    """IRRA's SDM: KL(softmax(sim / tau) || uniform over same-identity pairs), both directions."""
    sim = F.normalize(text_feats, dim=-1) @ F.normalize(image_feats, dim=-1).T
    same = _same_identity(pids).float()
    target = same / same.sum(dim=1, keepdim=True)
    total = sim.new_zeros(())
    for logits in (sim / tau, sim.T / tau):
        p = logits.softmax(dim=1)
        total = total + (p * (logits.log_softmax(dim=1) - torch.log(target + eps))).sum(dim=1).mean()
    return total


def tal_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, tau: float,
             margin: float) -> torch.Tensor:
    """RDE's TAL, both directions: hinge(margin + tau*logsumexp(negatives/tau) - weighted positives),
    the positives weighted by a (detached) softmax of their own scores at temperature tau."""
    sim = F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T
    same = _same_identity(pids)
    far = -1e4  # "excluded": finite, so that a row without negatives has zero loss and gradient
    total = sim.new_zeros(sim.shape[0])
    for s in (sim, sim.T):
        w = (s / tau).masked_fill(~same, far).softmax(dim=1).detach()
        pos = (w * s).sum(dim=1)
        neg = tau * torch.logsumexp((s / tau).masked_fill(same, far), dim=1)
        total = total + (neg - pos + margin).clamp(min=0)
    return total.mean()


def matching_loss(cfg: TrainConfig, image_feats, text_feats, pids) -> torch.Tensor:
    if cfg.loss == "tal":
        return tal_loss(image_feats, text_feats, pids, cfg.tau, cfg.margin)
    return sdm_loss(image_feats, text_feats, pids, cfg.tau)


# -- data --------------------------------------------------------------------------------------

@dataclass
class Example:
    image: int  # index into the split's gallery
    caption: str
    pid: int
    key: tuple[int, int]  # (record index in the annotation file, caption index): the RDA key


def split_examples(view) -> list[Example]:
    out = []
    for gi, rec in enumerate(view.records):
        for ci, cap in enumerate(rec.captions):
            out.append(Example(gi, cap, rec.pid, (rec.index, ci)))
    return out


class CaptionImageDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], paths: list[str], size: tuple[int, int], cached: list | None):
        self.examples, self.paths, self.size, self.cached = examples, paths, size, cached

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        from .core.retrievers.base import load_resized

        ex = self.examples[i]
        img = self.cached[ex.image] if self.cached is not None else load_resized(self.paths[ex.image], self.size)
        return {"image": img, "caption": ex.caption, "pid": ex.pid, "key": ex.key}


class Collator:
    """Stacks images (random flips), tokenizes captions and RDA texts with token noise."""

    def __init__(self, tokenizer, text_length: int, mean, std, cfg: TrainConfig, rda: dict | None, mask_id: int | None):
        self.tok, self.text_length, self.mean, self.std = tokenizer, text_length, mean, std
        self.cfg, self.rda, self.mask_id = cfg, rda, mask_id
        self.keep = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        self.vocab = len(tokenizer)
        self._rng: random.Random | None = None
        self._seed: int | None = None

    @property
    def rng(self) -> random.Random:
        # one stream per DataLoader worker (their torch seeds differ) and per epoch
        seed = torch.initial_seed()
        if self._rng is None or seed != self._seed:
            self._rng, self._seed = random.Random(seed ^ (self.cfg.seed * 7919)), seed
        return self._rng

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .rda_text import token_noise

        ids = self.tok(texts, truncation=True, max_length=self.text_length)["input_ids"]
        if self.cfg.token_noise > 0:
            ids = [token_noise(x, self.rng, self.cfg.token_noise, self.mask_id, self.vocab, self.keep) for x in ids]
        n = max(len(x) for x in ids)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        input_ids = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return input_ids, mask

    def _shift(self, a: np.ndarray, pad: int) -> np.ndarray:
        # zero-pad by `pad` on every side and crop the original size at a random offset
        h, w = a.shape[:2]
        padded = np.zeros((h + 2 * pad, w + 2 * pad, a.shape[2]), dtype=a.dtype)
        padded[pad:pad + h, pad:pad + w] = a
        y, x = self.rng.randint(0, 2 * pad), self.rng.randint(0, 2 * pad)
        return padded[y:y + h, x:x + w]

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        from .rda_text import recombine
        from .core.retrievers.base import to_pixel_values

        arrays = []
        for b in batch:
            a = b["image"]
            if self.cfg.flip and self.rng.random() < 0.5:
                a = a[:, ::-1]
            if self.cfg.pad_crop > 0:
                a = self._shift(a, self.cfg.pad_crop)
            arrays.append(np.ascontiguousarray(a))
        out = {"pixel_values": to_pixel_values(arrays, self.mean, self.std), "pids": torch.tensor([b["pid"] for b in batch])}
        out["input_ids"], out["attention_mask"] = self._encode([b["caption"] for b in batch])
        if self.rda is not None:
            texts = []
            for b in batch:
                e = self.rda.get(tuple(b["key"]))
                t = recombine(e.groups, self.rng) if e is not None else ""
                texts.append(t or b["caption"])
            out["rda_input_ids"], out["rda_attention_mask"] = self._encode(texts)
        return out


class DualEncoder(nn.Module):
    """The trainable module (what DDP wraps): image and text(s) -> raw projected features."""

    def __init__(self, clip_model, eos_id: int):
        super().__init__()
        self.clip = clip_model
        self.eos_id = eos_id

    def forward(self, pixel_values, input_ids, attention_mask, rda_input_ids=None, rda_attention_mask=None):
        from .core.retrievers.clip import image_embeds, text_embeds

        img = image_embeds(self.clip, pixel_values)
        txt = text_embeds(self.clip, input_ids, attention_mask, self.eos_id)
        rda = text_embeds(self.clip, rda_input_ids, rda_attention_mask, self.eos_id) if rda_input_ids is not None else None
        return img, txt, rda


# -- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(retriever, view, cfg: TrainConfig, cached: list | None = None) -> dict[str, float]:
    """rank metrics of ``retriever`` on a split (images from the in-memory cache when given)."""
    from mllm_tune.core.metrics import rank_metrics

    from .core.retrievers.base import to_pixel_values

    was_training = retriever.model.training
    retriever.model.eval()
    try:
        if cached is not None:
            feats = [retriever.encode_pixels(to_pixel_values(cached[s:s + cfg.eval_batch_size], retriever.mean, retriever.std))
                     for s in range(0, len(cached), cfg.eval_batch_size)]
            img = torch.cat(feats)
        else:
            img = retriever.encode_images(view.gallery_paths, batch_size=cfg.eval_batch_size, progress=False)
        txt = retriever.encode_texts(view.query_texts, batch_size=cfg.eval_batch_size, progress=False)
        return rank_metrics(txt @ img.T, view.query_pids, view.gallery_pids)
    finally:
        retriever.model.train(was_training)


def _preload(paths: list[str], size: tuple[int, int], progress: bool, desc: str) -> list[np.ndarray]:
    from tqdm import tqdm

    from .core.retrievers.base import load_resized

    return [load_resized(p, size) for p in tqdm(paths, desc=desc, unit="img", disable=not progress)]


def _want_cache(cfg: TrainConfig, n_images: int, size: tuple[int, int]) -> bool:
    if cfg.cache_images in ("yes", "true", True):
        return True
    if cfg.cache_images in ("no", "false", False):
        return False
    return n_images * size[0] * size[1] * 3 <= 2 * 1024 ** 3  # auto: up to 2 GiB of uint8 pixels


# -- the run -----------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one fine-tuning (see the module docstring); returns the results dict."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)  # --threads must not outlive the run (in-process callers, tests)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from mllm_tune.core.pedes import PedesFormatError, load_pedes

    from .rda_text import RDAFormatError, rda_gamma, read_rda_file
    from .core.retrievers import CLIPRetriever, load_retriever
    from .core.retrievers.clip import add_mask_token

    _validate(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    # cpu=True on CPU-only machines is what makes torchrun / accelerate start a real multi-process (gloo) run
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    # the data first: a wrong --dataset-root should not wait for a model to load
    try:
        data = load_pedes(cfg.dataset_root, cfg.dataset)
    except (FileNotFoundError, PedesFormatError) as exc:
        fix = "" if "pass " in str(exc) else (f"; pass --dataset-root, the folder that holds the {cfg.dataset} "
                                              "annotation file and its images")
        raise RetrieverTrainError(f"--dataset-root {cfg.dataset_root}: {exc}{fix}") from None
    retriever = _load_model(cfg, acc.device)
    if not isinstance(retriever, CLIPRetriever):
        raise RetrieverTrainError(f"--model {cfg.model}: only CLIP retrievers (CLIP folders, irra:) can be fine-tuned here")
    train_view = data.split(cfg.train_split)
    val_view = data.split(cfg.val_split) if cfg.val_split else None
    test_view = data.split(cfg.test_split) if cfg.test_split else None
    examples = split_examples(train_view)
    try:
        rda = read_rda_file(cfg.rda_file) if cfg.rda_file else None
    except (FileNotFoundError, RDAFormatError) as exc:
        raise RetrieverTrainError(f"--rda-file: {exc}") from None
    if rda is not None:
        covered = sum(ex.key in rda for ex in examples)
        logger.info("RDA text for %d of %d training captions", covered, len(examples))
        if covered == 0:
            raise RetrieverTrainError(f"{cfg.rda_file}: none of its (record_index, caption_index) keys is a caption of the "
                             f"'{cfg.train_split}' split of {cfg.dataset_root}; was it written for this dataset?")

    size = retriever.image_size
    cache = _want_cache(cfg, len(train_view.gallery_paths), size)
    show = cfg.progress and acc.is_local_main_process
    train_imgs = _preload(train_view.gallery_paths, size, show, "train images") if cache else None
    val_imgs = _preload(val_view.gallery_paths, size, show, "val images") if cache and val_view else None
    test_imgs = _preload(test_view.gallery_paths, size, show, "test images") if cache and test_view else None

    model = retriever.model
    mask_id = add_mask_token(model, retriever.tokenizer) if cfg.token_noise > 0 else None
    retriever.invalidate_identity()
    model.logit_scale.requires_grad_(False)  # the losses use the fixed tau
    module = DualEncoder(model, retriever.eos_id)
    collate = Collator(retriever.tokenizer, retriever.text_length, retriever.mean, retriever.std, cfg, rda, mask_id)
    ds = CaptionImageDataset(examples, train_view.gallery_paths, size, train_imgs)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                                         num_workers=cfg.num_workers, collate_fn=collate)
    decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, math.ceil(len(loader) / max(1, acc.num_processes)))
    # accelerate steps a prepared scheduler once per process for every optimizer step, so the
    # schedule is laid out in single-process steps
    total = max(1, len(loader)) * cfg.epochs
    warmup = min(int(cfg.warmup_epochs * max(1, len(loader))), max(0, total - 1))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    module, optimizer, loader, scheduler = acc.prepare(module, optimizer, loader, scheduler)
    retriever.device = acc.device

    result: dict[str, Any] = {"config": dataclasses.asdict(cfg), "world_size": acc.num_processes,
                              "train_captions": len(examples), "train_images": len(train_view.gallery_paths),
                              "steps_per_epoch": steps_per_epoch, "history": []}
    if acc.is_main_process:
        if val_view is not None:
            result["val_before"] = evaluate(retriever, val_view, cfg, val_imgs)
        if test_view is not None:
            result["test_before"] = evaluate(retriever, test_view, cfg, test_imgs)
    best_r1, best_epoch = -1.0, 0
    for epoch in range(1, cfg.epochs + 1):
        module.train()
        gamma = rda_gamma(epoch, cfg.rda_gamma) if rda is not None else 0.0
        t0, sums, n = time.time(), {"loss": 0.0, "match": 0.0, "rda": 0.0}, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", disable=not show, leave=False)
        for batch in bar:
            img, txt, rda_txt = module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                       batch.get("rda_input_ids"), batch.get("rda_attention_mask"))
            pids = batch["pids"]
            if acc.num_processes > 1:
                # contrast against the whole global batch, as IRRA/RDE do on several GPUs
                img, txt, pids = _gather_with_grad(acc, img), _gather_with_grad(acc, txt), acc.gather(pids)
                rda_txt = _gather_with_grad(acc, rda_txt) if rda_txt is not None else None
            l_match = matching_loss(cfg, img.float(), txt.float(), pids)
            l_rda = matching_loss(cfg, img.float(), rda_txt.float(), pids) if rda_txt is not None else l_match.new_zeros(())
            loss = l_match + gamma * l_rda
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            sums["loss"] += float(loss.detach())
            sums["match"] += float(l_match.detach())
            sums["rda"] += float(l_rda.detach())
            n += 1
            bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
        rec: dict[str, Any] = {"epoch": epoch, "loss": sums["loss"] / max(n, 1), "loss_match": sums["match"] / max(n, 1),
                               "loss_rda": sums["rda"] / max(n, 1), "gamma": gamma,
                               "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 2)}
        acc.wait_for_everyone()
        if acc.is_main_process:
            if val_view is not None:
                rec["val"] = evaluate(retriever, val_view, cfg, val_imgs)
            r1 = rec.get("val", {}).get("R1", -1.0)
            improved = cfg.save == "best" and val_view is not None and r1 > best_r1
            if improved or cfg.save == "last" or val_view is None:
                best_r1, best_epoch = max(best_r1, r1), epoch
                retriever.invalidate_identity()
                retriever.save_pretrained(out_dir, extra={"trained_by": "mllm_tune.retriever_train", "epoch": epoch,
                                                          "val": rec.get("val")})
            logger.info("epoch %d: loss %.4f (match %.4f, rda %.4f, gamma %.2f)%s", epoch, rec["loss"],
                        rec["loss_match"], rec["loss_rda"], gamma,
                        f", val R1 {r1:.2f} mAP {rec['val']['mAP']:.2f}" if "val" in rec else "")
        result["history"].append(rec)
        acc.wait_for_everyone()

    result["best_epoch"] = best_epoch
    result["output_dir"] = str(out_dir)
    if acc.is_main_process:
        saved = load_retriever(str(out_dir), device=acc.device)
        result["identity"] = saved.identity
        if test_view is not None:
            result["test_after"] = evaluate(saved, test_view, cfg, test_imgs)
        (out_dir / "train_results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        table = results_table(result)
        (out_dir / "train_results.md").write_text(table + "\n", encoding="utf-8")
        logger.info("\n%s", table)
    acc.wait_for_everyone()
    acc.end_training()
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def _load_model(cfg: TrainConfig, device):
    """load_retriever, with a truncated or missing weight file named in the error."""
    from .core.modeling import broken_weights
    from .core.retrievers import RetrieverLoadError, load_retriever

    spec = str(cfg.model)
    folder = (spec.split(":", 1)[-1] if spec.startswith(("irra:", "rde:")) else spec).split("?", 1)[0]
    try:
        return load_retriever(cfg.model, device=device, image_size=cfg.image_size, text_length=cfg.text_length)
    except RetrieverLoadError as exc:
        broken = broken_weights(folder)  # name the exact file when one is cut
        raise RetrieverTrainError(f"--model: {exc}" + (f" ({broken})" if broken else "")) from None
    except Exception:  # noqa: BLE001 - re-raised unless a cut weight file explains it
        broken = broken_weights(folder)
        if broken:
            raise RetrieverTrainError(f"--model {cfg.model}: {broken}; copy or download the model again") from None
        raise


def _gather_with_grad(acc, x: torch.Tensor) -> torch.Tensor:
    """All processes' rows, keeping the gradient of this process's own rows."""
    parts = [torch.zeros_like(x) for _ in range(acc.num_processes)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[acc.process_index] = x
    return torch.cat(parts)


def results_table(result: dict[str, Any]) -> str:
    keys = ("R1", "R5", "R10", "mAP", "mINP")
    lines = ["| epoch | loss | match | rda | gamma | " + " | ".join(f"val {k}" for k in keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    if "val_before" in result:
        lines.append("| 0 | | | | | " + " | ".join(f"{result['val_before'][k]:.2f}" for k in keys) + " |")
    for r in result["history"]:
        val = r.get("val")
        cells = " | ".join(f"{val[k]:.2f}" for k in keys) if val else " | ".join("" for _ in keys)
        lines.append(f"| {r['epoch']} | {r['loss']:.4f} | {r['loss_match']:.4f} | {r['loss_rda']:.4f} | {r['gamma']:.2f} | {cells} |")
    for name in ("test_before", "test_after"):
        if name in result:
            lines.append(f"\n{name.replace('_', ' ')}: " + ", ".join(f"{k} {result[name][k]:.2f}" for k in keys))
    lines.append(f"\nbest epoch {result.get('best_epoch')} saved to {result.get('output_dir')}")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------

def _validate(cfg: TrainConfig) -> None:
    for name in ("model", "dataset_root", "output_dir"):
        if not getattr(cfg, name):
            raise RetrieverTrainError(f"--{name.replace('_', '-')} is required (on the command line or in the --config file)")
    if cfg.loss not in ("tal", "sdm"):
        raise RetrieverTrainError(f"--loss must be 'tal' or 'sdm', got {cfg.loss!r}")
    if cfg.save not in ("best", "last"):
        raise RetrieverTrainError(f"--save must be 'best' or 'last', got {cfg.save!r}")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise RetrieverTrainError("--epochs must be >= 1 and --batch-size >= 2 (the losses contrast pairs within a batch)")
    if not 0 <= cfg.token_noise < 1:
        raise RetrieverTrainError(f"--token-noise must be in [0, 1), got {cfg.token_noise}")
    if cfg.tau <= 0:
        raise RetrieverTrainError("--tau must be positive")
    if isinstance(cfg.val_split, str) and cfg.val_split.lower() in ("none", ""):
        cfg.val_split = None
    if isinstance(cfg.test_split, str) and cfg.test_split.lower() in ("none", ""):
        cfg.test_split = None


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _typed(ann: str):
    """argparse type for a TrainConfig annotation; optional fields also take none/null."""
    base = int if ann.startswith("int") else float if ann.startswith("float") else _bool if ann == "bool" else str
    if "None" not in ann:
        return base

    def conv(v: str):
        return None if v.lower() in ("none", "null", "") else base(v)

    return conv


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mllm_tune.retriever_train",
                                 description="Fine-tune a CLIP retriever on a PEDES split (SDM/TAL, optional RDA text).")
    ap.add_argument("config_file", nargs="?", help="a YAML recipe (same as --config)")
    ap.add_argument("--config", dest="config_opt", help="a YAML recipe whose keys are the options below")
    for f in dataclasses.fields(TrainConfig):
        # SUPPRESS: only options given on the command line reach the namespace (they override the recipe)
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_typed(str(f.type)),
                        default=argparse.SUPPRESS, help=f"default: {f.default!r}")
    return ap


def config_from_args(argv: Sequence[str] | None) -> TrainConfig:
    import yaml

    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    cfg_path = args.pop("config_opt", None) or args.pop("config_file", None)
    args.pop("config_file", None)
    if cfg_path:
        p = Path(cfg_path)
        if not p.is_file():
            raise RetrieverTrainError(f"config file {p} does not exist; pass a YAML recipe such as "
                                      "recipes/retriever_clip.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RetrieverTrainError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise RetrieverTrainError(f"{p}: expected a mapping of option: value")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for k, v in raw.items():
            key = k.replace("-", "_")
            if key not in known:
                raise RetrieverTrainError(f"{p}: unknown option '{k}' (known: {', '.join(sorted(known))})")
            values[key] = v
    values.update(args)
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (a YAML recipe and/or options), train, and return the results dict."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(argv)
    return train(cfg)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: bad input is one `error: ...` line on stderr and exit code 2, no traceback."""
    import sys

    try:
        main(argv)
    except RetrieverTrainError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, even for multi-line causes
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
