"""Scores between query and gallery features, and a top-k that never holds the full matrix.

Tie rule (shared with ``mllm_tune.core.metrics``): equal scores are ordered by ascending gallery index.
"""

from __future__ import annotations

import torch


def similarity(text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
    """queries x gallery scores: the dot product of (already normalised) feature rows."""
    if text_feats.dim() != 2 or image_feats.dim() != 2:
        raise ValueError(f"features must be 2-D (rows x dim), got {tuple(text_feats.shape)} and {tuple(image_feats.shape)}")
    if text_feats.shape[1] != image_feats.shape[1]:
        raise ValueError(f"feature widths differ: texts {text_feats.shape[1]}, images {image_feats.shape[1]}; "
                         "were they encoded by the same retriever?")
    return text_feats.float() @ image_feats.float().T


def _stable_topk(scores: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a stable descending sort keeps earlier columns first among equal scores; columns are kept
    # in ascending gallery order by the caller, so ties go to the lower gallery index
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), idx.gather(1, order)


def topk_chunked(
    text_feats: torch.Tensor,
    image_feats: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    gallery_chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery entries of every query: (values, indices), each queries x k.

    Works on blocks of ``chunk_size`` queries x ``gallery_chunk_size`` images, merging a running
    top-k, so memory stays at one block whatever the split size. ``k`` larger than the gallery is
    cut to the gallery size.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if chunk_size < 1 or gallery_chunk_size < 1:
        raise ValueError("chunk sizes must be positive")
    nq, ng = text_feats.shape[0], image_feats.shape[0]
    if text_feats.dim() != 2 or image_feats.dim() != 2 or text_feats.shape[1] != image_feats.shape[1]:
        similarity(text_feats[:0], image_feats[:0])  # raises the descriptive error
    k = min(k, ng)
    vals = torch.empty(nq, k, dtype=torch.float32)
    inds = torch.empty(nq, k, dtype=torch.long)
    if nq == 0 or k == 0:
        return vals, inds
    img = image_feats.float()
    for qs in range(0, nq, chunk_size):
        q = text_feats[qs:qs + chunk_size].float()
        best_v = torch.empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long)
        for gs in range(0, ng, gallery_chunk_size):
            block = q @ img[gs:gs + gallery_chunk_size].T
            cols = torch.arange(gs, gs + block.shape[1]).expand(q.shape[0], -1)
            # running best (lower gallery indices) first, then this block: ties keep the lower index
            best_v, best_i = _stable_topk(torch.cat([best_v, block], 1), torch.cat([best_i, cols], 1), k)
        vals[qs:qs + q.shape[0]] = best_v
        inds[qs:qs + q.shape[0]] = best_i
    return vals, inds
