"""Retrievers: CLIP at person re-ID shapes, IRRA/RDE conversion against reference modules built
here in the released (OpenAI-CLIP) layout, save/reload, errors, top-k and the feature cache."""

from __future__ import annotations

import json
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mllm_tune.core.retrievers import (
    FeatureCache,
    RetrieverLoadError,
    encode_gallery,
    load_retriever,
    parse_spec,
    similarity,
    topk_chunked,
)
from mllm_tune.core.retrievers.base import load_resized, to_pixel_values

TEXTS = [
    "A man wears a red shirt and blue jeans.",
    "The woman has long black hair, is wearing a white coat and carries a brown backpack.",
    "Someone in gray shorts.",
]


@pytest.fixture(scope="module")
def images(synth_root) -> list[str]:
    from mllm_tune.core.pedes import load_split

    return load_split(synth_root, "cuhk-pedes", "test").gallery_paths[:6]


# -- CLIP -------------------------------------------------------------------------------------

def test_clip_nonsquare_matches_hf_interpolation_and_reloads(tiny_clip, images, tmp_path):
    from transformers import CLIPModel

    r = load_retriever(str(tiny_clip))
    assert r.image_size == (128, 64)  # the processor's person-crop size, not the square 128
    img, txt = r.encode_images(images, progress=False), r.encode_texts(TEXTS, progress=False)
    assert img.dtype == torch.float32 and img.device.type == "cpu" and img.shape == (len(images), r.dim)
    assert torch.allclose(img.norm(dim=1), torch.ones(len(images))) and torch.allclose(txt.norm(dim=1), torch.ones(3))

    # the rectangular table equals CLIP's own on-the-fly interpolation of the square one
    ref = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    px = to_pixel_values([load_resized(p, (128, 64)) for p in images], r.mean, r.std)
    with torch.no_grad():
        hf = ref.get_image_features(pixel_values=px, interpolate_pos_encoding=True).pooler_output
        tok = r.tokenizer(TEXTS, padding=True, return_tensors="pt")
        hf_txt = ref.get_text_features(**tok).pooler_output
    assert torch.allclose(img, F.normalize(hf, dim=-1), atol=1e-5)
    assert torch.allclose(txt, F.normalize(hf_txt, dim=-1), atol=1e-5)

    out = r.save_pretrained(tmp_path / "saved")
    r2 = load_retriever(str(out))
    assert r2.identity == r.identity and r2.image_size == (128, 64)
    assert torch.equal(r2.encode_images(images, progress=False), img)
    assert torch.equal(r2.encode_texts(TEXTS, progress=False), txt)
    assert json.loads((out / "config.json").read_text())["vision_config"]["position_grid"] == [8, 4]


def test_clip_other_input_size_and_long_text(tiny_clip, images, tmp_path):
    r = load_retriever(f"{tiny_clip}?image_size=96x32&text_length=120")
    assert r.image_size == (96, 32) and r.text_length == 120
    assert r.model.text_model.embeddings.position_embedding.weight.shape[0] == 120
    long_text = " ".join(["a man in a red shirt and blue jeans with a black backpack."] * 12)
    n_tok = len(r.tokenizer(long_text)["input_ids"])
    assert n_tok > 100  # beyond CLIP's 77
    short = load_retriever(str(tiny_clip))
    # tokens past 77 change the feature (they are read, not cut)
    cut = r.tokenizer.decode(r.tokenizer(long_text)["input_ids"][1:76])
    assert not torch.allclose(r.encode_texts([long_text], progress=False), r.encode_texts([cut], progress=False), atol=1e-4)
    assert short.encode_texts([long_text], progress=False).shape == (1, short.dim)
    img = r.encode_images(images, progress=False)
    r2 = load_retriever(str(r.save_pretrained(tmp_path / "long")))
    assert r2.text_length == 120 and r2.image_size == (96, 32)
    assert torch.equal(r2.encode_texts([long_text], progress=False), r.encode_texts([long_text], progress=False))
    assert torch.equal(r2.encode_images(images, progress=False), img)
    assert r2.identity == r.identity != short.identity


# -- reference modules in the released OpenAI-CLIP layout ------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x, mask=None):  # x: L x N x D
        y = self.ln_1(x)
        a, w = self.attn(y, y, y, need_weights=True, attn_mask=mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), w


class RefStack(nn.Module):
    def __init__(self, d, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([RefBlock(d, heads) for _ in range(layers)])

    def forward(self, x, mask=None):
        w = None
        for b in self.resblocks:
            x, w = b(x, mask)
        return x, w


class RefVisual(nn.Module):
    def __init__(self, width, layers, heads, patch, grid, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(grid[0] * grid[1] + 1, width) * 0.1)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefStack(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) * width ** -0.5)


class RefCLIP(nn.Module):
    """An OpenAI-layout CLIP (the backbone IRRA/RDE save under ``base_model.``)."""

    def __init__(self, vocab, ctx=77, width=64, layers=2, heads=2, patch=8, grid=(6, 2), embed=32):
        super().__init__()
        self.visual = RefVisual(width, layers, heads, patch, grid, embed)
        self.transformer = RefStack(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.05)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width ** -0.5)
        with torch.no_grad():  # random norms too, so that a swapped weight/bias cannot pass
            for name, p in self.named_parameters():
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.05 * torch.randn_like(p))

    def image_tokens(self, px):
        v = self.visual
        x = v.conv1(px).flatten(2).permute(0, 2, 1)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x, w = v.transformer(v.ln_pre(x).permute(1, 0, 2))
        return v.ln_post(x.permute(1, 0, 2)) @ v.proj, w

    def text_tokens(self, ids):
        L = ids.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        x, w = self.transformer(x.permute(1, 0, 2), causal)
        return self.ln_final(x.permute(1, 0, 2)) @ self.text_projection, w


def ref_head_state(d_in, d_out, image: bool) -> dict[str, torch.Tensor]:
    h = d_out // 2
    s = {"linear.weight": torch.randn(d_out, d_in) * 0.2, "linear.bias": torch.randn(d_out) * 0.1,
         "mlp.layers.0.weight": torch.randn(h, d_in) * 0.2, "mlp.layers.0.bias": torch.randn(h) * 0.1,
         "mlp.layers.1.weight": torch.randn(d_out, h) * 0.2, "mlp.layers.1.bias": torch.randn(d_out) * 0.1}
    for i, n in ((0, h), (1, d_out)):
        s.update({f"mlp.bns.{i}.weight": 1 + 0.1 * torch.randn(n), f"mlp.bns.{i}.bias": 0.1 * torch.randn(n),
                  f"mlp.bns.{i}.running_mean": 0.1 * torch.randn(n), f"mlp.bns.{i}.running_var": 1 + 0.2 * torch.rand(n),
                  f"mlp.bns.{i}.num_batches_tracked": torch.tensor(100)})
    if image:
        s.update({"fc.weight": torch.randn(d_out, d_in) * 0.2, "fc.bias": torch.randn(d_out) * 0.1})
    return s


def ref_head_embed(s, feats, image: bool):
    """linear/fc(x) + MLP(x) of unit-normalised token features, computed from the raw tensors."""
    x = feats / (feats.norm(dim=-1, keepdim=True) + 1e-8)
    p = "fc" if image else "linear"
    y = F.linear(x, s["mlp.layers.0.weight"], s["mlp.layers.0.bias"])
    y = F.batch_norm(y, s["mlp.bns.0.running_mean"], s["mlp.bns.0.running_var"], s["mlp.bns.0.weight"],
                     s["mlp.bns.0.bias"], training=False, eps=1e-5)
    y = F.linear(F.relu(y), s["mlp.layers.1.weight"], s["mlp.layers.1.bias"])
    return F.linear(x, s[f"{p}.weight"], s[f"{p}.bias"]) + y


def ref_tse_image(s, tokens, attn, ratio):
    out = []
    L = tokens.shape[1]
    k = int((L - 1) * ratio)
    for b in range(tokens.shape[0]):
        order = sorted(range(1, L), key=lambda j: -float(attn[b, 0, j]))[:k]  # most attended patches
        out.append(ref_head_embed(s, tokens[b, order], True).max(0).values)
    return torch.stack(out)


def ref_tse_text(s, tokens, attn, eos, ratio, padded_len):
    out = []
    k = int((padded_len - 2) * ratio)
    for b in range(tokens.shape[0]):
        e = int(eos[b])
        content = sorted(range(1, e), key=lambda j: -float(attn[b, e, j]))[: min(e - 1, k)]
        out.append(ref_head_embed(s, tokens[b, content], False).max(0).values)
    return torch.stack(out)


def write_checkpoint(tmp_path: Path, ref: RefCLIP, heads: dict | None, half: bool = False) -> Path:
    state = {f"base_model.{k}": v.detach().clone() for k, v in ref.state_dict().items()}
    state["classifier.weight"] = torch.randn(11, 32)  # IRRA's ID head: unused at test time
    if heads:
        for prefix, hs in heads.items():
            state.update({prefix + k: v.clone() for k, v in hs.items()})
    if half:  # released RDE checkpoints hold fp16 linear weights
        state = {k: v.half() if v.is_floating_point() and k.endswith("weight") and v.dim() == 2 else v
                 for k, v in state.items()}
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    torch.save({"model": state, "epoch": 3}, run / "best.pth")
    (run / "configs.yaml").write_text(yaml.dump({"img_size": (48, 16), "stride_size": 8, "text_length": 77,
                                                 "select_ratio": 0.3}), encoding="utf-8")
    return run / "best.pth"


def ref_inputs(tokenizer, images, mean, std):
    # irra:/rde: resize like the released T.Resize (bilinear); see test_retriever_preprocessing.py
    px = to_pixel_values([load_resized(p, (48, 16), "bilinear") for p in images], mean, std)
    enc = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    eos = (ids == tokenizer.eos_token_id).int().argmax(-1)
    return px, ids, eos


def _rounded(ref: RefCLIP, half: bool) -> RefCLIP:
    if half:
        with torch.no_grad():
            for _, p in ref.named_parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
    return ref


def test_irra_conversion_matches_reference(tiny_clip, images, tmp_path):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_clip))
    ref = RefCLIP(len(tok)).eval()
    ckpt = write_checkpoint(tmp_path, ref, None)
    r = load_retriever(f"irra:{ckpt}?tokenizer={tiny_clip}&heads=2&text_heads=2")
    assert r.image_size == (48, 16) and r.text_length == 77  # from configs.yaml
    px, ids, eos = ref_inputs(tok, images, r.mean, r.std)
    with torch.no_grad():
        ti, _ = ref.image_tokens(px)
        tt, _ = ref.text_tokens(ids)
    want_img = F.normalize(ti[:, 0], dim=-1)
    want_txt = F.normalize(tt[torch.arange(len(TEXTS)), eos], dim=-1)
    got_img, got_txt = r.encode_images(images, progress=False), r.encode_texts(TEXTS, progress=False)
    assert torch.allclose(got_img, want_img, atol=1e-5)
    assert torch.allclose(got_txt, want_txt, atol=1e-5)

    r2 = load_retriever(str(r.save_pretrained(tmp_path / "irra_hf")))
    assert r2.identity == r.identity
    assert torch.equal(r2.encode_images(images, progress=False), got_img)
    assert torch.equal(r2.encode_texts(TEXTS, progress=False), got_txt)


def test_rde_conversion_matches_reference(tiny_clip, images, tmp_path):
    from transformers import AutoTokenizer

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(str(tiny_clip))
    ref = _rounded(RefCLIP(len(tok)).eval(), half=True)
    hs_img, hs_txt = ref_head_state(32, 48, True), ref_head_state(32, 48, False)
    for s in (hs_img, hs_txt):
        for k, v in s.items():
            if v.dim() == 2:
                s[k] = v.half().float()
    ckpt = write_checkpoint(tmp_path, ref, {"visul_emb_layer.": hs_img, "texual_emb_layer.": hs_txt}, half=True)
    r = load_retriever(f"rde:{ckpt}?tokenizer={tiny_clip}&heads=2&text_heads=2")
    px, ids, eos = ref_inputs(tok, images, r.mean, r.std)
    with torch.no_grad():
        ti, wi = ref.image_tokens(px)
        tt, wt = ref.text_tokens(ids)
        want = {
            "img_bge": F.normalize(ti[:, 0], dim=-1),
            "img_tse": F.normalize(ref_tse_image(hs_img, ti, wi, 0.3), dim=-1),
            "txt_bge": F.normalize(tt[torch.arange(len(TEXTS)), eos], dim=-1),
            "txt_tse": F.normalize(ref_tse_text(hs_txt, tt, wt, eos, 0.3, 77), dim=-1),
        }
        ib, it = r.heads_features(pixel_values=px)
        tb, tt_ = r.heads_features(texts=TEXTS)
    for name, got in (("img_bge", ib), ("img_tse", it), ("txt_bge", tb), ("txt_tse", tt_)):
        assert torch.allclose(got, want[name], atol=1e-5), name

    img, txt = r.encode_images(images, progress=False), r.encode_texts(TEXTS, progress=False)
    assert img.shape[1] == 32 + 48 and torch.allclose(img.norm(dim=1), torch.ones(len(images)))
    # one dot product = the mean of the two heads' cosines (RDE's score)
    mean_cos = (want["txt_bge"] @ want["img_bge"].T + want["txt_tse"] @ want["img_tse"].T) / 2
    assert torch.allclose(similarity(txt, img), mean_cos, atol=1e-5)

    r2 = load_retriever(str(r.save_pretrained(tmp_path / "rde_hf")))
    assert r2.kind == "rde" and r2.identity == r.identity
    assert torch.equal(r2.encode_images(images, progress=False), img)
    assert torch.equal(r2.encode_texts(TEXTS, progress=False), txt)


# -- errors -----------------------------------------------------------------------------------

def test_load_errors_are_clear(tiny_clip, tmp_path):
    with pytest.raises(RetrieverLoadError, match="does not exist"):
        load_retriever(str(tmp_path / "nope"))
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RetrieverLoadError, match="prefix it with 'irra:'"):
        load_retriever(str(tmp_path / "x.pth"))
    with pytest.raises(RetrieverLoadError, match="truncated"):
        load_retriever(f"irra:{tmp_path / 'x.pth'}?tokenizer={tiny_clip}")
    with pytest.raises(RetrieverLoadError, match="no config.json"):
        load_retriever(str(tmp_path))
    with pytest.raises(RetrieverLoadError, match="unknown retriever spec option"):
        load_retriever(f"{tiny_clip}?colour=red")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrieverLoadError, match="model.safetensors|truncated"):
        load_retriever(str(broken))
    r = load_retriever(str(tiny_clip))
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        r.encode_images([str(tmp_path / "missing.png")], progress=False)
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ValueError, match="cut.png cannot be read"):
        r.encode_images([str(tmp_path / "cut.png")], progress=False)
    # an IRRA checkpoint has no TSE heads; without a tokenizer nothing can be encoded
    torch.manual_seed(2)
    ckpt = write_checkpoint(tmp_path, RefCLIP(900), None)
    with pytest.raises(RetrieverLoadError, match="no RDE image TSE head"):
        load_retriever(f"rde:{ckpt}?tokenizer={tiny_clip}")
    with pytest.raises(RetrieverLoadError, match="carry no tokenizer"):
        load_retriever(f"irra:{ckpt}")


def test_parse_spec():
    assert parse_spec("irra:/a/best.pth?tokenizer=/t&image_size=384x128&heads=12") == (
        "irra", "/a/best.pth", {"tokenizer": "/t", "image_size": "384x128", "heads": 12})
    assert parse_spec("/models/clip") == ("auto", "/models/clip", {})


# -- similarity / top-k -----------------------------------------------------------------------

def test_topk_chunked_equals_full_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    img[20] = img[3]  # exact ties across gallery chunks
    img[30] = img[3]
    txt = F.normalize(torch.randn(11, 8, generator=g), dim=-1)
    txt[4] = img[3]
    full = similarity(txt, img)
    order = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :7]
    for qc, gc in ((1, 5), (4, 16), (100, 1000)):
        v, i = topk_chunked(txt, img, 7, chunk_size=qc, gallery_chunk_size=gc)
        assert torch.equal(i, order) and torch.allclose(v, full.gather(1, order))
    assert i[4, :3].tolist() == [3, 20, 30]  # ties: lower gallery index first
    v, i = topk_chunked(txt, img, 100)
    assert i.shape == (11, 37)
    with pytest.raises(ValueError, match="widths differ"):
        similarity(txt, img[:, :4])


# -- cache ------------------------------------------------------------------------------------

def test_feature_cache_hit_miss_and_corruption(tiny_clip, images, tmp_path):
    r = load_retriever(str(tiny_clip))
    calls = []
    orig = r.encode_images

    def counting(paths, **kw):
        calls.append(len(paths))
        return orig(paths, **kw)

    r.encode_images = counting
    cache = FeatureCache(tmp_path / "cache")
    a = encode_gallery(r, images, cache=cache, progress=False)
    b = encode_gallery(r, images, cache=cache, progress=False)
    assert calls == [len(images)] and torch.equal(a, b) and (cache.hits, cache.misses) == (1, 1)
    c = encode_gallery(r, images[::-1], cache=cache, progress=False)  # another order is another gallery
    assert calls == [len(images)] * 2 and torch.allclose(c, a.flip(0), atol=1e-6)
    f = cache.path_for(r.identity, images)
    f.write_bytes(f.read_bytes()[:50])  # truncated: recomputed, not an error
    d = encode_gallery(r, images, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 3 and torch.equal(d, a)
    assert encode_gallery(r, images, cache_dir=tmp_path / "cache", progress=False).shape == a.shape
    assert len(calls) == 3
