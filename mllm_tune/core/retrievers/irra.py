"""IRRA (and RDE) checkpoints -> Hugging Face CLIP modules.

The released ``best.pth`` is ``torch.save({"model": state_dict, ...})`` where the state dict
holds the OpenAI-CLIP layout under ``base_model.`` (``visual.conv1``, ``visual.transformer.
resblocks.N.attn.in_proj_weight``, ``ln_final``, ``text_projection``, ...), possibly behind a
``module.`` prefix from distributed training, plus heads that test time does not use (IRRA's
ID classifier and cross-modal MLM branch). Its vision position table already has the
rectangular person grid (24x8 for 384x128, stride 16) it was trained with.

The conversion is key renaming plus three layout changes: the fused q/k/v projection is split
into three, the ``x @ proj`` matrices become ``nn.Linear`` weights (transposed), and the
position table goes into :class:`ReIDCLIPModel`'s rectangular embedding. Attention heads are
``width // 64`` as in OpenAI CLIP unless given. The training run's ``configs.yaml`` next to the
checkpoint supplies ``img_size``, ``stride_size`` and ``text_length`` when present. Images are
resized bilinearly, as the released ``T.Resize((H, W))`` does (``resample`` overrides it).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig

from .base import RELEASED_RESAMPLE, RetrieverLoadError, parse_image_size
from .clip import CLIPRetriever, ReIDCLIPModel, load_tokenizer

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside an IRRA/RDE ``.pth`` (prefixes ``module.`` stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__:
            # released checkpoints also pickle optimizer/scheduler state; those need full unpickling
            logger.warning("%s holds more than tensors; loading it with full unpickling (only do this for "
                           "checkpoints you trust)", path)
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise RetrieverLoadError(f"cannot read checkpoint {path} ({type(exc2).__name__}: {exc2}); the file may "
                                         "be truncated: download or copy it again") from exc2
        else:
            raise RetrieverLoadError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file may be "
                                     "truncated: download or copy it again") from exc
    state = ckpt
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RetrieverLoadError(f"{path}: no state dict found (expected a dict of tensors, or one under 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def split_backbone(state: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> tuple[dict, dict]:
    """(OpenAI-CLIP backbone keys without prefix, everything else)."""
    if any(k.startswith("base_model.") for k in state):
        backbone = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
        rest = {k: v for k, v in state.items() if not k.startswith("base_model.")}
    else:
        backbone, rest = dict(state), {}
    if "visual.conv1.weight" not in backbone or "visual.proj" not in backbone:
        hint = "a ResNet CLIP backbone is not supported" if "visual.layer1.0.conv1.weight" in backbone else \
            "expected OpenAI-CLIP ViT keys such as base_model.visual.conv1.weight"
        raise RetrieverLoadError(f"{path}: not an IRRA/RDE ViT checkpoint ({hint}; found e.g. {sorted(state)[:3]})")
    return backbone, rest


def _count_blocks(sd: dict, prefix: str) -> int:
    idx = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and (m.group(1) or "") == prefix}
    return max(idx) + 1 if idx else 0


def infer_grid(num_patches: int, patch: int, stride: int, image_size: tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, image size) of a trained position table: from ``image_size`` when given, else the
    factorisation of the patch count closest to IRRA's 3:1 person crop."""
    if image_size is not None:
        h, w = image_size
        grid = ((h - patch) // stride + 1, (w - patch) // stride + 1)
        if grid[0] * grid[1] != num_patches:
            raise RetrieverLoadError(
                f"image size {h}x{w} with patch {patch} / stride {stride} gives a {grid[0]}x{grid[1]} grid, but the "
                f"checkpoint's position table has {num_patches} patches: pass the image size it was trained with")
        return grid, image_size
    pairs = [(a, num_patches // a) for a in range(1, num_patches + 1) if num_patches % a == 0]
    gh, gw = min(pairs, key=lambda p: abs(p[0] / p[1] - 3.0))
    size = ((gh - 1) * stride + patch, (gw - 1) * stride + patch)
    logger.info("no image size given: the %d-patch position table read as a %dx%d grid (%dx%d input)",
                num_patches, gh, gw, *size)
    return (gh, gw), size


def openai_to_hf(
    backbone: dict[str, torch.Tensor],
    image_size: tuple[int, int] | None = None,
    stride: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    token_ids: dict[str, int | None] | None = None,
) -> tuple[CLIPConfig, dict[str, torch.Tensor], tuple[int, int]]:
    """Config + HF state dict of a ReIDCLIPModel equal to an OpenAI-layout CLIP backbone."""
    sd = {k: v.float() for k, v in backbone.items()}
    vw = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    stride = int(stride or patch)
    tw = sd["ln_final.weight"].shape[0]
    n_vis, n_txt = _count_blocks(sd, "visual."), _count_blocks(sd, "")
    grid, size = infer_grid(sd["visual.positional_embedding"].shape[0] - 1, patch, stride, image_size)
    token_ids = token_ids or {}
    vision = {"hidden_size": vw, "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "num_hidden_layers": n_vis, "num_attention_heads": vision_heads or max(1, vw // 64),
              "image_size": max(size), "patch_size": patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    text = {"vocab_size": sd["token_embedding.weight"].shape[0], "hidden_size": tw,
            "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "num_hidden_layers": n_txt,
            "num_attention_heads": text_heads or max(1, tw // 64),
            "max_position_embeddings": sd["positional_embedding"].shape[0], "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, **{k: v for k, v in token_ids.items() if v is not None}}
    for name, cfg in (("vision", vision), ("text", text)):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise RetrieverLoadError(f"{name} width {cfg['hidden_size']} is not divisible by {cfg['num_attention_heads']} heads")
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1])
    config.vision_config.position_grid = list(grid)
    if stride != patch:
        config.vision_config.patch_stride = stride

    out: dict[str, torch.Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
            q, k, v = sd.pop(s + "attn.in_proj_weight").chunk(3, dim=0)
            qb, kb, vb = sd.pop(s + "attn.in_proj_bias").chunk(3, dim=0)
            out.update({d + "self_attn.q_proj.weight": q, d + "self_attn.k_proj.weight": k, d + "self_attn.v_proj.weight": v,
                        d + "self_attn.q_proj.bias": qb, d + "self_attn.k_proj.bias": kb, d + "self_attn.v_proj.bias": vb})
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for p in ("weight", "bias"):
                    out[f"{d}{b}.{p}"] = sd.pop(f"{s}{a}.{p}")

    blocks("visual.", "vision_model.", n_vis)
    blocks("", "text_model.", n_txt)
    rename = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    for a, b in rename.items():
        out[b] = sd.pop(a)
    out["visual_projection.weight"] = sd.pop("visual.proj").T.contiguous()
    out["text_projection.weight"] = sd.pop("text_projection").T.contiguous()
    out["logit_scale"] = sd.pop("logit_scale", torch.tensor(config.logit_scale_init_value)).reshape(())
    for k in list(sd):
        if k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k)  # scalar bookkeeping in some OpenAI files
    if sd:
        logger.info("backbone keys without an HF counterpart, ignored: %s", sorted(sd)[:8])
    return config, out, size


def build_model(config: CLIPConfig, hf_state: dict[str, torch.Tensor], path: str | Path) -> ReIDCLIPModel:
    model = ReIDCLIPModel(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    if missing or unexpected:
        raise RetrieverLoadError(f"{path}: converted weights do not fit the CLIP modules (missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}); the checkpoint layout is not IRRA/RDE's")
    return model.eval()


def read_run_config(ckpt: Path) -> dict[str, Any]:
    """``configs.yaml`` written next to the checkpoint by IRRA/RDE training (img_size, stride, text length)."""
    import yaml

    f = ckpt.parent / "configs.yaml"
    if not f.is_file():
        return {}

    class _Loader(yaml.SafeLoader):
        pass

    # argparse tuples are dumped with a python tag; read them as lists
    _Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda ld, node: ld.construct_sequence(node))
    try:
        cfg = yaml.load(f.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        logger.warning("%s is not readable YAML (%s); ignoring it", f, exc)
        return {}
    return cfg if isinstance(cfg, dict) else {}


def checkpoint_options(path: Path, image_size=None, stride=None, text_length=None, tokenizer=None) -> dict[str, Any]:
    run = read_run_config(path)
    size = parse_image_size(image_size) or parse_image_size(run.get("img_size"))
    tok_src = tokenizer or next((p for p in (path.parent / "tokenizer", path.parent)
                                 if (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()), None)
    if tok_src is None:
        raise RetrieverLoadError(
            f"{path}: IRRA/RDE checkpoints carry no tokenizer. Pass tokenizer=FOLDER (spec 'irra:{path}?tokenizer=FOLDER'), "
            "a folder with the OpenAI CLIP tokenizer in Hugging Face format, e.g. a local copy of "
            "openai/clip-vit-base-patch16, or put tokenizer.json / vocab.json + merges.txt next to the checkpoint")
    return {"image_size": size, "stride": stride or run.get("stride_size"),
            "text_length": text_length or run.get("text_length"), "tokenizer": tok_src}


def load_irra(path: str | Path, device=None, image_size=None, stride=None, text_length=None, tokenizer=None,
              heads: int | None = None, text_heads: int | None = None, resample: str = RELEASED_RESAMPLE) -> CLIPRetriever:
    """An IRRA checkpoint as a CLIP retriever (IRRA scores with the CLIP features alone)."""
    path = Path(path)
    opts = checkpoint_options(path, image_size, stride, text_length, tokenizer)
    tok = load_tokenizer(opts["tokenizer"], f"the IRRA checkpoint {path}")
    backbone, rest = split_backbone(read_checkpoint(path), path)
    if any(k.startswith(("visul_emb_layer.", "texual_emb_layer.")) for k in rest):
        logger.info("%s also holds RDE's TSE heads; use 'rde:%s' to score with both heads", path, path)
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    config, hf, size = openai_to_hf(backbone, opts["image_size"], opts["stride"], heads, text_heads, ids)
    model = build_model(config, hf, path)
    return CLIPRetriever(model, tok, size, opts["text_length"] or config.text_config.max_position_embeddings,
                         device=device, kind="irra", resample=resample)
