"""Retriever image preprocessing against the released pipelines themselves.

IRRA/RDE test with ``T.Compose([T.Resize((H, W)), T.ToTensor(), T.Normalize(CLIP mean, std)])`` on
``Image.open(p).convert("RGB")``; torchvision is installed here, so the reference below is that very
transform, not a transcription of it. Plain Hugging Face CLIP folders follow their own
``preprocessor_config.json`` (CLIPImageProcessor's default: bicubic).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_tune.core.retrievers import load_retriever
from mllm_tune.core.retrievers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    load_resized,
    resample_name,
    to_pixel_values,
)

T = pytest.importorskip("torchvision.transforms")
logger = logging.getLogger(__name__)

ODD_SIZES = [(37, 91), (250, 97), (128, 64), (401, 203)]  # (width, height) of the source images
TARGET = (384, 128)  # (H, W) of IRRA/RDE


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    """Noisy images with edges (so filters differ) at odd sizes, saved losslessly."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    paths = []
    for w, h in ODD_SIZES:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 2, : w // 3] = (250, 10, 30)  # a flat block with hard edges
        p = d / f"img_{w}x{h}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def released_pixels(paths, size=TARGET) -> torch.Tensor:
    tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)])
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def ours(paths, resample: str, size=TARGET) -> torch.Tensor:
    return to_pixel_values([load_resized(p, size, resample) for p in paths], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def test_bilinear_equals_torchvision_resize_on_odd_sizes(odd_images):
    want = released_pixels(odd_images)
    got = ours(odd_images, "bilinear")
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
    logger.info("max |ours - torchvision| per image %s: %s", ODD_SIZES, diffs)
    assert got.shape == want.shape == (len(odd_images), 3, *TARGET)
    assert max(diffs) < 1e-5  # measured: 0.0 (the same PIL call, the same float32 arithmetic)
    # the old filter is visibly different: the test can fail
    old = ours(odd_images, "bicubic")
    assert float((old - want).abs().max()) > 0.05


def test_exact_size_image_is_not_resampled(odd_images):
    p = odd_images[ODD_SIZES.index((128, 64))]  # 128 wide, 64 high: asked for (H, W) = (64, 128)
    want = released_pixels([p], size=(64, 128))
    assert torch.equal(ours([p], "bilinear", size=(64, 128)), want)
    assert torch.equal(ours([p], "bicubic", size=(64, 128)), want)


def test_resample_names_and_errors():
    assert resample_name(2) == "bilinear" and resample_name("BICUBIC") == "bicubic"
    with pytest.raises(ValueError, match="bilinear"):
        resample_name(1)
    with pytest.raises(ValueError, match="not supported"):
        resample_name(True)


def test_irra_spec_uses_released_bilinear(tiny_clip, odd_images, tmp_path):
    """An irra: checkpoint encodes exactly the torchvision pixels; its saved folder keeps the filter."""
    from test_retrievers import RefCLIP, write_checkpoint
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_clip))
    ckpt = write_checkpoint(tmp_path, RefCLIP(len(tok)).eval(), None)
    r = load_retriever(f"irra:{ckpt}?tokenizer={tiny_clip}&heads=2&text_heads=2")
    assert r.resample == "bilinear" and r.describe()["resample"] == "bilinear"
    want = r.encode_pixels(released_pixels(odd_images, size=r.image_size))
    assert torch.equal(r.encode_images([str(p) for p in odd_images], progress=False), want)

    out = r.save_pretrained(tmp_path / "saved")
    assert json.loads((out / "retriever.json").read_text())["resample"] == "bilinear"
    assert json.loads((out / "preprocessor_config.json").read_text())["resample"] == 2
    r2 = load_retriever(str(out))
    assert r2.resample == "bilinear" and r2.identity == r.identity
    # a different filter is a different retriever identity (feature caches must not mix them)
    r3 = load_retriever(str(out), resample="bicubic")
    assert r3.resample == "bicubic" and r3.identity != r.identity


def test_plain_clip_folder_follows_its_processor(tiny_clip, odd_images, tmp_path):
    """A CLIP folder without retriever.json resizes with its preprocessor_config's filter."""
    import shutil

    r = load_retriever(str(tiny_clip))
    name = next(n for n in ("preprocessor_config.json", "processor_config.json") if (tiny_clip / n).is_file())
    full = json.loads((tiny_clip / name).read_text())
    cfg = full.get("image_processor", full)  # transformers 5 nests it in processor_config.json
    assert cfg.get("resample", 3) == 3 and r.resample == "bicubic"
    folder = tmp_path / "clip_bilinear"
    shutil.copytree(tiny_clip, folder)
    (folder / "retriever.json").unlink(missing_ok=True)
    cfg["resample"] = 2
    (folder / name).write_text(json.dumps(full))
    assert load_retriever(str(folder)).resample == "bilinear"
    cfg["resample"] = 0  # nearest: not a filter any of these models was trained with
    (folder / name).write_text(json.dumps(full))
    with pytest.raises(ValueError, match=f"{name} 'resample'"):
        load_retriever(str(folder))


def test_shipped_demo_retriever_keeps_bicubic_and_identity():
    """The demo retriever was trained with bicubic: same filter, same identity as when it was saved."""
    folder = Path(__file__).resolve().parents[1] / "demo_models" / "clip-synthpedes"
    if not folder.is_dir():
        pytest.skip("demo_models/clip-synthpedes is not in this checkout")
    r = load_retriever(str(folder))
    assert r.resample == "bicubic"
    assert r.identity == json.loads((folder / "retriever.json").read_text())["identity"]
