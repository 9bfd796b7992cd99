"""Z+/Z- miner (data_builders.mining.mine) at CUHK-PEDES train size, random 512-d features.

CUHK-PEDES train: 11,003 identities, 34,054 images, 68,108 captions (2 per image). Features are
random unit vectors of CLIP ViT-B/16's width (512); the features themselves (210 MB) are set up
before the measurement, so peak memory is what mining adds on top of them.

Side by side on a slice of the captions (same images): the miner vs the straightforward way,
one full captions x images score matrix, then top-k and ranks on it; and the retriever package's
stable-sort ``topk_chunked`` (top-k only).
"""

from __future__ import annotations

import logging

import data_builders.mining  # noqa: F401 - imported before the timed calls (spawned children too)
from bench import measure, md_table

logger = logging.getLogger(__name__)

FULL = {"captions": 68108, "images": 34054, "ids": 11003, "dim": 512}
SLICE_CAPTIONS = 8192
SMOKE = {"captions": 600, "images": 300, "ids": 100, "dim": 32}


def make_features(captions: int, images: int, ids: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    image_pids = torch.arange(images) % ids
    caption_image = torch.arange(captions) % images
    caption_pids = image_pids[caption_image]
    img = torch.nn.functional.normalize(torch.randn(images, dim, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(captions, dim, generator=g), dim=1)
    return txt, img, caption_pids, image_pids, caption_image


def make_features_warm(captions: int, images: int, ids: int, dim: int, seed: int = 0):
    """make_features, with the retriever package imported during set-up (not timed)."""
    import mllm_tune.core.retrievers.similarity  # noqa: F401 - pulls in transformers

    return make_features(captions, images, ids, dim, seed)


def _mine(state):
    from data_builders.mining import MiningOptions, mine

    pairs, stats = mine(*state, MiningOptions(top_k=10, negatives_per_caption=1), progress=False)
    return {"pairs": len(pairs), "yes": stats["yes"], "no": stats["no"]}


def _full_matrix(state):
    """The plain way: the whole score matrix, top-k, and the own image's rank."""
    txt, img, cp, ip, ci = state
    s = txt @ img.T
    top = s.topk(10, dim=1).indices
    own = s.gather(1, ci[:, None])
    rank = (s > own).sum(1)
    neg = ip[top] != cp[:, None]
    return {"pairs": int(len(cp) + neg.any(1).sum()), "median_rank": float(rank.float().median())}


def _topk_chunked(state):
    """The retriever package's stable top-k (sorts blocks of 1,024 x 8,192 scores)."""
    from mllm_tune.core.retrievers.similarity import topk_chunked

    txt, img, cp, ip, ci = state
    _, top = topk_chunked(txt, img, 10)
    return {"pairs": int(len(cp) + (ip[top] != cp[:, None]).any(1).sum())}


def run(smoke: bool = False) -> dict:
    size = SMOKE if smoke else FULL
    n_slice = SMOKE["captions"] // 2 if smoke else SLICE_CAPTIONS
    logger.info("mining bench: full size %s", size)
    iso = not smoke  # smoke: in-process, and without the transformers-importing candidate
    full = measure(make_features, _mine, *size.values(), isolate=iso)
    gb_full_matrix = size["captions"] * size["images"] * 4 / 2**30
    logger.info("mining bench: side by side on %d captions", n_slice)
    ours = measure(make_features, _mine, n_slice, size["images"], size["ids"], size["dim"], isolate=iso)
    plain = measure(make_features, _full_matrix, n_slice, size["images"], size["ids"], size["dim"], isolate=iso)
    stable = (measure(make_features_warm, _topk_chunked, n_slice, size["images"], size["ids"], size["dim"])
              if not smoke else {"seconds": float("nan"), "peak_mb": float("nan")})
    figures = {
        "full": {**size, "seconds": full["seconds"], "peak_mb": full["peak_mb"], "pairs": full["result"]["pairs"],
                 "full_matrix_gb_not_built": gb_full_matrix},
        "slice": {"captions": n_slice, "images": size["images"], "ours_s": ours["seconds"],
                  "plain_s": plain["seconds"], "ours_peak_mb": ours["peak_mb"], "plain_peak_mb": plain["peak_mb"],
                  "memory_ratio": plain["peak_mb"] / max(ours["peak_mb"], 1e-9),
                  "time_ratio": plain["seconds"] / ours["seconds"],
                  "topk_chunked_s": stable["seconds"], "topk_chunked_peak_mb": stable["peak_mb"]},
    }
    md = md_table(
        ["run", "captions x images", "seconds", "peak MB above features", "note"],
        [
            ["miner, full train split", f"{size['captions']:,} x {size['images']:,}", full["seconds"], full["peak_mb"],
             f"{full['result']['pairs']:,} pairs; a full score matrix would be {gb_full_matrix:.1f} GB"],
            ["miner, slice", f"{n_slice:,} x {size['images']:,}", ours["seconds"], ours["peak_mb"], ""],
            ["full matrix, slice", f"{n_slice:,} x {size['images']:,}", plain["seconds"], plain["peak_mb"],
             f"memory {figures['slice']['memory_ratio']:.1f}x, time {figures['slice']['time_ratio']:.2f}x the miner's"],
            ["retrievers.topk_chunked, slice", f"{n_slice:,} x {size['images']:,}", stable["seconds"],
             stable["peak_mb"], f"top-k only (no ranks); time {stable['seconds'] / ours['seconds']:.1f}x the miner's"],
        ],
    )
    md += (
        f"\n\nRandom unit features of width {size['dim']}; top-k = 10, one Z+ and one Z- per caption. The miner "
        "scores 1,024 captions at a time and keeps only top-k indices and ranks (`data_builders/mining.py`)."
    )
    return {"title": "Mining Z+/Z- at CUHK-PEDES train size", "markdown": md, "figures": figures}
