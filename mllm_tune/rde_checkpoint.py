"""An RDE retriever written back as a released-layout ``best.pth`` (what ``rde:PATH`` reads).

The inverse of ``core.retrievers.irra.openai_to_hf`` plus the TSE heads: the Hugging Face CLIP
weights go under ``base_model.`` in the OpenAI-CLIP layout (q/k/v fused into ``in_proj``,
projections as ``x @ proj`` matrices, the rectangular vision position table as is), the heads
under ``visul_emb_layer.`` / ``texual_emb_layer.`` (the release's spelling), all inside
``{"model": state}``. Beside it a ``configs.yaml`` with the keys the loader reads
(``img_size``, ``stride_size``, ``text_length``, ``select_ratio``); the tokenizer files must sit
in the same folder (the trainer saves the retriever folder there) or be named with
``?tokenizer=``. The loader takes ``width // 64`` attention heads unless ``?heads=&text_heads=``
say otherwise (true for ViT-B/16; tiny models need them).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _blocks(sd: dict[str, torch.Tensor], src: str, dst: str, n: int, out: dict[str, torch.Tensor]) -> None:
    for i in range(n):
        s, d = f"{src}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
        out[d + "attn.in_proj_weight"] = torch.cat([sd[s + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
        out[d + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{p}_proj.bias"] for p in "qkv"], dim=0)
        for hf, oa in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                       ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{d}{oa}.{p}"] = sd[f"{s}{hf}.{p}"]


def released_state(retriever) -> dict[str, torch.Tensor]:
    """The state dict a released RDE ``best.pth`` holds under ``"model"`` for an ``RDERetriever``."""
    model = retriever.clip.model
    sd = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    vc, tc = model.config.vision_config, model.config.text_config
    out: dict[str, torch.Tensor] = {}
    _blocks(sd, "vision_model.", "visual.", vc.num_hidden_layers, out)
    _blocks(sd, "text_model.", "", tc.num_hidden_layers, out)
    rename = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for hf, oa in rename.items():
        out[oa] = sd[hf]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    state = {f"base_model.{k}": v for k, v in out.items()}
    for prefix, head in (("visul_emb_layer.", retriever.image_head), ("texual_emb_layer.", retriever.text_head)):
        state.update({prefix + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    return state


def save_released_pth(retriever, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path`` (a ``.pth``) and ``configs.yaml`` beside it; returns the ``.pth`` path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = retriever.clip.model.vision_model.embeddings
    tmp = path.with_suffix(".pth.tmp")
    torch.save({"model": released_state(retriever), **(extra or {})}, tmp)
    tmp.replace(path)
    run = {"img_size": list(retriever.image_size), "stride_size": int(getattr(emb, "stride", emb.patch_size)),
           "text_length": int(retriever.text_length), "select_ratio": float(retriever.ratio)}
    (path.parent / "configs.yaml").write_text(yaml.safe_dump(run, sort_keys=True), encoding="utf-8")
    return path
