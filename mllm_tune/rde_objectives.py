"""RDE's training signals: per-sample TAL, the consensus clean-pair selection, and the
noisy-correspondence protocol used to test it (SPEC §6, §8).

- :func:`tal_per_sample`: TAL for every pair of a batch, image->text plus text->image. For an
  anchor, positives are the batch items of its identity, weighted by a softmax of their own
  scores at temperature tau (weights detached); negatives enter through tau * logsumexp(s / tau);
  loss = max(0, margin - positive + negative). RDE trains on sum_i clean_i * loss_i per head.
- :func:`gmm_clean_probability`: per-sample losses min-max normalised, a two-component 1-D
  Gaussian mixture fitted by EM, and the posterior of the component with the smaller mean
  (small loss = probably a clean pair). :func:`split_clean` thresholds it at 0.5, with the
  release's guard that at least 1% of pairs count as noisy.
- :func:`consensus`: a pair is clean for training when both heads (BGE and TSE) call it clean.
  When they disagree the released code flips a fair coin (``disagreement="coin"``);
  ``disagreement="noisy"`` drops those pairs instead.
- :func:`inject_noise`: the RDE protocol: a seeded permutation moves the captions of a fraction
  of pairs onto other pairs' images (so caption i is used with the image of pair j); the index
  array is what RDE saves as its noise index files and can be read back from one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mllm_tune.core.clean_set import CLEAN_FILE, CLEAN_FORMAT, read_clean_set  # noqa: F401 - re-exported

_FAR = -1e4  # "excluded" logit: finite, so a row without negatives has zero loss and gradient


def tal_per_sample(sim: torch.Tensor, pids: torch.Tensor, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """Per-pair TAL of a batch; ``sim`` is images x texts (row i and column i are pair i)."""
    same = pids.view(-1, 1) == pids.view(1, -1)
    total = sim.new_zeros(sim.shape[0])
    for s in (sim, sim.T):
        w = (s / tau).masked_fill(~same, _FAR).softmax(dim=1).detach()
        pos = (w * s).sum(dim=1)
        neg = tau * torch.logsumexp((s / tau).masked_fill(same, _FAR), dim=1)
        total = total + (margin - pos + neg).clamp(min=0)
    return total


def weighted_tal(sim: torch.Tensor, pids: torch.Tensor, clean: torch.Tensor, tau: float = 0.015,
                 margin: float = 0.1) -> torch.Tensor:
    """sum_i clean_i * TAL_i (RDE sums, it does not average)."""
    return (clean.to(sim.dtype) * tal_per_sample(sim, pids, tau, margin)).sum()


def gmm_clean_probability(losses: torch.Tensor, iters: int = 10, tol: float = 1e-2, reg: float = 5e-4) -> torch.Tensor:
    """P(low-loss component | loss) for every sample (the defaults are the release's for low noise;
    it uses 100 iterations, tol 1e-4, reg 1e-6 above 40% noise and on RSTPReid)."""
    x = losses.detach().double().flatten()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    # start from a two-way split at the median: means of each half, one shared variance
    med = x.median()
    lo, hi = x[x <= med], x[x > med]
    mu = torch.stack([lo.mean(), hi.mean() if len(hi) else lo.mean() + 1e-3])
    var = torch.full((2,), float(x.var()) + reg, dtype=x.dtype)
    pi = torch.tensor([0.5, 0.5], dtype=x.dtype)
    prev = None
    for _ in range(iters):
        logp = (-0.5 * ((x[:, None] - mu) ** 2 / var + torch.log(2 * torch.pi * var))) + torch.log(pi)
        ll = torch.logsumexp(logp, dim=1)
        resp = (logp - ll[:, None]).exp()
        nk = resp.sum(dim=0).clamp(min=1e-12)
        pi = nk / len(x)
        mu = (resp * x[:, None]).sum(dim=0) / nk
        var = (resp * (x[:, None] - mu) ** 2).sum(dim=0) / nk + reg
        mean_ll = float(ll.mean())
        if prev is not None and abs(mean_ll - prev) < tol:
            break
        prev = mean_ll
    logp = (-0.5 * ((x[:, None] - mu) ** 2 / var + torch.log(2 * torch.pi * var))) + torch.log(pi)
    resp = (logp - torch.logsumexp(logp, dim=1, keepdim=True)).exp()
    return resp[:, int(mu.argmin())].float()


def split_clean(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """prob > threshold; when that calls every pair clean, the lowest 1% count as noisy (release)."""
    if float(prob.min()) > threshold:
        threshold = float(prob.sort().values[len(prob) // 100])
    return prob > threshold


@dataclass
class Consensus:
    clean_bge: torch.Tensor
    clean_tse: torch.Tensor
    clean: torch.Tensor  # what training uses

    def fractions(self) -> dict[str, float]:
        return {"bge": float(self.clean_bge.float().mean()), "tse": float(self.clean_tse.float().mean()),
                "agreed": float((self.clean_bge & self.clean_tse).float().mean()),
                "used": float(self.clean.float().mean())}


def consensus(loss_bge: torch.Tensor, loss_tse: torch.Tensor, disagreement: str = "coin",
              generator: torch.Generator | None = None, **gmm: float) -> Consensus:
    a = split_clean(gmm_clean_probability(loss_bge, **gmm))
    b = split_clean(gmm_clean_probability(loss_tse, **gmm))
    both = a & b
    if disagreement == "coin":
        coin = torch.randint(0, 2, a.shape, generator=generator).bool()
        clean = both | ((a ^ b) & coin)
    elif disagreement == "noisy":
        clean = both
    else:
        raise ValueError(f"disagreement must be 'coin' (released) or 'noisy', not {disagreement!r}")
    return Consensus(a, b, clean)


def inject_noise(num_pairs: int, rate: float, seed: int = 0, index_file: str | Path | None = None) -> np.ndarray:
    """Caption index used by each pair: identity except for a ``rate`` fraction, permuted among
    themselves (seeded); read from ``index_file`` (an RDE noise-index .npy) when it is given."""
    if index_file is not None:
        idx = np.load(index_file)
        if idx.shape != (num_pairs,) or idx.min() < 0 or idx.max() >= num_pairs:
            raise ValueError(f"noise index file {index_file} has shape {idx.shape} / range "
                             f"[{idx.min()}, {idx.max()}], expected ({num_pairs},) indices of this training split")
        return idx.astype(np.int64)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate {rate} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    idx = np.arange(num_pairs)
    chosen = rng.permutation(num_pairs)[: int(rate * num_pairs)]
    idx[chosen] = rng.permutation(chosen)
    return idx


def clean_set_quality(clean: torch.Tensor | np.ndarray, truly_clean: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Precision and recall of the selected clean set against the known clean pairs."""
    sel = np.asarray(clean, dtype=bool)
    truth = np.asarray(truly_clean, dtype=bool)
    tp = int((sel & truth).sum())
    return {"precision": tp / max(int(sel.sum()), 1), "recall": tp / max(int(truth.sum()), 1),
            "selected": float(sel.mean()), "truly_clean": float(truth.mean())}


# -- the clean set on disk (what the miner reads) -----------------------------------------------



def write_clean_set(path: str | Path, clean: torch.Tensor | np.ndarray, caption_of_pair: Sequence[int] | np.ndarray,
                    **info) -> Path:
    """Save a consensus selection as JSON: ``pair_indices`` (training pairs judged clean; pair i is
    the i-th caption of the split in annotation order with its own image, or with the caption
    ``caption_of_pair[i]`` when noise was injected), ``caption_indices`` (the captions those pairs
    use: indices into ``SplitView.query_texts``), ``num_pairs`` and any extra ``info``."""
    import json

    sel = np.asarray(clean, dtype=bool)
    cap = np.asarray(caption_of_pair, dtype=np.int64)
    if cap.shape != sel.shape:
        raise ValueError(f"clean mask has {sel.shape[0]} pairs but caption_of_pair has {cap.shape[0]}")
    pairs = np.flatnonzero(sel)
    blob = {"format": CLEAN_FORMAT, "num_pairs": int(sel.shape[0]), "num_clean": int(len(pairs)),
            **info, "pair_indices": pairs.tolist(), "caption_indices": sorted(set(cap[pairs].tolist()))}
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(blob), encoding="utf-8")
    tmp.replace(path)
    return path


def rde_loss(sims: dict[str, torch.Tensor], pids: torch.Tensor, clean: torch.Tensor, gamma: float = 0.0,
             tau: float = 0.015, margin: float = 0.1) -> dict[str, torch.Tensor]:
    """RDE's batch loss (+ the ICL RDA term): ``sims`` holds images x texts cosine matrices
    ``bge``, ``tse`` and optionally ``rda_bge``, ``rda_tse`` (the RDA text under each head).
    match = sum_i clean_i (TAL_bge_i + TAL_tse_i); rda = the same on the RDA text;
    total = match + gamma * rda."""
    match = weighted_tal(sims["bge"], pids, clean, tau, margin) + weighted_tal(sims["tse"], pids, clean, tau, margin)
    if "rda_bge" in sims:
        rda = weighted_tal(sims["rda_bge"], pids, clean, tau, margin) + weighted_tal(sims["rda_tse"], pids, clean, tau, margin)
    else:
        rda = match.new_zeros(())
    return {"loss": match + gamma * rda, "match": match, "rda": rda}
