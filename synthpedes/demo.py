"""The README's main command (`make demo`): the users' real flow, on SynthPEDES, on a CPU.

1. generate SynthPEDES (`python -m synthpedes.dataset`);
2. mine Z+/Z- anchor-localization pairs from its training split with the shipped CLIP
   retriever (`python -m data_builders.anchor_pairs`);
3. LoRA-tune the shipped SynthPEDES-VL on those pairs (`mllm_tune/sft.py`, recipe
   `recipes/demo_lora.yaml`), measuring held-out Yes/No accuracy before and after;
4. run the full retrieval + THI loop with the LoRA-tuned model (`python -m eval.icl_end2end`,
   hf backend) on the test split and print the paper-style table.

Every stage is the same command a user runs; this module only wires them together and writes
``OUT/summary.json``. Stages whose output exists are reused (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("synthpedes.demo")

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_lora.yaml"


def _stage(n: int, total: int, title: str) -> float:
    print(f"\n=== [{n}/{total}] {title} ===", flush=True)
    return time.perf_counter()


def _yesno_history(sft_out: Path, key: str = "eval_yesno_accuracy") -> tuple[float | None, float | None]:
    """A held-out Yes/No metric at the first and the last evaluation of the SFT run."""
    record = json.loads((sft_out / "sft_metrics.json").read_text())
    vals = [h[key] for h in record["log_history"] if key in h]
    final = record["metrics"].get(key)
    return (vals[0] if vals else None), (final if final is not None else (vals[-1] if vals else None))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from synthpedes.demo_assets import demo_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vl = args.mllm_model or str(demo_model("synthpedes-vl"))
    clip = args.retriever or str(demo_model("clip-synthpedes"))
    data, pairs, lora, e2e = out / "synthpedes", out / "pairs", out / "lora", out / "icl_end2end"
    summary: dict[str, Any] = {"models": {"mllm": vl, "retriever": clip}, "seconds": {}}
    total = 4

    t = _stage(1, total, "SynthPEDES: generate the dataset")
    from synthpedes.dataset import format_stats, generate, statistics

    if not (data / "stats.json").is_file():
        generate(data, num_ids=args.num_ids, seed=args.seed)
    stats = statistics(data)
    print(format_stats(stats, data))
    summary["synthpedes"] = stats
    summary["seconds"]["synthpedes"] = round(time.perf_counter() - t, 1)

    t = _stage(2, total, "Z+/Z- anchor-localization pairs from the training split (shipped CLIP retriever)")
    from data_builders import anchor_pairs

    if not (pairs / "stats.json").is_file():
        anchor_pairs.main([
            "--dataset-root", str(data), "--dataset", "synthpedes", "--retriever", clip, "--out", str(pairs),
            "--top-k", "10", "--yes-no-ratio", "1.0", "--max-pairs", str(args.max_pairs),
            "--eval-fraction", "0.15", "--seed", str(args.seed),
        ])
    summary["pairs"] = json.loads((pairs / "stats.json").read_text())
    summary["seconds"]["pairs"] = round(time.perf_counter() - t, 1)

    t = _stage(3, total, "LoRA SFT of SynthPEDES-VL on the pairs (mllm_tune/sft.py)")
    from mllm_tune import sft

    if not (lora / "adapter_config.json").is_file():
        sft.main([str(RECIPE), "--model_name_or_path", vl, "--dataset_name", str(pairs), "--output_dir", str(lora),
                  "--max_steps", str(args.sft_steps)])
    before, after = _yesno_history(lora)
    summary["anchor_localization_accuracy"] = {"shipped_model": before, "lora_tuned": after,
                                               "held_out": "identities of the training split held out by the miner"}
    # p_yes as a ranking score: a LoRA can order pairs better before its argmax accuracy moves
    auc0, auc1 = _yesno_history(lora, "eval_yesno_auc")
    summary["anchor_localization_auc"] = {"shipped_model": auc0, "lora_tuned": auc1,
                                          "score": "p_yes at the first answer token (ROC-AUC)"}
    summary["seconds"]["sft"] = round(time.perf_counter() - t, 1)

    t = _stage(4, total, "ICL end to end: retrieval + THI with the LoRA-tuned model (hf backend)")
    from eval import icl_end2end

    res = icl_end2end.main([
        "--dataset-root", str(data), "--dataset", "synthpedes", "--split", "test",
        "--retriever", clip, "--mllm", "hf", "--model", vl, "--adapter", str(lora), "--adapter-only-loc",
        "--max-new-tokens", str(args.max_new_tokens), "--xi", str(args.xi), "--out", str(e2e),
    ])
    summary["thi"] = {"xi": args.xi, "base": res["base"], "rounds": res["rounds"], "calls": res["calls"],
                      "xi_sweep": res.get("xi_sweep")}
    summary["seconds"]["icl_end2end"] = round(time.perf_counter() - t, 1)
    summary["seconds"]["total"] = round(sum(summary["seconds"].values()), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary))
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%" if x <= 1 else f"{x:.1f}%"


def format_summary(s: dict[str, Any]) -> str:
    acc = s["anchor_localization_accuracy"]
    auc = s.get("anchor_localization_auc", {})
    base, last = s["thi"]["base"], s["thi"]["rounds"][-1]
    lines = [
        "",
        "=== demo summary ===",
        f"held-out anchor-localization (Yes/No) accuracy: shipped SynthPEDES-VL {_fmt(acc['shipped_model'])}"
        f" -> LoRA-tuned {_fmt(acc['lora_tuned'])}"
        + (f"; ROC-AUC of p_yes {auc['shipped_model']:.3f} -> {auc['lora_tuned']:.3f}"
           if auc.get("shipped_model") is not None and auc.get("lora_tuned") is not None else ""),
        f"retrieval on the SynthPEDES test split: R1 {base['R1']:.2f} -> {last['R1']:.2f} (THI, {len(s['thi']['rounds'])} rounds),"
        f" mAP {base['mAP']:.2f} -> {last['mAP']:.2f} (ξ {s['thi'].get('xi', 'n/a')})",
        f"wall time: {s['seconds']['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in s['seconds'].items() if k != 'total')})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from synthpedes.demo_assets import DEMO_THI_XI

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="working folder for the demo's data, adapter and results")
    ap.add_argument("--num-ids", type=int, default=300, help="SynthPEDES identities")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pairs", type=int, default=2000, help="cap on mined pairs (Yes:No 1:1)")
    ap.add_argument("--sft-steps", type=int, default=120, help="LoRA optimisation steps")
    ap.add_argument("--mllm-model", default=None, help="MLLM folder (default: the shipped SynthPEDES-VL)")
    ap.add_argument("--retriever", default=None, help="retriever spec (default: the shipped clip-synthpedes)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="generation budget of T_vqa/T_aggr answers")
    ap.add_argument("--xi", type=float, default=DEMO_THI_XI,
                    help="THI confidence gate ξ (default: calibrated for the shipped retriever on the val split)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
