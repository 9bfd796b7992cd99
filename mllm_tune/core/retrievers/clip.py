"""Hugging Face CLIP as a retriever, at person re-ID input shapes.

Two adaptations, both applied once at load time and stored by ``save_pretrained``:

* **Non-square images** (384x128 in IRRA/RDE): the vision position table is resized once to the
  rectangular patch grid (bicubic, the same interpolation as CLIP's own
  ``interpolate_pos_encoding``) and kept as a rectangular table that can be trained further, as
  IRRA does. The grid is recorded as ``vision_config.position_grid`` (and an optional
  ``patch_stride`` for overlapping patches) and rebuilt by :class:`ReIDCLIPModel`.
* **Texts longer than the position table** (UFine6926 uses 168 tokens): the text position table
  is linearly interpolated to the new length and ``max_position_embeddings`` updated, which plain
  ``CLIPModel`` reads back as is.

A square model at its native size stays a plain ``CLIPModel`` checkpoint.

Images are resized with the folder's own filter: ``retriever.json`` ``resample`` when this
toolkit saved the folder (``irra:``/``rde:`` conversions keep IRRA/RDE's bilinear), else the
``resample`` code of its ``preprocessor_config.json``, else bicubic, the default of
``CLIPImageProcessor``; always with PIL (see :mod:`.base`).

Text features are read at the first end-of-text token (found by id), so added tokens (such as
a mask token for training) and padding with the end token both work whatever the config's
legacy ``eos_token_id`` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from .base import (
    HF_CLIP_RESAMPLE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RESAMPLE_CODES,
    Retriever,
    RetrieverLoadError,
    l2_normalize,
    parse_image_size,
    resample_name,
    resolve_device,
    settings_digest,
)

logger = logging.getLogger(__name__)

RETRIEVER_FILE = "retriever.json"  # how this folder is meant to be read (kind, image size, text length)


# -- model surgery -----------------------------------------------------------------------------

class RectVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP patch + position embeddings over a rectangular grid (gh x gw), optional patch stride."""

    def __init__(self, config, grid: tuple[int, int], stride: int | None = None):
        super().__init__(config)
        self.grid = (int(grid[0]), int(grid[1]))
        self.stride = int(stride or self.patch_size)
        if self.stride != self.patch_size:
            self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                             stride=self.stride, bias=False)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.position_ids = nn.Buffer(torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def positions_for(self, grid: tuple[int, int]) -> torch.Tensor:
        table = self.position_embedding.weight
        if tuple(grid) == self.grid:
            return table.unsqueeze(0)
        return resize_position_table(table, self.grid, grid).unsqueeze(0)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        grid = (patches.shape[2], patches.shape[3])
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(b, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions_for(grid)


def resize_position_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw) x D position table -> (1 + nh*nw) x D: the class row kept, the grid bicubic."""
    cls, grid = table[:1], table[1:]
    d = table.shape[1]
    if grid.shape[0] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position table has {grid.shape[0]} patch rows, not {old_grid[0]}x{old_grid[1]}")
    g = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    g = nn.functional.interpolate(g.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(-1, d).to(table.dtype)
    return torch.cat([cls, g], dim=0)


class ReIDCLIPModel(CLIPModel):
    """``CLIPModel`` whose vision position table may be rectangular (``vision_config.position_grid``)."""

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        grid = getattr(config.vision_config, "position_grid", None)
        if grid:
            self.vision_model.embeddings = RectVisionEmbeddings(
                config.vision_config, tuple(grid), getattr(config.vision_config, "patch_stride", None))


def current_grid(model: CLIPModel) -> tuple[int, int]:
    emb = model.vision_model.embeddings
    if isinstance(emb, RectVisionEmbeddings):
        return emb.grid
    n = emb.image_size // emb.patch_size
    return (n, n)


def grid_for(model: CLIPModel, image_size: tuple[int, int]) -> tuple[int, int]:
    emb = model.vision_model.embeddings
    stride = getattr(emb, "stride", emb.patch_size)
    h, w = image_size
    if h < emb.patch_size or w < emb.patch_size:
        raise ValueError(f"image size {h}x{w} is smaller than the patch size {emb.patch_size}")
    return ((h - emb.patch_size) // stride + 1, (w - emb.patch_size) // stride + 1)


def set_vision_grid(model: CLIPModel, grid: tuple[int, int]) -> None:
    """Give ``model`` a rectangular position table for ``grid`` (resized from the current one)."""
    grid = (int(grid[0]), int(grid[1]))
    old = model.vision_model.embeddings
    if isinstance(old, RectVisionEmbeddings) and old.grid == grid:
        return
    vc = model.config.vision_config
    stride = getattr(old, "stride", None)
    new = RectVisionEmbeddings(vc, grid, stride)
    with torch.no_grad():
        new.patch_embedding.weight.copy_(old.patch_embedding.weight)
        new.class_embedding.copy_(old.class_embedding)
        new.position_embedding.weight.copy_(resize_position_table(old.position_embedding.weight, current_grid(model), grid))
    new.to(old.class_embedding.device)
    model.vision_model.embeddings = new
    vc.position_grid = list(grid)
    if stride and stride != vc.patch_size:
        vc.patch_stride = int(stride)
    logger.info("vision position table resized to a %dx%d grid", *grid)


def set_text_length(model: CLIPModel, length: int) -> None:
    """Make the text position table ``length`` rows long (linear interpolation when it grows)."""
    emb = model.text_model.embeddings
    old = emb.position_embedding.weight
    if old.shape[0] >= length:
        return
    with torch.no_grad():
        t = old.T.unsqueeze(0).float()  # 1 x D x L
        new = nn.functional.interpolate(t, size=length, mode="linear", align_corners=True)[0].T.to(old.dtype)
    emb.position_embedding = nn.Embedding(length, old.shape[1]).to(old.device)
    with torch.no_grad():
        emb.position_embedding.weight.copy_(new)
    emb.position_ids = nn.Buffer(torch.arange(length, device=old.device).expand((1, -1)), persistent=False)
    model.config.text_config.max_position_embeddings = length
    logger.info("text position table interpolated from %d to %d positions", old.shape[0], length)


def add_mask_token(model: CLIPModel, tokenizer, token: str = "<|mask|>") -> int:
    """Give the tokenizer a mask token (for token noise) and the model an embedding row for it."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    tokenizer.add_special_tokens({"mask_token": token})
    emb = model.text_model.embeddings.token_embedding
    n_new = len(tokenizer)
    if n_new > emb.weight.shape[0]:
        new = nn.Embedding(n_new, emb.weight.shape[1]).to(emb.weight.device)
        with torch.no_grad():
            new.weight[: emb.weight.shape[0]] = emb.weight
            new.weight[emb.weight.shape[0]:] = emb.weight.mean(0, keepdim=True)  # a neutral start
        model.text_model.embeddings.token_embedding = new
        model.config.text_config.vocab_size = n_new
    return int(tokenizer.mask_token_id)


def auto_reid_size(model: CLIPModel) -> tuple[int, int]:
    """A 3:1 person-crop input with about as many patches as the native square (224/16 -> 384x128)."""
    emb = model.vision_model.embeddings
    if isinstance(emb, RectVisionEmbeddings):
        gh, gw = emb.grid
        return ((gh - 1) * emb.stride + emb.patch_size, (gw - 1) * emb.stride + emb.patch_size)
    n = emb.image_size // emb.patch_size
    gw = max(1, round(math.sqrt(n * n / 3)))
    return (3 * gw * emb.patch_size, gw * emb.patch_size)


# -- features ----------------------------------------------------------------------------------

def image_tokens(model: CLIPModel, pixel_values: torch.Tensor, output_attentions: bool = False):
    """Projected features of every vision token (post layer-norm) and the last layer's attention."""
    out = model.vision_model(pixel_values=pixel_values, output_attentions=output_attentions)
    tokens = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state))
    return tokens, (out.attentions[-1] if output_attentions else None)


def image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) projected CLS features: CLIP's image embedding."""
    out = model.vision_model(pixel_values=pixel_values)
    return model.visual_projection(out.pooler_output)


def eos_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos_id: int) -> torch.Tensor:
    is_eos = input_ids == eos_id
    first = is_eos.int().argmax(dim=-1)
    if attention_mask is None:
        last = torch.full_like(first, input_ids.shape[1] - 1)
    else:
        last = attention_mask.long().sum(-1) - 1
    return torch.where(is_eos.any(dim=-1), first, last)


def text_embeds(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos_id: int,
                output_attentions: bool = False):
    """Raw projected features at the first end-of-text token (and token features / attention)."""
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=output_attentions)
    pos = eos_positions(input_ids, attention_mask, eos_id)
    hidden = out.last_hidden_state
    pooled = model.text_projection(hidden[torch.arange(hidden.shape[0], device=hidden.device), pos])
    if not output_attentions:
        return pooled
    return pooled, model.text_projection(hidden), out.attentions[-1], pos


def state_digest(module: nn.Module) -> str:
    """sha256 over names, shapes and values of a module's state: content identity of the weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    try:
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        # truncation/padding hold the settings of the last call, not the vocabulary
        state.pop("truncation", None)
        state.pop("padding", None)
        blob = json.dumps(state, sort_keys=True)
    except AttributeError:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
                        getattr(tokenizer, "do_lower_case", None)])
    return hashlib.sha256((blob + extra).encode()).hexdigest()


# -- reading a folder --------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RetrieverLoadError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); the file may be truncated") from exc


def folder_preprocessing(folder: Path) -> dict[str, Any]:
    """Image size / mean / std / resize filter recorded by a processor in ``folder`` (either HF file name)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = folder / name
        if f.is_file():
            cfg = read_json(f)
            cfg = cfg.get("image_processor", cfg)
            out: dict[str, Any] = {"mean": tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                                   "std": tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
                                   "resample": resample_name(cfg.get("resample", RESAMPLE_CODES[HF_CLIP_RESAMPLE]),
                                                             f"{f} 'resample'")}
            size = cfg.get("size") or {}
            if isinstance(size, dict) and "height" in size and "width" in size and not cfg.get("do_center_crop", False):
                out["image_size"] = (int(size["height"]), int(size["width"]))
            return out
    return {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "resample": HF_CLIP_RESAMPLE}


def load_tokenizer(source: str | Path, for_what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:
        raise RetrieverLoadError(
            f"no usable tokenizer in {source} ({type(exc).__name__}: {str(exc)[:200]}); {for_what} needs the CLIP "
            "tokenizer files (tokenizer.json or vocab.json + merges.txt): copy them from the base CLIP checkpoint, "
            "or pass tokenizer=FOLDER"
        ) from exc


def load_clip_model(folder: Path, attn_implementation: str | None = None) -> ReIDCLIPModel:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise RetrieverLoadError(f"{folder} has no config.json: not a Hugging Face model folder. Pass a CLIP folder "
                                 "(save_pretrained output), or 'irra:PATH' / 'rde:PATH' for those checkpoints")
    cfg = read_json(cfg_file)
    if cfg.get("model_type") != "clip":
        raise RetrieverLoadError(f"{cfg_file}: model_type is {cfg.get('model_type')!r}, not 'clip'; only CLIP dual "
                                 "encoders can serve as retrievers")
    kw: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        return ReIDCLIPModel.from_pretrained(str(folder), **kw)
    except Exception as exc:
        raise RetrieverLoadError(
            f"cannot load the CLIP weights in {folder} ({type(exc).__name__}: {str(exc)[:300]}); the weight file may be "
            "truncated or missing: copy the checkpoint again"
        ) from exc


class CLIPRetriever(Retriever):
    """A CLIP dual encoder: image = projected CLS, text = projected end-of-text token."""

    kind = "clip"

    def __init__(
        self,
        model: CLIPModel,
        tokenizer,
        image_size: tuple[int, int] | None = None,
        text_length: int | None = None,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        device: str | torch.device | None = None,
        kind: str | None = None,
        resample: str = HF_CLIP_RESAMPLE,
    ):
        self.model = model
        self.tokenizer = tokenizer
        if kind:
            self.kind = kind
        self.image_size = parse_image_size(image_size) or auto_reid_size(model)
        grid = grid_for(model, self.image_size)
        if grid != current_grid(model) or isinstance(model.vision_model.embeddings, RectVisionEmbeddings):
            set_vision_grid(model, grid)
        if text_length is None:
            tml = getattr(tokenizer, "model_max_length", None)
            text_length = tml if isinstance(tml, int) and 0 < tml <= 4096 else model.config.text_config.max_position_embeddings
        self.text_length = int(text_length)
        set_text_length(model, self.text_length)
        tokenizer.model_max_length = self.text_length
        if tokenizer.eos_token_id is None:
            raise RetrieverLoadError("the tokenizer has no end-of-text token (eos_token); CLIP reads text features there")
        self.eos_id = int(tokenizer.eos_token_id)
        # keep HF's own pooling right too (legacy configs say 2 and pool at the highest id)
        model.config.text_config.eos_token_id = self.eos_id
        model.text_model.eos_token_id = self.eos_id
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample = resample_name(resample)
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self._identity: str | None = None

    # -- loading / saving --------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, device=None, image_size=None, text_length=None, tokenizer=None,
                    attn_implementation: str | None = None, resample: str | None = None) -> "CLIPRetriever":
        folder = Path(folder)
        model = load_clip_model(folder, attn_implementation)
        tok = load_tokenizer(tokenizer or folder, f"the CLIP retriever in {folder}")
        pre = folder_preprocessing(folder)
        saved = read_json(folder / RETRIEVER_FILE) if (folder / RETRIEVER_FILE).is_file() else {}
        size = parse_image_size(image_size) or parse_image_size(saved.get("image_size")) or pre.get("image_size")
        length = text_length or saved.get("text_length")
        filt = resample or saved.get("resample") or pre["resample"]
        return cls(model, tok, size, length, pre["mean"], pre["std"], device,
                   resample=resample_name(filt, f"{folder} resample"))

    def _settings(self) -> dict[str, Any]:
        return {"image_size": list(self.image_size), "text_length": self.text_length, "mean": list(self.mean),
                "std": list(self.std), "eos": self.eos_id, "resize": f"pil-{self.resample}", "pool": "cls/first-eos"}

    def save_pretrained(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from transformers import CLIPImageProcessor

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        h, w = self.image_size
        CLIPImageProcessor(size={"height": h, "width": w}, crop_size={"height": h, "width": w}, do_center_crop=False,
                           image_mean=list(self.mean), image_std=list(self.std),
                           resample=RESAMPLE_CODES[self.resample]).save_pretrained(out)
        meta = {"kind": "clip", "image_size": [h, w], "text_length": self.text_length, "resample": self.resample,
                "identity": self.identity}
        meta.update(extra or {})
        (out / RETRIEVER_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out

    # -- identity / features -----------------------------------------------------------------
    @property
    def identity(self) -> str:
        if self._identity is None:
            blob = {"weights": state_digest(self.model), "tokenizer": tokenizer_digest(self.tokenizer), **self._settings()}
            self._identity = f"clip-{settings_digest(blob)[:24]}"
        return self._identity

    def invalidate_identity(self) -> None:
        """Call after changing the weights in place (training)."""
        self._identity = None

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def tokenize(self, texts: list[str], pad_to_max: bool = False) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding="max_length" if pad_to_max else True, truncation=True,
                             max_length=self.text_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _image_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return l2_normalize(image_embeds(self.model, pixel_values).float())

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenize(texts)
        return l2_normalize(text_embeds(self.model, enc["input_ids"], enc["attention_mask"], self.eos_id).float())
