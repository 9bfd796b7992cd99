"""hf backend generation: batched (left padding) vs one request at a time.

A tiny random Qwen2-VL on CPU answers T_loc requests on SynthPEDES images (greedy, 4 new tokens).
Both runs use the same requests; answers must be identical. Tiny models understate the gain a
GPU gets from batching a 7B model, but the code path is the one used at scale.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import md_table


def run(smoke: bool = False) -> dict:
    from mllm_tune.core.pedes import load_split
    from synthpedes.dataset import generate
    from mllm_tune.core.backends import MLLMRequest, make_backend
    from mllm_tune.core.prompts import DEFAULT_PROMPTS as P
    from synthpedes.tiny import build_tiny

    n = 8 if smoke else 128
    sizes = (1, 4) if smoke else (1, 8, 32)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        generate(tmp / "syn", num_ids=10 if smoke else 60, seed=0, progress=False)
        sv = load_split(tmp / "syn", "synthpedes", "test")
        model = build_tiny("qwen2_vl", tmp / "qwen")
        reqs = [MLLMRequest("loc", P.render_loc(sv.query_texts[i % len(sv.query_texts)]),
                            sv.gallery_paths[(i * 7) % len(sv.gallery_paths)]) for i in range(n)]
        rows, answers = [], {}
        for bs in sizes:
            be = make_backend("hf", model=model, max_new_tokens=4, batch_size=bs)
            be.generate(reqs[:2])  # load and warm up outside the timing
            t0 = time.perf_counter()
            answers[bs] = be.generate(reqs)
            dt = time.perf_counter() - t0
            rows.append({"batch_size": bs, "requests": n, "seconds": round(dt, 3), "req_per_s": round(n / dt, 2)})
    one = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_one"] = round(one / r["seconds"], 2)
    same = all(a == answers[sizes[0]] for a in answers.values())
    md = md_table(["batch size", "requests", "seconds", "requests/s", "speed-up vs one at a time"],
                  [[r["batch_size"], r["requests"], r["seconds"], r["req_per_s"], r["speedup_vs_one"]] for r in rows])
    md += f"\n\nAnswers identical across batch sizes: {'yes' if same else 'NO'}."
    return {"title": "hf backend: batched vs one-at-a-time generation", "markdown": md,
            "figures": {"rows": rows, "identical_answers": same}}
