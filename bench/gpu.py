"""What users care about on a GPU, in one command: ``python -m bench.gpu``.

Random-weight models at the real shapes (Qwen2-VL-7B-Instruct's config; the retriever side is
SynthPEDES-sized data), built offline on the machine, then:

- ``sft``: LoRA SFT through ``mllm_tune/sft.py`` (bf16, the paper's recipe values, DeepSpeed
  ZeRO-2 through accelerate on one GPU, and on all GPUs when there are several), gradient
  checkpointing on and off: samples/s, tokens/s, peak GPU memory, MFU;
- ``tloc``: T_loc requests/s of the hf backend and (when vLLM imports) the vllm backend at batch
  sizes 32 / 128 / 512;
- ``thi``: a whole THI run (K = 5) at about CUHK-PEDES test size with the vllm backend: wall time
  per stage, MLLM calls, peak GPU memory, and whether the engine starts inside a 24 GB budget;
- ``metrics``: rank metrics at ICFG-PEDES size and Z+/Z- mining at CUHK-PEDES train size on the GPU.

Writes ``bench/RESULTS-gpu.md`` (machine, versions, command, every figure) and
``bench/results-gpu.json``. Without a CUDA device it prints one line and exits 0;
``--cpu-smoke`` runs every section at toy shapes on the CPU (what the test suite does, to know
that the command starts). Each section runs on its own and a failing one is reported, not fatal.

MFU counts 4 N FLOPs per trained token for LoRA on a frozen base (forward 2 N, backward through
activations 2 N, no weight-gradient matmuls of the frozen weights; the recomputation of gradient
checkpointing is not counted as useful work), N = the language model's parameters, against the
GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOPS; A100: 312; override with --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.gpu")

# Qwen2-VL-7B-Instruct's config.json values (text and vision), built with random weights
QWEN2_VL_7B = {
    "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
# toy shapes for --cpu-smoke (same code paths)
TOY = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5]}},
    "vision": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 1, "mlp_ratio": 2,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
SECTIONS = ("sft", "tloc", "thi", "metrics")


# -- helpers -----------------------------------------------------------------------------------

class GPUMemoryPoller:
    """Peak memory.used of all GPUs (MiB) over a block, by nvidia-smi: it sees subprocesses too."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, sum(int(x) for x in out.split() if x.strip().isdigit()))
            except (OSError, subprocess.SubprocessError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "GPUMemoryPoller":
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(timeout=15)


def machine(cuda: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "trl", "accelerate", "deepspeed", "vllm"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just reported
            info[pkg] = None
    if cuda:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build_model(out: Path, shapes: dict[str, dict], device: str) -> Path:
    """A random-weight Qwen2-VL at ``shapes`` with the project's tokenizer and processor (the
    tokenizer of a tiny model: its ids fit any vocabulary; the processor has the real patch 14 /
    merge 2 and the paper's 50,176-pixel budget)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from synthpedes.tiny import build_tiny

    tiny = build_tiny("qwen2_vl", out / "_tiny")
    cfg = AutoConfig.from_pretrained(tiny)
    for k, v in shapes["text"].items():
        setattr(cfg.text_config, k, v)
    for k, v in shapes["vision"].items():
        setattr(cfg.vision_config, k, v)
    cfg.vision_config.hidden_size = cfg.text_config.hidden_size
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config = AutoModelForImageTextToText.from_pretrained(tiny).generation_config
    model.save_pretrained(out)
    proc = AutoProcessor.from_pretrained(tiny)
    proc.image_processor.size = {"shortest_edge": 50176, "longest_edge": 50176}
    proc.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def language_params(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for n, p in m.named_parameters() if "visual" not in n)


def dataset(out: Path, num_ids: int) -> Path:
    from synthpedes.dataset import generate

    if not (out / "reid_raw.json").is_file():
        generate(out, num_ids=num_ids, seed=0)
    return out


def pairs_file(root: Path, out: Path, n: int) -> Path:
    """T_loc rows in TRL's vision format from SynthPEDES train captions (half with another image)."""
    from mllm_tune.core.pedes import load_pedes
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    split = load_pedes(root, "synthpedes").split("train")
    rows = []
    for i in range(n):
        q = i % len(split.query_texts)
        img = split.query_image_index[q] if i % 2 == 0 else (split.query_image_index[q] + 7) % len(split.gallery_paths)
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": DEFAULT_PROMPTS.render_loc(split.query_texts[q])}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "Yes" if i % 2 == 0 else "No"}]}],
                     "images": [str(split.gallery_paths[img])]})
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


# -- sections ----------------------------------------------------------------------------------

def section_sft(ctx: dict[str, Any]) -> dict[str, Any]:
    smoke, model = ctx["smoke"], ctx["model"]
    pairs = pairs_file(ctx["data"], ctx["work"] / "pairs.jsonl", 64 if smoke else 2048)
    steps = 1 if smoke else 20
    n_lang = language_params(model)
    rows = []
    gpus = ctx["num_gpus"]
    layouts = [("zero2", 1)] + ([("zero2", gpus)] if gpus > 1 else [])
    for (kind, procs) in layouts:
        for ckpt in ((True,) if smoke else (True, False)):
            out = ctx["work"] / f"sft_{kind}_{procs}_{'gc' if ckpt else 'nogc'}"
            cmd = [sys.executable, "-m", "accelerate.commands.launch"]
            if not smoke:
                cmd += ["--config_file", str(REPO / "recipes/accelerate/zero2.yaml"), "--num_processes", str(procs)]
            cmd += [str(REPO / "mllm_tune/sft.py"), str(REPO / "recipes/qwen_lora.yaml"),
                    "--model_name_or_path", str(model), "--dataset_name", str(pairs), "--output_dir", str(out),
                    "--max_steps", str(steps), "--gradient_accumulation_steps", "1", "--eval_strategy", "no",
                    "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
                    "--gradient_checkpointing", str(ckpt).lower(), "--dataloader_num_workers", "2"]
            if smoke:
                cmd += ["--per_device_train_batch_size", "2"]
            t0 = time.perf_counter()
            with GPUMemoryPoller() as mem:
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=ctx["timeout"])
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                rows.append({"layout": f"{kind} x{procs}", "gradient_checkpointing": ckpt,
                             "error": proc.stderr.strip().splitlines()[-1:] or ["(no output)"]})
                continue
            record = json.loads((out / "sft_metrics.json").read_text())
            train = record.get("metrics", {})
            sps = float(train.get("train_samples_per_second", 0.0))
            runtime = float(train.get("train_runtime", 0.0)) or wall
            # trained tokens: TRL logs the cumulative count (prompt, image and answer tokens)
            tokens = max((float(h.get("num_tokens", 0)) for h in record.get("log_history", [])), default=0.0)
            tps = tokens / runtime if runtime else 0.0
            row = {"layout": f"{kind} x{procs}", "gradient_checkpointing": ckpt, "steps": steps,
                   "samples_per_s": round(sps, 3), "tokens_per_s": round(tps, 1), "wall_s": round(wall, 1),
                   "peak_gpu_mib": mem.peak}
            peak = ctx.get("peak_tflops")
            if peak and tps:
                row["mfu"] = round(tps * 4 * n_lang / (peak * 1e12 * procs), 4)
            rows.append(row)
    return {"language_params": n_lang, "rows": rows}


def _tloc_requests(ctx: dict[str, Any], n: int):
    from mllm_tune.core.backends import MLLMRequest
    from mllm_tune.core.pedes import load_pedes
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    split = load_pedes(ctx["data"], "synthpedes").split("test")
    return [MLLMRequest("loc", DEFAULT_PROMPTS.render_loc(split.query_texts[i % len(split.query_texts)]),
                        str(split.gallery_paths[(i * 3) % len(split.gallery_paths)])) for i in range(n)]


def section_tloc(ctx: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    from mllm_tune.core.backends import make_backend

    sizes = (2,) if ctx["smoke"] else (32, 128, 512)
    rows = []
    kinds = ["hf"] + (["vllm"] if ctx["has_vllm"] else [])
    # T_loc both ways from ONE backend per kind (a 7B load or engine start costs a minute or more):
    # greedy text (generate) and the scored call (hf: one forward pass, which only localize reads;
    # vllm: one generation with the Yes/No logprobs of the first token)
    scored = {"hf": ("localize (forward)", {"loc_answer": "forward"}), "vllm": ("localize (p_yes)", {})}
    for kind in kinds:
        scored_mode, extra = scored[kind]
        modes = ("generate", scored_mode)
        backend = None
        try:
            backend = make_backend(kind, model=str(ctx["model"]), batch_size=max(sizes),
                                   dtype="bfloat16" if ctx["cuda"] else "float32", **extra)
            for mode in modes:
                ask = backend.generate if mode == "generate" else backend.localize
                for bs in sizes:
                    backend.batch_size = bs  # hf batches by it; vllm takes each call's requests as one batch
                    try:
                        reqs = _tloc_requests(ctx, 2 * bs)
                        ask(reqs[:bs])  # warm-up (and engine start for vllm)
                        t0 = time.perf_counter()
                        ask(reqs[bs:])
                        dt = time.perf_counter() - t0
                        rows.append({"backend": kind, "mode": mode, "batch": bs, "requests_per_s": round(bs / dt, 2)})
                    except Exception as exc:  # noqa: BLE001 - one failing size is reported, the rest still run
                        rows.append({"backend": kind, "mode": mode, "batch": bs,
                                     "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        except Exception as exc:  # noqa: BLE001 - the backend did not build: every row of this kind says why
            done = {(r["mode"], r["batch"]) for r in rows if r["backend"] == kind}
            rows += [{"backend": kind, "mode": m, "batch": bs, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                     for m in modes for bs in sizes if (m, bs) not in done]
        finally:
            if backend is not None:
                backend.close()
            backend = None
            gc.collect()
            if ctx["cuda"]:
                torch.cuda.empty_cache()
    return {"rows": rows, "note": "" if ctx["has_vllm"] else "vllm not importable: hf only"}


def section_thi(ctx: dict[str, Any]) -> dict[str, Any]:
    kind = "vllm" if ctx["has_vllm"] else "hf"
    out = ctx["work"] / "thi"
    cmd = [sys.executable, "-m", "eval.icl_end2end", "--dataset-root", str(ctx["data"]), "--dataset", "synthpedes",
           "--retriever", "synth-bow", "--mllm", kind, "--model", str(ctx["model"]), "--out", str(out),
           "--no-plots", "--no-progress", "--xi-sweep", "--lambda-sweep"]
    if ctx["smoke"]:  # a random toy model talks until the cap: keep the answers short
        cmd += ["--max-new-tokens", "loc=4,vqa=8,aggr=8", "--rounds", "2"]
    if kind == "vllm" and ctx["cuda"]:
        cmd += ["--vllm-gpu-memory-utilization", "0.9"]
    res: dict[str, Any] = {"backend": kind}
    t0 = time.perf_counter()
    with GPUMemoryPoller() as mem:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=ctx["timeout"])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["peak_gpu_mib"] = mem.peak
    if proc.returncode != 0:
        res["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return res
    r = json.loads((out / "results.json").read_text())
    res.update({"queries": r["num_queries"], "gallery": r["num_gallery"], "calls": r["calls"],
                "wall_seconds": r["wall_seconds"], "R1_base": r["base"]["R1"], "R1_thi": r["rounds"][-1]["R1"]})
    if kind == "vllm" and ctx["cuda"]:
        # does the engine start with what a 24 GB card would leave it?
        frac = min(0.95, 24 * 0.92 / ctx["gpu_memory_gib"])
        probe = [sys.executable, "-c",
                 "import sys; from mllm_tune.core.backends import make_backend, MLLMRequest; "
                 f"b = make_backend('vllm', model={str(ctx['model'])!r}, dtype='bfloat16', "
                 f"gpu_memory_utilization={frac:.3f}); print(b.generate([MLLMRequest('aggr', 'Say yes.')]))"]
        p = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=ctx["timeout"])
        res["fits_24gb"] = {"gpu_memory_utilization": round(frac, 3), "started": p.returncode == 0,
                            "last_line": (p.stderr.strip().splitlines() or [""])[-1][:300] if p.returncode else ""}
    return res


def section_metrics(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mllm_tune.core.metrics import rank_metrics

    dev = "cuda" if ctx["cuda"] else "cpu"
    q = g = 512 if ctx["smoke"] else 19848
    gen = torch.Generator(device=dev).manual_seed(0)
    S = torch.randn(q, 256, device=dev, generator=gen)
    S = torch.nn.functional.normalize(S, dim=1) @ torch.nn.functional.normalize(torch.randn(g, 256, device=dev, generator=gen), dim=1).T
    qp, gp = torch.randint(0, 1000, (q,)).tolist(), (list(range(1000)) * (g // 1000 + 1))[:g]
    qp = [p % min(1000, g) for p in qp]
    if ctx["cuda"]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rank_metrics(S, qp, gp)
    if ctx["cuda"]:
        torch.cuda.synchronize()
    out = {"metrics": {"size": f"{q} x {g}", "seconds": round(time.perf_counter() - t0, 3)}}
    if ctx["cuda"]:
        out["metrics"]["peak_extra_mib"] = round(torch.cuda.max_memory_allocated() / 2**20 - S.numel() * 4 / 2**20, 1)
    del S
    try:
        from data_builders.mining import MiningOptions, mine

        nc, ni = (256, 128) if ctx["smoke"] else (68108, 34054)
        txt = torch.nn.functional.normalize(torch.randn(nc, 512, device=dev), dim=1)
        img = torch.nn.functional.normalize(torch.randn(ni, 512, device=dev), dim=1)
        cap_pids = torch.randint(0, ni // 3, (nc,)).tolist()
        img_pids = [i // 3 for i in range(ni)]
        own = [min(3 * p, ni - 1) for p in cap_pids]
        t0 = time.perf_counter()
        mine(txt, img, cap_pids, img_pids, own, MiningOptions(), progress=False)
        out["mining"] = {"size": f"{nc} captions x {ni} images", "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # noqa: BLE001 - the miner's signature is its own; report what failed
        out["mining"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sft": section_sft, "tloc": section_tloc, "thi": section_thi, "metrics": section_metrics}


# -- report ------------------------------------------------------------------------------------

def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    md = ["# mllm-tune on a GPU (`python -m bench.gpu`)", "",
          f"Command: `{results['command']}`  ", f"Date: {results['date']}  ",
          f"Machine: {json.dumps(results['machine'])}", ""]
    for name in SECTIONS:
        sec = results["sections"].get(name)
        if sec is None:
            continue
        md += [f"## {name}", ""]
        if "rows" in sec:
            md += [_table(sec["rows"]), ""]
        md += ["```json", json.dumps({k: v for k, v in sec.items() if k != "rows"}, indent=1), "```", ""]
    return "\n".join(md)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy shapes on the CPU: checks that every section starts")
    ap.add_argument("--work", default="/tmp/bench_gpu", help="models, data and run folders")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS-gpu.md"))
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one GPU, for MFU")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("bench.gpu: no CUDA device here; nothing measured (run it on a GPU machine, or --cpu-smoke)")
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        print(f"error: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    work = Path(args.work) / ("smoke" if args.cpu_smoke else "real")
    work.mkdir(parents=True, exist_ok=True)
    try:
        import vllm  # noqa: F401
        has_vllm = True
    except ImportError:
        has_vllm = False
    info = machine(cuda)
    ctx: dict[str, Any] = {
        "smoke": args.cpu_smoke, "cuda": cuda and not args.cpu_smoke, "work": work, "timeout": args.timeout,
        "num_gpus": torch.cuda.device_count() if cuda else 1, "has_vllm": has_vllm and not args.cpu_smoke,
        "gpu_memory_gib": info.get("gpu_memory_gib", 0),
        "peak_tflops": peak_tflops((info.get("gpus") or [""])[0], args.peak_tflops),
    }
    t0 = time.perf_counter()
    ctx["data"] = dataset(work / "synthpedes", 40 if args.cpu_smoke else 5000)  # 5,000 ids: ~1,000 test ids
    ctx["model"] = build_model(work / "qwen2vl7b", TOY if args.cpu_smoke else QWEN2_VL_7B,
                               "cuda" if ctx["cuda"] else "cpu")
    results: dict[str, Any] = {"command": "python -m bench.gpu " + " ".join(argv or sys.argv[1:]),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": info,
                               "setup_s": round(time.perf_counter() - t0, 1), "sections": {}}
    for name in sections:
        logger.info("section %s", name)
        s0 = time.perf_counter()
        try:
            results["sections"][name] = RUNNERS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a failing section is reported, the others still run
            results["sections"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        results["sections"][name]["section_s"] = round(time.perf_counter() - s0, 1)
    out = Path(args.out)
    if args.cpu_smoke:  # never overwrite the GPU figures with toy ones
        out = work / "RESULTS-gpu-smoke.md"
    out.write_text(report(results), encoding="utf-8")
    out.with_name(out.stem.replace("RESULTS", "results") + ".json").write_text(json.dumps(results, indent=1, default=str))
    print(f"bench.gpu: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
