"""T_loc as one forward pass (issue 13): hf requests/s of ``localize`` (next-token logits, p_yes)
vs ``generate`` (greedy text), and the demo's THI run with p_yes vs text answers.

Part 1: 128 T_loc requests on SynthPEDES test images at batch 32, the same requests both ways,
for a tiny random Qwen2-VL (its greedy answers never stop before the 64-token T_loc cap, the worst
case for ``generate``) and the shipped SynthPEDES-VL (trained: answers "Yes"/"No" then stops, the
best case for ``generate``: one prefill and one decode step). Decisions must agree wherever the
greedy first token is a Yes/No token.

Part 2: ``eval.icl_end2end`` as ``make demo`` runs it (shipped CLIP retriever, shipped
SynthPEDES-VL through the hf backend, K = 5, ξ of the demo), three times, each with an empty
answer cache: T_loc as text only (``generate`` behind a wrapper that hides ``localize``: the code
before issue 13), as text + p_yes from the first generated step (the default), and as one forward
pass (``--loc-answer forward``). The table gives the T_loc stage, the whole run and whether the
rankings equal the text-only run's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import md_table


class TextOnly:
    """The backend without ``localize``: THI then asks T_loc through ``generate`` (text)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.kind, self.simulated = inner.kind, inner.simulated
        self.pixel_budget = getattr(inner, "pixel_budget", None)

    def identity(self):
        return {**self.inner.identity(), "bench": "text-only T_loc"}  # its own cache identity

    def generate(self, reqs):
        return self.inner.generate(reqs)

    def close(self):
        self.inner.close()


def _throughput(model: str, reqs, batch: int, label: str, adapter: Path | None = None) -> dict:
    from mllm_tune.core.backends import make_backend
    from mllm_tune.core.prompts import is_yes

    be = make_backend("hf", model=model, batch_size=batch, loc_answer="forward",  # the default T_loc cap (64 tokens)
                      adapter=adapter, adapter_tasks=("loc",) if adapter else None)
    be.localize(reqs[:2])
    be.generate(reqs[:2])  # load and warm up both paths outside the timing
    before = be.loc_first_not_yes_no
    t0 = time.perf_counter()
    scored = be.localize(reqs)
    t_fwd = time.perf_counter() - t0
    not_yes_no = be.loc_first_not_yes_no - before
    t0 = time.perf_counter()
    texts = be.generate(reqs)
    t_gen = time.perf_counter() - t0
    ids = be.yes_no()
    decided = [(a, t) for a, t in zip(scored, texts) if t[:3].lower() in ("yes", "no")]
    agree = sum((a.p_yes > 0.5) == is_yes(t) for a, t in decided)
    n = len(reqs)
    out = {"model": label, "requests": n, "batch": batch, "generate_s": round(t_gen, 3),
           "forward_s": round(t_fwd, 3), "generate_req_s": round(n / t_gen, 2), "forward_req_s": round(n / t_fwd, 2),
           "speedup": round(t_gen / t_fwd, 2), "first_token_not_yes_no": not_yes_no,
           "decided_by_text": len(decided), "agree": agree, "yes_no_ids": ids.as_dict()}
    be.close()
    return out


REPO = Path(__file__).resolve().parent.parent
DEMO_LORA = REPO / "runs" / "demo" / "lora"


def _demo_thi(tmp: Path, smoke: bool) -> list[dict]:
    from eval import icl_end2end
    from mllm_tune.core.backends import make_backend
    from synthpedes.demo_assets import DEMO_THI_XI, demo_model
    from synthpedes.dataset import generate

    data = tmp / "demo_syn"
    generate(data, num_ids=20 if smoke else 300, seed=0, progress=False)  # the demo's dataset
    vl, clip = str(demo_model("synthpedes-vl")), str(demo_model("clip-synthpedes"))
    rows = []
    results = {}
    modes = {"text (generate, before)": "generate", "p_yes + text (generate, default)": "generate",
             "p_yes (one forward pass)": "forward"}
    for mode, loc_answer in modes.items():
        lora = DEMO_LORA if (DEMO_LORA / "adapter_config.json").is_file() and not smoke else None
        inner = make_backend("hf", model=vl, max_new_tokens=160 if not smoke else 8, loc_answer=loc_answer,
                             adapter=lora, adapter_tasks=("loc",) if lora else None)
        be = TextOnly(inner) if mode.startswith("text") else inner
        argv = ["--dataset-root", str(data), "--dataset", "synthpedes", "--split", "test", "--retriever", clip,
                "--mllm", "hf", "--model", vl, "--xi", str(DEMO_THI_XI), "--out", str(tmp / f"run{len(rows)}"),
                "--no-plots", "--no-progress", "--xi-sweep", "--lambda-sweep"]
        if smoke:
            argv += ["--rounds", "2"]
        args = icl_end2end.build_parser().parse_args(argv)
        t0 = time.perf_counter()
        res = icl_end2end.run(args, backend=be)
        wall = time.perf_counter() - t0
        results[mode] = res
        ws = res["wall_seconds"]
        rows.append({"mode": mode, "adapter": str(lora.relative_to(REPO)) if lora else None, "loc_calls": res["calls"]["loc"], "thi_loc_s": ws["thi_loc"],
                     "thi_total_s": round(sum(ws[k] for k in ws if k.startswith("thi_")), 2), "run_s": round(wall, 2),
                     "R1": res["rounds"][-1]["R1"], "mAP": res["rounds"][-1]["mAP"]})
    ref = next(iter(results.values()))["rounds"]
    for r, res in zip(rows, results.values()):
        r["identical_rankings"] = res["rounds"] == ref
    return rows


def run(smoke: bool = False) -> dict:
    import torch

    from mllm_tune.core.backends import MLLMRequest
    from mllm_tune.core.pedes import load_split
    from mllm_tune.core.prompts import DEFAULT_PROMPTS as P
    from synthpedes.dataset import generate
    from synthpedes.demo_assets import demo_model
    from synthpedes.tiny import build_tiny

    torch.manual_seed(0)
    n, batch = (8, 4) if smoke else (128, 32)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        generate(tmp / "syn", num_ids=10 if smoke else 60, seed=0, progress=False)
        sv = load_split(tmp / "syn", "synthpedes", "test")
        Q, G = len(sv.query_texts), len(sv.gallery_paths)
        reqs = [MLLMRequest("loc", P.render_loc(sv.query_texts[i % Q]), sv.gallery_paths[(7 * i + 3) % G])
                for i in range(n)]
        tiny = build_tiny("qwen2_vl", tmp / "qwen")
        thr = [_throughput(str(tiny), reqs, batch, "tiny random Qwen2-VL"),
               _throughput(str(demo_model("synthpedes-vl")), reqs, batch, "shipped SynthPEDES-VL")]
        if (DEMO_LORA / "adapter_config.json").is_file() and not smoke:
            thr.append(_throughput(str(demo_model("synthpedes-vl")), reqs, batch, "SynthPEDES-VL + demo LoRA", DEMO_LORA))
        demo = _demo_thi(tmp, smoke)
    md = md_table(["model", "requests", "batch", "generate req/s", "forward req/s", "speed-up",
                   "first token not Yes/No", "agree (of text-decided)"],
                  [[r["model"], r["requests"], r["batch"], r["generate_req_s"], r["forward_req_s"], r["speedup"],
                    r["first_token_not_yes_no"], f"{r['agree']}/{r['decided_by_text']}"] for r in thr])
    md += ("\n\n`generate` runs to the 64-token T_loc cap on the random model (it never emits an end token) and stops "
           "after one decode step where the model answers a plain Yes/No (a batch decodes as long as its longest "
           "answer: the shipped model sometimes rambles, the LoRA-tuned one never does); `localize` (`loc_answer=\"forward\"`) is one forward pass with "
           "the LM head on the last position only, its answer constrained to Yes/No (p_yes > 0.5); 'first token not "
           "Yes/No' counts the answers where that differs from the greedy first token.\n\n")
    md += md_table(["THI T_loc mode", "T_loc calls", "T_loc s", "THI s (all stages)", "run s", "R1", "mAP",
                    "rankings = text-only run"],
                   [[r["mode"], r["loc_calls"], r["thi_loc_s"], r["thi_total_s"], r["run_s"], r["R1"], r["mAP"],
                     "yes" if r["identical_rankings"] else "NO"] for r in demo])
    adapter = demo[0]["adapter"]
    md += ("\n\nThe demo run: SynthPEDES test split (300 identities), shipped clip-synthpedes + SynthPEDES-VL "
           + (f"with the demo's LoRA ({adapter}, trained by `make demo`) on T_loc" if adapter else
              "without an adapter (`make demo` had not trained runs/demo/lora)") + ", hf backend, empty caches.")
    return {"title": "T_loc as one forward pass: hf localize vs generate, and the demo's THI (issue 13)",
            "markdown": md, "figures": {"throughput": thr, "demo_thi": demo}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    import json

    print(json.dumps(run(ap.parse_args().smoke)["figures"], indent=1, default=str))
