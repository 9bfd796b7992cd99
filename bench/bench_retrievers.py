"""Retriever encoding throughput on the CPU, and what the feature cache saves.

A tiny random CLIP (``synthpedes.tiny``, 128x64 person crops, 16-px patches) and a ViT-B/16-
shaped CLIP at 384x128 (the IRRA/RDE input; random weights, same compute as the real model)
encode SynthPEDES images and captions. The cache rows compare a gallery's first encoding
(miss: encode + write) with the second (hit: one safetensors read).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from bench import md_table

logger = logging.getLogger(__name__)


def _vit_b16_folder(out: Path, tiny_clip: Path, layers: int) -> Path:
    """A CLIP with ViT-B/16 / text-transformer widths (random weights) and the tiny tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(str(tiny_clip))
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": layers,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": layers,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
        projection_dim=512)
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rate(fn, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, n / dt


def run(smoke: bool = False) -> dict:
    import torch

    from mllm_tune.core.pedes import load_pedes
    from synthpedes.dataset import generate
    from mllm_tune.core.retrievers import FeatureCache, encode_gallery, load_retriever
    from synthpedes.tiny import build_tiny

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "synth", num_ids=4 if smoke else 120, seed=0, progress=False)
        data = load_pedes(tmp / "synth", "cuhk-pedes")
        paths = [str(r.image_path) for r in data.records]
        texts = [c for r in data.records for c in r.captions]
        tiny = build_tiny("clip", tmp / "tiny_clip")
        models = {"tiny CLIP 128x64": str(tiny)}
        if not smoke:  # the ViT-B/16 shape with its 12 layers
            models["ViT-B/16 CLIP 384x128"] = f"{_vit_b16_folder(tmp / 'vitb16', tiny, 12)}?image_size=384x128"
        for name, spec in models.items():
            r = load_retriever(spec, device="cpu")
            n_img = min(len(paths), 16 if smoke else (len(paths) if name.startswith("tiny") else 128))
            n_txt = min(len(texts), 16 if smoke else (len(texts) if name.startswith("tiny") else 256))
            img_paths, txt = paths[:n_img], texts[:n_txt]
            r.encode_images(img_paths[:2], progress=False)  # warm-up
            dt_i, ips = _rate(lambda: r.encode_images(img_paths, batch_size=64, progress=False), n_img)
            dt_t, tps = _rate(lambda: r.encode_texts(txt, batch_size=256, progress=False), n_txt)
            cache = FeatureCache(tmp / "cache")
            dt_miss, _ = _rate(lambda: encode_gallery(r, img_paths, cache=cache, progress=False), n_img)
            dt_hit, _ = _rate(lambda: encode_gallery(r, img_paths, cache=cache, progress=False), n_img)
            assert cache.hits == 1 and cache.misses == 1
            fig = {"images": n_img, "texts": n_txt, "images_per_s": ips, "texts_per_s": tps,
                   "cache_miss_s": dt_miss, "cache_hit_s": dt_hit, "cache_speedup": dt_miss / max(dt_hit, 1e-9),
                   "threads": torch.get_num_threads(), "dim": r.dim}
            figures[name] = fig
            rows.append([name, n_img, f"{ips:.1f}", n_txt, f"{tps:.1f}", f"{dt_miss:.3f}", f"{dt_hit * 1000:.2f}",
                         f"{fig['cache_speedup']:.0f}x"])
        # a retriever from outside through the plugin interface: precomputed features (features:DIR),
        # the base ranking without running an image model (docs/retrievers.md)
        import json

        from safetensors.torch import save_file

        r = load_retriever(str(tiny), device="cpu")
        n = min(len(paths), 16 if smoke else len(paths))
        fdir = tmp / "features"
        fdir.mkdir()
        save_file({"x": r.encode_images(paths[:n], progress=False)}, fdir / "gallery.safetensors")
        save_file({"x": r.encode_texts(texts[:n], progress=False)}, fdir / "queries.safetensors")
        (fdir / "gallery_paths.json").write_text(json.dumps(paths[:n]))
        (fdir / "queries.json").write_text(json.dumps(texts[:n]))
        (fdir / "features.json").write_text(json.dumps({"text_encoder": str(tiny), "name": "bench"}))
        fr = load_retriever(f"features:{fdir}")
        _, f_ips = _rate(lambda: fr.encode_images(paths[:n]), n)
        _, f_tps = _rate(lambda: fr.encode_texts(texts[:n]), n)
        assert torch.equal(fr.encode_images(paths[:n]), r.encode_images(paths[:n], progress=False))
        figures["features:DIR"] = {"images": n, "images_per_s": f_ips, "texts_per_s": f_tps}
        rows.append(["features:DIR (tiny CLIP's, precomputed)", n, f"{f_ips:.0f}", n, f"{f_tps:.0f}", "-", "-", "-"])
    md = md_table(["retriever", "images", "images/s", "texts", "texts/s", "gallery cache miss s",
                   "cache hit ms", "hit speed-up"], rows)
    md += ("\n\nCPU, float32, batch 64 images / 256 texts, "
           f"{figures[next(iter(figures))]['threads']} torch threads. Image time includes PNG decoding and the "
           "bicubic resize. A hit reads one safetensors file keyed by the retriever identity and the path list.")
    if smoke:
        md += " (smoke run: tiny sizes, no ViT-B/16)"
    return {"title": "Retriever encoding throughput and feature cache", "markdown": md, "figures": figures}
