"""Our base and THI rows next to the paper's published ones, with the differences.

    python -m eval.compare_paper runs/icl_cuhk/results.json [--family rde|icl|clip] [--paper-dataset NAME]

The published Rank-1 / mAP (ICL, CVPR 2025, Table 1) live in ``eval/data/icl_cvpr2025_table1.json``
with their source. The dataset comes from the run (``config.target``, else ``config.dataset``);
the retriever family from its spec (``rde:`` -> RDE, a CLIP folder -> CLIP); ``--family icl``
says the RDE retriever was trained with RDA captions (Table 1's "ICL" rows). A run on another
dataset (SynthPEDES) is compared only when ``--paper-dataset`` names the table to set it beside,
and the output then says in its title that the data differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

TABLE_FILE = Path(__file__).resolve().parent / "data" / "icl_cvpr2025_table1.json"
METRICS = ("R1", "mAP")


def load_table(path: str | Path = TABLE_FILE) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def retriever_family(config: dict[str, Any]) -> str | None:
    spec = str(config.get("retriever", "")).lower()
    if spec.startswith("rde:"):
        return "rde"
    if spec.startswith("irra:"):
        return "irra"
    if str(config.get("retriever_identity", "")).startswith("clip-") or spec.startswith("clip:"):
        return "clip"
    return None


def compare(results: dict[str, Any], family: str | None = None, paper_dataset: str | None = None,
            table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows ``{"setting", "ours": {R1, mAP}, "paper": {R1, mAP} | None, "delta": {...} | None}``."""
    table = table or load_table()
    cfg = results.get("config", {})
    run_dataset = str(cfg.get("target") or cfg.get("dataset") or "").lower()
    dataset = (paper_dataset or run_dataset).lower()
    if dataset not in table["datasets"]:
        raise ValueError(f"the paper reports {', '.join(table['datasets'])}; this run is on '{run_dataset}': pass "
                         "--paper-dataset to set it beside one of them (the title will say the data differ)")
    family = family or retriever_family(cfg)
    if family not in table["pairs"]:
        raise ValueError(f"no published row for retriever family '{family}' (spec {cfg.get('retriever')}); the paper "
                         f"has {', '.join(table['pairs'])}: pass --family")
    names = table["pairs"][family]
    published = table["datasets"][dataset]
    last = results["rounds"][-1] if results.get("rounds") else None
    rows = []
    for stage, ours in (("base", results["base"]), ("thi", last)):
        if ours is None:
            continue
        name = names[stage]
        paper = published.get(name) if name else None
        ours_m = {m: round(float(ours[m]), 2) for m in METRICS}
        rows.append({
            "setting": f"ours: {'base' if stage == 'base' else 'THI, ' + str(ours['round']) + ' rounds'}",
            "paper_setting": name or "(not published)",
            "ours": ours_m,
            "paper": paper,
            "delta": {m: round(ours_m[m] - paper[m], 2) for m in METRICS} if paper else None,
        })
    gain = None
    if len(rows) == 2:
        ours_gain = {m: round(rows[1]["ours"][m] - rows[0]["ours"][m], 2) for m in METRICS}
        paper_gain = ({m: round(rows[1]["paper"][m] - rows[0]["paper"][m], 2) for m in METRICS}
                      if rows[0]["paper"] and rows[1]["paper"] else None)
        gain = {"ours": ours_gain, "paper": paper_gain}
    same_data = dataset == run_dataset
    title = (f"{dataset}: ours vs ICL (CVPR 2025) Table 1" if same_data else
             f"{run_dataset} run set beside the paper's {dataset} numbers (DIFFERENT DATA: not a reproduction)")
    return {"title": title, "dataset": dataset, "run_dataset": run_dataset, "family": family,
            "same_data": same_data, "source": table["source"], "rows": rows, "thi_gain": gain}


def to_markdown(cmp: dict[str, Any]) -> str:
    lines = [f"### {cmp['title']}", "",
             "| ours | paper row | R1 ours | R1 paper | Δ R1 | mAP ours | mAP paper | Δ mAP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        p, d = r["paper"] or {}, r["delta"] or {}
        cell = lambda v: "—" if v is None else f"{v:.2f}" if not isinstance(v, str) else v  # noqa: E731
        sign = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
        lines.append(f"| {r['setting']} | {r['paper_setting']} | {cell(r['ours']['R1'])} | {cell(p.get('R1'))} | "
                     f"{sign(d.get('R1'))} | {cell(r['ours']['mAP'])} | {cell(p.get('mAP'))} | {sign(d.get('mAP'))} |")
    g = cmp.get("thi_gain")
    if g:
        paper = (f"; paper R1 {g['paper']['R1']:+.2f}, mAP {g['paper']['mAP']:+.2f}" if g["paper"] else
                 "; the paper has no THI row for this retriever")
        lines += ["", f"Gain from THI: ours R1 {g['ours']['R1']:+.2f}, mAP {g['ours']['mAP']:+.2f}{paper}."]
    lines += ["", f"Published numbers: {cmp['source']}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.compare_paper", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json written by eval.icl_end2end")
    ap.add_argument("--family", choices=("clip", "rde", "icl"), default=None,
                    help="retriever family (default: from the run's retriever spec; 'icl' = RDE trained with RDA)")
    ap.add_argument("--paper-dataset", choices=("cuhk-pedes", "icfg-pedes", "rstpreid"), default=None,
                    help="the paper's dataset to compare with (needed when the run is on other data)")
    ap.add_argument("--json", default=None, help="also write the comparison here")
    args = ap.parse_args(argv)
    path = Path(args.results)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        cmp = compare(results, args.family, args.paper_dataset)
    except FileNotFoundError:
        print(f"error: {path} does not exist: pass the results.json of an eval.icl_end2end run", file=sys.stderr)
        return 1
    except (json.JSONDecodeError, KeyError) as exc:
        print(f"error: {path} is not a complete eval.icl_end2end results.json ({exc}); rerun the evaluation",
              file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    print(to_markdown(cmp), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(cmp, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
