"""RDE: the CLIP backbone (BGE features) plus its token-selection embedding heads (TSE).

A TSE head reads the last transformer layer's attention (averaged over heads) from the CLS token
(images) or the end-of-text token (texts), keeps the ``ratio`` most attended other tokens
(``int((L - 1) * ratio)`` for images, ``int((L - 2) * ratio)`` for texts, L = token count with
texts padded to the fixed text length, as released), L2-normalises their projected features,
maps them with ``linear(x) + MLP(x)`` (MLP = linear, BatchNorm, ReLU, linear) and max-pools.
Texts pool only over their real tokens (at most the caption length minus start/end).

RDE scores a pair by the mean of the two heads' cosines. This retriever returns
``concat(bge, tse) / sqrt(2)`` of the normalised head features, so one dot product gives that
mean and every downstream tool (cache, top-k, THI) works unchanged.

The released code runs the heads in fp16 on GPU; here everything is fp32, so features agree
with it to fp16 precision and exactly with an fp32 run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RELEASED_RESAMPLE, Retriever, RetrieverLoadError, l2_normalize, resolve_device, settings_digest
from .clip import RETRIEVER_FILE, CLIPRetriever, image_tokens, state_digest, text_embeds
from .irra import build_model, checkpoint_options, openai_to_hf, read_checkpoint, split_backbone

logger = logging.getLogger(__name__)

HEADS_FILE = "rde_heads.safetensors"
_PREFIX = {"image": "visul_emb_layer.", "text": "texual_emb_layer."}  # names in the released state dict


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    # RDE divides by (norm + eps) rather than clamping the norm; kept for exact agreement
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + eps)


class _TwoLayerMLP(nn.Module):
    """linear -> BatchNorm -> ReLU -> linear; ``bns.1`` exists only so released state dicts load whole."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(d_hidden), nn.BatchNorm1d(d_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = torch.relu(self.bns[0](self.layers[0](x.reshape(b * n, d))))
        return self.layers[1](h).view(b, n, -1)


class TSEHead(nn.Module):
    """One token-selection embedding head (``modality`` "image" or "text")."""

    def __init__(self, modality: str, d_in: int = 512, d_out: int = 1024, ratio: float = 0.3):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.modality = modality
        self.ratio = float(ratio)
        self.linear = nn.Linear(d_in, d_out)
        if modality == "image":
            self.fc = nn.Linear(d_in, d_out)  # the image head projects with `fc`; its `linear` is unused
        self.mlp = _TwoLayerMLP(d_in, d_out // 2, d_out)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = _unit(tokens)
        proj = self.fc if self.modality == "image" else self.linear
        return proj(x) + self.mlp(x)

    def forward_image(self, tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """tokens B x L x E (projected, CLS first), attn B x L x L (head mean) -> B x d_out."""
        b, L, _ = tokens.shape
        k = max(1, int((L - 1) * self.ratio))
        score = attn[:, 0, :].clone()
        score[:, 0] = -1.0  # never select the CLS token itself
        idx = score.topk(k, dim=-1).indices
        chosen = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self._embed(chosen).max(dim=1).values

    def forward_text(self, tokens: torch.Tensor, attn: torch.Tensor, attention_mask: torch.Tensor,
                     eos_pos: torch.Tensor) -> torch.Tensor:
        """tokens B x L x E, attn B x L x L, mask B x L (1 = real token), eos_pos B -> B x d_out."""
        b, L, _ = tokens.shape
        ar = torch.arange(b, device=tokens.device)
        k = max(1, int((L - 2) * self.ratio))
        mask = attention_mask.to(attn.dtype)
        score = attn[ar, eos_pos, :].clone()
        score[ar, eos_pos] = -1.0
        score[:, 0] = -1.0
        score = score * mask  # padding scores 0, below any real token
        idx = score.topk(k, dim=-1).indices  # sorted, most attended first
        chosen = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        feats = self._embed(chosen)
        n_real = (attention_mask.long().sum(-1) - 2).clamp(min=1, max=k)
        keep = torch.arange(k, device=tokens.device).unsqueeze(0) < n_real.unsqueeze(1)
        return feats.masked_fill(~keep.unsqueeze(-1), float("-inf")).max(dim=1).values


def heads_from_state(rest: dict[str, torch.Tensor], ratio: float, path) -> tuple[TSEHead, TSEHead]:
    heads = []
    for modality in ("image", "text"):
        p = _PREFIX[modality]
        sub = {k[len(p):]: v.float() for k, v in rest.items() if k.startswith(p)}
        if "linear.weight" not in sub:
            raise RetrieverLoadError(f"{path}: no RDE {modality} TSE head (keys '{p}*'); is this an IRRA checkpoint? "
                                     "Load it with 'irra:PATH' instead")
        d_out, d_in = sub["linear.weight"].shape
        head = TSEHead(modality, d_in, d_out, ratio)
        try:
            head.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise RetrieverLoadError(f"{path}: the {modality} TSE head does not have RDE's layout ({exc})") from exc
        heads.append(head.eval())
    return heads[0], heads[1]


class RDERetriever(Retriever):
    """BGE (CLIP) + TSE features; dot product = mean of the two heads' cosines."""

    kind = "rde"

    def __init__(self, clip: CLIPRetriever, image_head: TSEHead, text_head: TSEHead):
        self.clip = clip
        self.image_head = image_head.to(clip.device).eval()
        self.text_head = text_head.to(clip.device).eval()
        self.image_size, self.text_length = clip.image_size, clip.text_length
        self.mean, self.std, self.device, self.resample = clip.mean, clip.std, clip.device, clip.resample
        # TSE reads attention probabilities, which only the eager attention returns
        clip.model.set_attn_implementation("eager")
        self._identity: str | None = None

    @property
    def ratio(self) -> float:
        return self.image_head.ratio

    @property
    def dim(self) -> int:
        return self.clip.dim + self.image_head.linear.out_features

    @property
    def identity(self) -> str:
        if self._identity is None:
            blob = {"clip": self.clip.identity, "image_head": state_digest(self.image_head),
                    "text_head": state_digest(self.text_head), "ratio": self.ratio, "text_pad": "max_length"}
            self._identity = f"rde-{settings_digest(blob)[:24]}"
        return self._identity

    def heads_features(self, pixel_values: torch.Tensor | None = None, texts: list[str] | None = None):
        """Separately normalised (bge, tse) features of images or texts."""
        model = self.clip.model
        if pixel_values is not None:
            tokens, attn = image_tokens(model, pixel_values, output_attentions=True)
            bge = tokens[:, 0]
            tse = self.image_head.forward_image(tokens, attn.mean(dim=1))
        else:
            enc = self.clip.tokenize(texts, pad_to_max=True)  # k depends on the padded length, as released
            bge, tokens, attn, pos = text_embeds(model, enc["input_ids"], enc["attention_mask"], self.clip.eos_id,
                                                 output_attentions=True)
            tse = self.text_head.forward_text(tokens, attn.mean(dim=1), enc["attention_mask"], pos)
        return l2_normalize(bge.float()), l2_normalize(tse.float())

    def _image_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        bge, tse = self.heads_features(pixel_values=pixel_values)
        return torch.cat([bge, tse], dim=1) / math.sqrt(2.0)

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        bge, tse = self.heads_features(texts=texts)
        return torch.cat([bge, tse], dim=1) / math.sqrt(2.0)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = self.clip.save_pretrained(out_dir)
        state = {f"{_PREFIX['image']}{k}": v for k, v in self.image_head.state_dict().items()}
        state.update({f"{_PREFIX['text']}{k}": v for k, v in self.text_head.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / HEADS_FILE))
        meta = json.loads((out / RETRIEVER_FILE).read_text(encoding="utf-8"))
        meta.update({"kind": "rde", "select_ratio": self.ratio, "heads_file": HEADS_FILE, "identity": self.identity})
        (out / RETRIEVER_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out

    @classmethod
    def from_folder(cls, folder: str | Path, device=None, **kw: Any) -> "RDERetriever":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / RETRIEVER_FILE).read_text(encoding="utf-8"))
        heads_file = folder / meta.get("heads_file", HEADS_FILE)
        if not heads_file.is_file():
            raise RetrieverLoadError(f"{folder} says it is an RDE retriever but {heads_file.name} is missing")
        try:
            rest = load_file(str(heads_file))
        except Exception as exc:
            raise RetrieverLoadError(f"cannot read {heads_file} ({exc}); the file may be truncated") from exc
        clip = CLIPRetriever.from_folder(folder, device=device, attn_implementation="eager", **kw)
        img, txt = heads_from_state(rest, float(meta.get("select_ratio", 0.3)), heads_file)
        return cls(clip, img, txt)


def load_rde(path: str | Path, device=None, image_size=None, stride=None, text_length=None, tokenizer=None,
             heads: int | None = None, text_heads: int | None = None, ratio: float | None = None,
             resample: str = RELEASED_RESAMPLE) -> RDERetriever:
    """A released RDE ``best.pth`` (CLIP backbone + TSE heads) as a retriever."""
    from .clip import load_tokenizer

    path = Path(path)
    opts = checkpoint_options(path, image_size, stride, text_length, tokenizer)
    run_ratio = ratio if ratio is not None else float(read_ratio(path))
    tok = load_tokenizer(opts["tokenizer"], f"the RDE checkpoint {path}")
    backbone, rest = split_backbone(read_checkpoint(path), path)
    image_head, text_head = heads_from_state(rest, run_ratio, path)
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    config, hf, size = openai_to_hf(backbone, opts["image_size"], opts["stride"], heads, text_heads, ids)
    model = build_model(config, hf, path)
    model.set_attn_implementation("eager")
    clip = CLIPRetriever(model, tok, size, opts["text_length"] or config.text_config.max_position_embeddings,
                         device=device, kind="rde-clip", resample=resample)
    return RDERetriever(clip, image_head, text_head)


def read_ratio(path: Path) -> float:
    from .irra import read_run_config

    return float(read_run_config(path).get("select_ratio", 0.3))
