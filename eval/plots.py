"""Figures of the end-to-end THI run (matplotlib, Agg): metrics vs round (paper Fig. 6) with the
interactive-retrieval peers' metrics beside them, R1 against MLLM calls, λ sweep, ξ sweep (Fig. 5)
and top-10 strips before/after THI (Fig. 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

KEYS = ("R1", "R5", "R10", "mAP", "mINP")
# a Q x G matrix, or just the rows that are drawn (e.g. ``dict(zip(qs, result.score_rows(qs)))``)
Rows = Union[torch.Tensor, Mapping[int, torch.Tensor]]


def _finish(fig, ax, path: Path, title: str, label: str | None) -> Path:
    ax.set_title(title + (f"\n{label}" if label else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metrics_vs_round(base: dict, rounds: Sequence[dict], path: str | Path, label: str | None = None) -> Path:
    """Each metric for the base ranking (round 0 on the x axis) and after each THI round."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = list(range(len(rounds) + 1))
    for k in KEYS:
        ax.plot(xs, [base[k]] + [r[k] for r in rounds], marker="o", label=k)
    ax.set_xlabel("THI rounds done (0 = base ranking)")
    ax.set_ylabel("%")
    ax.set_xticks(xs)
    return _finish(fig, ax, Path(path), "Metrics vs THI round", label)


def peer_vs_round(peer: Sequence[dict], path: str | Path, label: str | None = None) -> Path:
    """Hits@K (cumulative) on the left axis, mFR and BRI (lower is better) on the right, per round."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [p["round"] for p in peer]
    for k in ("Hits@1", "Hits@5", "Hits@10"):
        ax.plot(xs, [p[k] for p in peer], marker="o", label=k)
    ax.set_xlabel("THI rounds done (0 = base ranking)")
    ax.set_ylabel("Hits@K (%)")
    ax.set_xticks(xs)
    right = ax.twinx()
    right.plot(xs, [p["mFR"] for p in peer], marker="s", ls="--", color="C3", label="mFR")
    right.plot(xs, [p["BRI"] for p in peer], marker="^", ls=":", color="C4", label="BRI")
    right.set_yscale("log")  # mFR runs to hundreds on real galleries, BRI stays a few units
    right.set_ylabel("mFR / BRI (lower is better, log)")
    right.legend(fontsize=8, loc="center right")
    return _finish(fig, ax, Path(path), "Interactive-retrieval metrics vs THI round", label)


def r1_vs_calls(base_r1: float, by_round: Sequence[dict], path: str | Path, label: str | None = None) -> Path:
    """R1 against the cumulative MLLM calls per query (T_loc + T_vqa + T_aggr), one point per round."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [0.0] + [c["cumulative_per_query"] for c in by_round]
    ys = [base_r1] + [c["R1"] for c in by_round]
    ax.plot(xs, ys, marker="o", label="R1")
    for x, y, r in zip(xs, ys, range(len(xs))):
        ax.annotate(str(r), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("MLLM calls per query (cumulative; labels: rounds)")
    ax.set_ylabel("R1 (%)")
    return _finish(fig, ax, Path(path), "R1 vs MLLM calls", label)


def sweep(xs: Sequence[float], metrics: Sequence[dict], path: str | Path, name: str, base: dict | None = None,
          label: str | None = None) -> Path:
    """R1 and mAP against a swept parameter (λ or ξ); the base ranking as dashed lines."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, c in (("R1", "C0"), ("mAP", "C1")):
        ax.plot(xs, [m[k] for m in metrics], marker="o", color=c, label=f"THI {k}")
        if base is not None:
            ax.axhline(base[k], color=c, ls="--", lw=1, label=f"base {k}")
    ax.set_xlabel(name)
    ax.set_ylabel("%")
    return _finish(fig, ax, Path(path), f"{name} sweep (after the last round)", label)


def topk_strips(
    before: Rows,
    after: Rows,
    queries: Sequence[int],
    query_texts: Sequence[str],
    query_pids: Sequence[int],
    gallery_paths: Sequence[str],
    gallery_pids: Sequence[int],
    path: str | Path,
    k: int = 10,
    label: str | None = None,
) -> Path:
    """For each query, its top-k before and after THI; green frame = same identity. ``before`` /
    ``after`` only need the rows of the drawn queries (``S[q]``), so a mapping of those rows does
    instead of a full Q x G matrix."""
    from PIL import Image

    queries = list(queries)
    fig, axes = plt.subplots(2 * len(queries), k, figsize=(k * 0.9, 2 * len(queries) * 1.75), squeeze=False)
    for qi, q in enumerate(queries):
        for row, (name, S) in enumerate((("before", before), ("after", after))):
            top = torch.sort(S[q], descending=True, stable=True).indices[:k].tolist()
            for j, g in enumerate(top):
                ax = axes[2 * qi + row][j]
                with Image.open(gallery_paths[g]) as im:
                    ax.imshow(im.convert("RGB"))
                ok = gallery_pids[g] == query_pids[q]
                for s in ax.spines.values():
                    s.set_edgecolor("green" if ok else "red")
                    s.set_linewidth(3)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(name, fontsize=7)
            if row == 0:
                text = query_texts[q]
                axes[2 * qi][0].set_title(f"q{q}: {text[:110]}{'...' if len(text) > 110 else ''}", fontsize=7,
                                          loc="left")
    fig.suptitle("Top-%d before / after THI (green = correct identity)%s" % (k, f"\n{label}" if label else ""),
                 fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.01, top=0.92, wspace=0.06, hspace=0.35)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def grid_heatmap(grid: Sequence[dict], path: str | Path, label: str | None = None,
                 metrics: Sequence[str] = ("R1", "mAP")) -> Path:
    """R1 and mAP over a ξ x τ grid (``results.json['tau_grid']``), one heat map per metric, each
    cell annotated; the best cell of each map is framed."""
    xis = sorted({e["xi"] for e in grid})
    taus = sorted({e["tau"] for e in grid})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 0.8, 0.45 * len(xis) + 1.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        val = {(e["xi"], e["tau"]): e[m] for e in grid}
        z = torch.tensor([[val.get((x, t), float("nan")) for t in taus] for x in xis])
        im = ax.imshow(z.numpy(), cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
        ax.set_yticks(range(len(xis)), [f"{x:g}" for x in xis])
        ax.set_xlabel("τ (accept when p_yes > τ)")
        ax.set_ylabel("ξ")
        best = int(torch.nan_to_num(z, nan=-1e9).argmax())
        bi, bj = divmod(best, len(taus))
        for i in range(len(xis)):
            for j in range(len(taus)):
                ax.text(j, i, f"{float(z[i, j]):.1f}", ha="center", va="center", fontsize=7,
                        color="black" if (i, j) == (bi, bj) else "white")
        ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_title(m, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("THI over ξ x τ" + (f"\n{label}" if label else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
