"""Fine-tune a CLIP or RDE retriever on a PEDES training split, optionally with RDA text (SPEC §6, §8).

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

RDE (``--arch rde``, ``recipes/retriever_rde.yaml``; automatic for ``rde:`` checkpoints and RDE
folders): BGE (the CLS / end-of-text features) plus the TSE heads (fresh ones on a CLIP folder),
TAL per pair on each head, summed and weighted by the clean mask (``rde_objectives.rde_loss``).
The mask is recomputed before every epoch (after ``--clean-warmup-epochs``): per-pair TAL of every
training pair under each head, model in eval mode, batches shuffled, no augmentation; then
``rde_objectives.consensus``. The RDA term is gamma * (TAL_bge + TAL_tse) on the RDA text, under
the same mask. ``--noise-rate`` / ``--noise-file`` move captions to other pairs' images (RDE's
protocol, ``rde_objectives.inject_noise``; the index is saved as ``OUT/noise_index.npy``) and the
log gives the clean set's precision / recall against it. The saved epoch is also written as
``OUT/best.pth`` (+ ``configs.yaml``) in the released key layout (``rde_checkpoint``) and its clean
set as ``OUT/clean.json`` (``rde_objectives.read_clean_set``).

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


STATE_DIR, STATE_FILE = "last_state", "trainer_state.json"  # what --resume reads


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
    optimizer: str = "adamw"  # adamw | adam (RDE: Adam with L2 weight decay, eps 1e-3)
    adam_eps: float = 1e-8
    bias_lr_factor: float = 1.0  # RDE: 2 (biases also get no weight decay)
    # -- RDE (arch rde): BGE + TSE heads, consensus clean-pair selection ---------------------------
    arch: str = "auto"  # auto (rde for rde:/RDE folders) | clip | rde (adds fresh TSE heads to a CLIP)
    tse_lr: float = 1e-3
    tse_dim: int = 1024
    select_ratio: float = 0.3
    tse_bn: str = "train"  # train | eval (released: the heads' BatchNorm stays in eval mode while training)
    text_pos_resize: str = "interpolate"  # interpolate | random (released: a longer text table is left random)
    consensus: str = "coin"  # coin (released: disagreements by a fair coin) | noisy (drop them) | off (all clean)
    clean_warmup_epochs: int = 0  # epochs trained on every pair before the selection starts (released: 0)
    noise_rate: float = 0.0  # noisy correspondence: this share of captions moved to other pairs' images
    noise_file: str | None = None  # an RDE noise-index .npy (caption index of every pair) instead
    save_pth: bool = True  # arch rde: also write OUT/best.pth in the released key layout
    keep_state: bool = True  # write OUT/last_state/ (model, optimizer, scheduler, RNG, history) after every epoch
    resume: bool = False  # continue from OUT/last_state/ after its epoch


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
    """RDE's TAL on the CLIP features, both directions, averaged over the batch (the CLIP path;
    RDE itself sums per-sample losses weighted by its clean mask, ``rde_objectives.rde_loss``)."""
    from .rde_objectives import tal_per_sample

    sim = F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T
    return tal_per_sample(sim, pids, tau, margin).mean()


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
    index: int = 0  # the pair's position in the training split (indexes the clean mask)


def split_examples(view) -> list[Example]:
    out = []
    for gi, rec in enumerate(view.records):
        for ci, cap in enumerate(rec.captions):
            out.append(Example(gi, cap, rec.pid, (rec.index, ci), len(out)))
    return out


def apply_noise(examples: list[Example], caption_of_pair: np.ndarray) -> list[Example]:
    """RDE's noisy correspondence: pair i keeps its image and identity but takes the caption (and
    the RDA key, which follows the text) of pair ``caption_of_pair[i]``."""
    return [Example(ex.image, examples[j].caption, ex.pid, examples[j].key, ex.index)
            for ex, j in zip(examples, caption_of_pair.tolist())]


class CaptionImageDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], paths: list[str], size: tuple[int, int], cached: list | None,
                 resample: str = "bicubic"):
        self.examples, self.paths, self.size, self.cached = examples, paths, size, cached
        self.resample = resample  # the retriever's own filter (bilinear for irra:/rde:, as released)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        from .core.retrievers.base import load_resized

        ex = self.examples[i]
        img = self.cached[ex.image] if self.cached is not None else load_resized(self.paths[ex.image], self.size, self.resample)
        return {"image": img, "caption": ex.caption, "pid": ex.pid, "key": ex.key, "index": ex.index}


class Collator:
    """Stacks images (random flips), tokenizes captions and RDA texts with token noise."""

    def __init__(self, tokenizer, text_length: int, mean, std, cfg: TrainConfig, rda: dict | None, mask_id: int | None,
                 pad_to_max: bool = False, augment: bool = True):
        self.tok, self.text_length, self.mean, self.std = tokenizer, text_length, mean, std
        self.cfg, self.rda, self.mask_id = cfg, rda, mask_id
        self.pad_to_max = pad_to_max  # RDE pads every text to the text length (its TSE k depends on it)
        self.augment = augment  # flips, shifts and token noise (off for the clean-selection pass)
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
        if self.cfg.token_noise > 0 and self.augment:
            ids = [token_noise(x, self.rng, self.cfg.token_noise, self.mask_id, self.vocab, self.keep) for x in ids]
        n = self.text_length if self.pad_to_max else max(len(x) for x in ids)
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
            if self.augment and self.cfg.flip and self.rng.random() < 0.5:
                a = a[:, ::-1]
            if self.augment and self.cfg.pad_crop > 0:
                a = self._shift(a, self.cfg.pad_crop)
            arrays.append(np.ascontiguousarray(a))
        out = {"pixel_values": to_pixel_values(arrays, self.mean, self.std), "pids": torch.tensor([b["pid"] for b in batch]),
               "index": torch.tensor([b["index"] for b in batch])}
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


class RDEEncoder(nn.Module):
    """RDE's trainable module: CLIP backbone + TSE heads -> raw BGE and TSE features of images and
    texts (and of the RDA texts when given), as a dict of tensors."""

    def __init__(self, clip_model, image_head, text_head, eos_id: int, tse_bn: str = "train"):
        super().__init__()
        self.clip, self.image_head, self.text_head = clip_model, image_head, text_head
        self.eos_id, self.tse_bn = eos_id, tse_bn
        # kept only so released state dicts load whole; frozen so that DDP finds no unused parameter
        unused = [image_head.linear, image_head.mlp.bns[1], text_head.mlp.bns[1]]
        for m in unused:
            m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.tse_bn == "eval":  # the released behaviour: running statistics frozen
            for head in (self.image_head, self.text_head):
                for m in head.modules():
                    if isinstance(m, nn.BatchNorm1d):
                        m.eval()
        return self

    def _text(self, ids, mask):
        from .core.retrievers.clip import text_embeds

        bge, tokens, attn, pos = text_embeds(self.clip, ids, mask, self.eos_id, output_attentions=True)
        return bge, self.text_head.forward_text(tokens, attn.mean(dim=1), mask, pos)

    def forward(self, pixel_values, input_ids, attention_mask, rda_input_ids=None, rda_attention_mask=None):
        from .core.retrievers.clip import image_tokens

        tokens, attn = image_tokens(self.clip, pixel_values, output_attentions=True)
        out = {"img_bge": tokens[:, 0], "img_tse": self.image_head.forward_image(tokens, attn.mean(dim=1))}
        out["txt_bge"], out["txt_tse"] = self._text(input_ids, attention_mask)
        if rda_input_ids is not None:
            out["rda_bge"], out["rda_tse"] = self._text(rda_input_ids, rda_attention_mask)
        return out


def rde_similarities(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """images x texts cosine matrices per head (and per head on the RDA text)."""
    n = {k: F.normalize(v.float(), dim=-1) for k, v in feats.items()}
    sims = {"bge": n["img_bge"] @ n["txt_bge"].T, "tse": n["img_tse"] @ n["txt_tse"].T}
    if "rda_bge" in n:
        sims["rda_bge"], sims["rda_tse"] = n["img_bge"] @ n["rda_bge"].T, n["img_tse"] @ n["rda_tse"].T
    return sims


@torch.no_grad()
def per_pair_losses(acc, module, loader, num_pairs: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """TAL of every training pair under each head, the model in eval mode, within the batches of
    ``loader`` (shuffled like training, no augmentation): RDE's input to the consensus."""
    from .rde_objectives import tal_per_sample

    was = module.training
    module.eval()
    loss = torch.zeros(2, num_pairs)
    try:
        for batch in loader:
            feats = module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            sims = rde_similarities(feats)
            pids = batch["pids"]
            la = tal_per_sample(sims["bge"], pids, cfg.tau, cfg.margin)
            lb = tal_per_sample(sims["tse"], pids, cfg.tau, cfg.margin)
            rows = torch.stack([batch["index"].float(), la, lb], dim=1)
            if acc.num_processes > 1:
                rows = acc.gather(rows.contiguous())
            rows = rows.cpu()
            idx = rows[:, 0].long()
            loss[0, idx], loss[1, idx] = rows[:, 1], rows[:, 2]
    finally:
        module.train(was)
    return loss[0], loss[1]


def _gmm_options(cfg: TrainConfig) -> dict[str, float]:
    # the release fits longer and tighter above 40% noise
    return {"iters": 100, "tol": 1e-4, "reg": 1e-6} if cfg.noise_rate > 0.4 else {}


# -- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(retriever, view, cfg: TrainConfig, cached: list | None = None) -> dict[str, float]:
    """rank metrics of ``retriever`` on a split (images from the in-memory cache when given)."""
    from mllm_tune.core.metrics import rank_metrics

    from .core.retrievers.base import to_pixel_values

    modules = _modules(retriever)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
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
        for m, w in zip(modules, was_training):
            m.train(w)


def _modules(retriever) -> list[nn.Module]:
    if hasattr(retriever, "image_head"):  # RDE
        return [retriever.clip.model, retriever.image_head, retriever.text_head]
    return [retriever.model]


def _preload(paths: list[str], size: tuple[int, int], progress: bool, desc: str,
             resample: str = "bicubic") -> list[np.ndarray]:
    from tqdm import tqdm

    from .core.retrievers.base import load_resized

    return [load_resized(p, size, resample) for p in tqdm(paths, desc=desc, unit="img", disable=not progress)]


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
    from .rde_objectives import CLEAN_FILE, clean_set_quality, consensus, inject_noise, rde_loss, write_clean_set
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
    train_view = data.split(cfg.train_split)
    val_view = data.split(cfg.val_split) if cfg.val_split else None
    test_view = data.split(cfg.test_split) if cfg.test_split else None
    examples = split_examples(train_view)
    caption_of_pair = np.arange(len(examples))
    if cfg.noise_rate > 0 or cfg.noise_file:
        try:
            caption_of_pair = inject_noise(len(examples), cfg.noise_rate, cfg.seed, cfg.noise_file)
        except (ValueError, OSError) as exc:
            raise RetrieverTrainError(f"--noise-rate/--noise-file: {exc}") from None
        examples = apply_noise(examples, caption_of_pair)
    truly_clean = caption_of_pair == np.arange(len(examples))  # RDE's real_correspondences
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

    retriever = _load_model(cfg, acc.device)
    is_rde = _is_rde(cfg, retriever)
    if not isinstance(retriever, CLIPRetriever) and not is_rde:
        raise RetrieverTrainError(f"--model {cfg.model}: only CLIP (CLIP folders, irra:) and RDE (rde:, RDE folders) "
                                  "retrievers can be trained here")
    if is_rde and isinstance(retriever, CLIPRetriever):
        retriever = _fresh_rde(cfg, retriever)
    clip = retriever.clip if is_rde else retriever

    size = retriever.image_size
    resample = clip.resample  # train on the images the retriever will see at test time
    cache = _want_cache(cfg, len(train_view.gallery_paths), size)
    show = cfg.progress and acc.is_local_main_process
    train_imgs = _preload(train_view.gallery_paths, size, show, "train images", resample) if cache else None
    val_imgs = _preload(val_view.gallery_paths, size, show, "val images", resample) if cache and val_view else None
    test_imgs = _preload(test_view.gallery_paths, size, show, "test images", resample) if cache and test_view else None

    model = clip.model
    mask_id = add_mask_token(model, clip.tokenizer) if cfg.token_noise > 0 else None
    clip.invalidate_identity()
    model.logit_scale.requires_grad_(False)  # the losses use the fixed tau
    if is_rde:
        retriever._identity = None
        module = RDEEncoder(model, retriever.image_head, retriever.text_head, clip.eos_id, cfg.tse_bn)
    else:
        module = DualEncoder(model, clip.eos_id)
    collate = Collator(clip.tokenizer, clip.text_length, clip.mean, clip.std, cfg, rda, mask_id, pad_to_max=is_rde)
    ds = CaptionImageDataset(examples, train_view.gallery_paths, size, train_imgs, resample)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                                         num_workers=cfg.num_workers, collate_fn=collate)
    optimizer = _optimizer(cfg, module, is_rde)
    steps_per_epoch = max(1, math.ceil(len(loader) / max(1, acc.num_processes)))
    # accelerate steps a prepared scheduler once per process for every optimizer step, so the
    # schedule is laid out in single-process steps
    total = max(1, len(loader)) * cfg.epochs
    warmup = min(int(cfg.warmup_epochs * max(1, len(loader))), max(0, total - 1))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    module, optimizer, loader, scheduler = acc.prepare(module, optimizer, loader, scheduler)
    select_loader = None
    if is_rde and cfg.consensus != "off":
        # the clean-selection pass: every pair once, batches shuffled like training, no augmentation
        plain = Collator(clip.tokenizer, clip.text_length, clip.mean, clip.std, cfg, None, mask_id, pad_to_max=True,
                         augment=False)
        select_loader = acc.prepare_data_loader(torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=plain, num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed)))
    retriever.device = acc.device
    clip.device = acc.device

    result: dict[str, Any] = {"config": dataclasses.asdict(cfg), "world_size": acc.num_processes,
                              "arch": "rde" if is_rde else "clip",
                              "train_captions": len(examples), "train_images": len(train_view.gallery_paths),
                              "steps_per_epoch": steps_per_epoch, "history": []}
    if not truly_clean.all():
        result["noise"] = {"rate": float(1 - truly_clean.mean()), "file": cfg.noise_file, "seed": cfg.seed}
        if acc.is_main_process:
            np.save(out_dir / "noise_index.npy", caption_of_pair)  # RDE's noise-index format, for a rerun
    best_r1, best_epoch, start = -1.0, 0, 1
    clean = torch.ones(len(examples), dtype=torch.bool)
    state_dir = out_dir / STATE_DIR
    if cfg.resume:
        if not (state_dir / STATE_FILE).is_file():
            raise RetrieverTrainError(f"--resume: {state_dir / STATE_FILE} does not exist; run without --resume first "
                                      "(with --keep-state true, the default)")
        acc.load_state(str(state_dir))
        saved = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
        start, best_r1, best_epoch = saved["epoch"] + 1, saved["best_r1"], saved["best_epoch"]
        result["history"] = saved["history"]
        result.update({k: saved[k] for k in ("val_before", "test_before") if k in saved})
        clean = torch.tensor(saved["clean"], dtype=torch.bool)
        logger.info("resumed after epoch %d of %s (best epoch so far %d)", saved["epoch"], state_dir, best_epoch)
    elif acc.is_main_process:
        if val_view is not None:
            result["val_before"] = evaluate(retriever, val_view, cfg, val_imgs)
        if test_view is not None:
            result["test_before"] = evaluate(retriever, test_view, cfg, test_imgs)
    for epoch in range(start, cfg.epochs + 1):
        gamma = rda_gamma(epoch, cfg.rda_gamma) if rda is not None else 0.0
        rec: dict[str, Any] = {"epoch": epoch}
        t0 = time.time()
        if select_loader is not None and epoch > cfg.clean_warmup_epochs:
            loss_bge, loss_tse = per_pair_losses(acc, module, select_loader, len(examples), cfg)
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # the same coin on every process
            cons = consensus(loss_bge, loss_tse, cfg.consensus, generator=gen, **_gmm_options(cfg))
            clean = cons.clean
            rec["clean"] = cons.fractions()
            if not truly_clean.all():
                rec["clean_quality"] = clean_set_quality(clean.numpy(), truly_clean)
                rec["agreed_quality"] = clean_set_quality((cons.clean_bge & cons.clean_tse).numpy(), truly_clean)
            logger.info("epoch %d: clean pairs %.3f by BGE, %.3f by TSE, %.3f agreed, %.3f used%s", epoch,
                        rec["clean"]["bge"], rec["clean"]["tse"], rec["clean"]["agreed"], rec["clean"]["used"],
                        ("; vs the injected noise: used precision %.3f recall %.3f, agreed precision %.3f recall %.3f" % (
                            rec["clean_quality"]["precision"], rec["clean_quality"]["recall"],
                            rec["agreed_quality"]["precision"], rec["agreed_quality"]["recall"])
                         if "clean_quality" in rec else ""))
        clean_dev = clean.to(acc.device)
        module.train()
        sums, n = {"loss": 0.0, "match": 0.0, "rda": 0.0}, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", disable=not show, leave=False)
        for batch in bar:
            out = module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                         batch.get("rda_input_ids"), batch.get("rda_attention_mask"))
            pids, index = batch["pids"], batch["index"]
            if is_rde:
                if acc.num_processes > 1:
                    out = {k: _gather_with_grad(acc, v) for k, v in out.items()}
                    pids, index = acc.gather(pids), acc.gather(index)
                parts = rde_loss(rde_similarities(out), pids, clean_dev[index], gamma, cfg.tau, cfg.margin)
                loss, l_match, l_rda = parts["loss"], parts["match"], parts["rda"]
            else:
                img, txt, rda_txt = out
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
        rec.update({"loss": sums["loss"] / max(n, 1), "loss_match": sums["match"] / max(n, 1),
                    "loss_rda": sums["rda"] / max(n, 1), "gamma": gamma,
                    "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 2)})
        acc.wait_for_everyone()
        if acc.is_main_process:
            if val_view is not None:
                rec["val"] = evaluate(retriever, val_view, cfg, val_imgs)
            r1 = rec.get("val", {}).get("R1", -1.0)
            improved = cfg.save == "best" and val_view is not None and r1 > best_r1
            if improved or cfg.save == "last" or val_view is None:
                best_r1, best_epoch = max(best_r1, r1), epoch
                extra = {"trained_by": "mllm_tune.retriever_train", "epoch": epoch, "val": rec.get("val")}
                _save(retriever, out_dir, extra, is_rde, cfg)
                if is_rde:
                    info = {"epoch": epoch, "disagreement": cfg.consensus, "fractions": rec.get("clean"),
                            "quality": rec.get("clean_quality"), "split": cfg.train_split, "dataset": cfg.dataset}
                    write_clean_set(out_dir / CLEAN_FILE, clean.numpy(), caption_of_pair, **info)
            logger.info("epoch %d: loss %.4f (match %.4f, rda %.4f, gamma %.2f)%s", epoch, rec["loss"],
                        rec["loss_match"], rec["loss_rda"], gamma,
                        f", val R1 {r1:.2f} mAP {rec['val']['mAP']:.2f}" if "val" in rec else "")
        result["history"].append(rec)
        acc.wait_for_everyone()
        if cfg.keep_state:
            acc.save_state(str(state_dir))
            if acc.is_main_process:
                blob = {"epoch": epoch, "best_r1": best_r1, "best_epoch": best_epoch, "history": result["history"],
                        "clean": clean.tolist(), **{k: result[k] for k in ("val_before", "test_before") if k in result}}
                (state_dir / STATE_FILE).write_text(json.dumps(blob), encoding="utf-8")
            acc.wait_for_everyone()

    result["best_epoch"] = best_epoch
    result["output_dir"] = str(out_dir)
    if acc.is_main_process:
        saved = load_retriever(str(out_dir), device=acc.device)
        result["identity"] = saved.identity
        if is_rde and cfg.save_pth:
            result["pth"] = str(out_dir / "best.pth")
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


def _is_rde(cfg: TrainConfig, retriever) -> bool:
    if cfg.arch == "auto":
        return hasattr(retriever, "image_head")
    if cfg.arch == "clip" and hasattr(retriever, "image_head"):
        raise RetrieverTrainError(f"--model {cfg.model} is an RDE retriever: train it with --arch rde (or auto)")
    return cfg.arch == "rde"


def _fresh_rde(cfg: TrainConfig, clip):
    """A CLIP retriever with new (randomly initialised) TSE heads: RDE's starting point."""
    from .core.retrievers.rde import RDERetriever, TSEHead

    d_in = int(clip.model.config.projection_dim)
    torch.manual_seed(cfg.seed)
    heads = [TSEHead(m, d_in, cfg.tse_dim, cfg.select_ratio) for m in ("image", "text")]
    return RDERetriever(clip, heads[0], heads[1])


def _optimizer(cfg: TrainConfig, module: nn.Module, is_rde: bool) -> torch.optim.Optimizer:
    """CLIP: AdamW, no decay on 1-d parameters. RDE (as released): one group per rule, biases at
    ``bias_lr_factor`` x lr without weight decay, the TSE heads at ``tse_lr`` (biases included)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if is_rde:
            lr, wd = cfg.lr, cfg.weight_decay
            if name.endswith("bias"):
                lr, wd = cfg.lr * cfg.bias_lr_factor, 0.0
            if name.startswith(("image_head.", "text_head.")):
                lr = cfg.tse_lr
        else:
            lr, wd = cfg.lr * (cfg.bias_lr_factor if name.endswith("bias") else 1.0), (
                cfg.weight_decay if p.dim() >= 2 else 0.0)
        groups.setdefault((lr, wd), []).append(p)
    params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps)


def _save(retriever, out_dir: Path, extra: dict[str, Any], is_rde: bool, cfg: TrainConfig) -> None:
    if not is_rde:
        retriever.invalidate_identity()
        retriever.save_pretrained(out_dir, extra=extra)
        return
    from .core.retrievers.clip import RETRIEVER_FILE
    from .rde_checkpoint import save_released_pth

    retriever.clip.invalidate_identity()
    retriever._identity = None
    retriever.save_pretrained(out_dir)
    meta_file = out_dir / RETRIEVER_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta.update(extra)
    meta_file.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if cfg.save_pth:
        save_released_pth(retriever, out_dir / "best.pth", {"epoch": int(extra["epoch"])})


def _load_model(cfg: TrainConfig, device):
    """load_retriever, with a truncated or missing weight file named in the error."""
    from .core.modeling import broken_weights
    from .core.retrievers import RetrieverLoadError, load_retriever

    spec = str(cfg.model)
    folder = (spec.split(":", 1)[-1] if spec.startswith(("irra:", "rde:")) else spec).split("?", 1)[0]
    try:
        retriever = load_retriever(cfg.model, device=device, image_size=cfg.image_size, text_length=cfg.text_length)
        if cfg.text_pos_resize == "random":
            _released_text_positions(retriever, _source_text_positions(spec, folder))
        return retriever
    except RetrieverLoadError as exc:
        broken = broken_weights(folder)  # name the exact file when one is cut
        raise RetrieverTrainError(f"--model: {exc}" + (f" ({broken})" if broken else "")) from None
    except Exception:  # noqa: BLE001 - re-raised unless a cut weight file explains it
        broken = broken_weights(folder)
        if broken:
            raise RetrieverTrainError(f"--model {cfg.model}: {broken}; copy or download the model again") from None
        raise


def _source_text_positions(spec: str, folder: str) -> int | None:
    """Rows of the text position table in the model file itself (before any resize)."""
    path = Path(folder)
    try:
        if spec.startswith(("irra:", "rde:")):
            from .core.retrievers.irra import read_checkpoint

            pth = path / "best.pth" if path.is_dir() else path
            state = read_checkpoint(pth)
            key = next(k for k in state if k.endswith("positional_embedding") and "visual" not in k)
            return int(state[key].shape[0])
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return int(cfg.get("text_config", {}).get("max_position_embeddings", 77))
    except (OSError, StopIteration, ValueError, KeyError):
        return None


def _released_text_positions(retriever, source_rows: int | None) -> None:
    """The released code's 77 -> 168 text position resize fails silently and leaves the table at
    its random initialisation (normal, std 0.01); ``--text-pos-resize random`` reproduces that."""
    clip = getattr(retriever, "clip", retriever)
    table = clip.model.text_model.embeddings.position_embedding.weight
    if source_rows is None or table.shape[0] <= source_rows:
        return
    with torch.no_grad():
        table.normal_(0.0, 0.01)
    clip.invalidate_identity()
    logger.warning("text position table (%d -> %d rows) left random, as the released RDE code does "
                   "(--text-pos-resize interpolate resizes it)", source_rows, table.shape[0])


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
    for name, allowed in (("arch", ("auto", "clip", "rde")), ("optimizer", ("adamw", "adam")),
                          ("tse_bn", ("train", "eval")), ("text_pos_resize", ("interpolate", "random")),
                          ("consensus", ("coin", "noisy", "off"))):
        if getattr(cfg, name) not in allowed:
            raise RetrieverTrainError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                      f"got {getattr(cfg, name)!r}")
    if not 0 <= cfg.noise_rate < 1:
        raise RetrieverTrainError(f"--noise-rate must be in [0, 1), got {cfg.noise_rate}")
    if isinstance(cfg.noise_file, str) and cfg.noise_file.lower() in ("none", ""):
        cfg.noise_file = None
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
                                 description="Fine-tune a CLIP or RDE retriever on a PEDES split (SDM/TAL, RDE consensus, "
                                             "optional RDA text and injected noise).")
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
