"""Merge a LoRA adapter into its base weights and save model + processor.

    python -m mllm_tune.merge --adapter outputs/run --out outputs/run-merged [--base PATH] [--dtype auto]

The merged folder loads with `AutoModelForImageTextToText.from_pretrained` alone (no PEFT), e.g.
for serving without LoRA support. A quantised base is refused: merging into 4/8-bit weights
rounds the LoRA update away; merge into the full-precision base instead (`--base`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from mllm_tune.core.modeling import ModelSetupError, base_model_of_adapter, check_model_source, safetensors_problem

logger = logging.getLogger("mllm_tune.merge")


class MergeError(ValueError):
    pass


def _quantization_of(base: str) -> dict | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    q = getattr(cfg, "quantization_config", None)
    if q is None and hasattr(cfg, "get_text_config"):
        q = getattr(cfg.get_text_config(), "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else {"quant_method": str(q)}
    return q


def check_adapter_folder(adapter_dir: Path, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the file and the fix unless `adapter_dir` holds a whole trained adapter."""
    if not adapter_dir.is_dir():
        raise error(f"adapter folder {adapter_dir} does not exist; pass the output_dir of an mllm_tune.sft run")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise error(f"{adapter_dir} is not a trained adapter folder: adapter_config.json is missing "
                    "(pass the output_dir of an mllm_tune.sft run, not a checkpoint's parent or a base model)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file() and not (adapter_dir / "adapter_model.bin").is_file():
        raise error(f"{adapter_dir} holds no adapter weights (adapter_model.safetensors is missing)")
    problem = safetensors_problem(weights) if weights.is_file() else None
    if problem:
        raise error(f"{problem}: the adapter was cut while copying or saving; copy it again or re-save it from "
                    "the last checkpoint (python -m mllm_tune.sft ... resumes and saves)")


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: str = "auto") -> Path:
    """Merge `adapter_dir` into its base (or `base`) and save the result with the processor."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_adapter_folder(adapter_dir, MergeError)
    try:
        base = base or base_model_of_adapter(adapter_dir)
        check_model_source(base, "base model")
    except ModelSetupError as exc:
        raise MergeError(f"{exc} (pass the base with --base)") from None
    q = _quantization_of(base)
    if q:
        raise MergeError(
            f"base model {base} is quantised ({q.get('quant_method', 'unknown method')}): merging LoRA into quantised "
            "weights loses the update. Pass the full-precision base with --base"
        )
    if out_dir.resolve() == adapter_dir.resolve():
        raise MergeError("--out must differ from --adapter")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    logger.info("loading base %s", base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch_dtype)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise MergeError(f"base model {base} loaded quantised; merge into the full-precision base instead")
    logger.info("merging adapter %s", adapter_dir)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as exc:  # bad adapter_config.json, shapes of another base
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise MergeError(f"cannot apply the adapter in {adapter_dir} to base {base} ({first}): check "
                         f"{adapter_dir / 'adapter_config.json'} and that the adapter was trained on this base "
                         "(--base)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    src = adapter_dir if (adapter_dir / "processor_config.json").is_file() or (
        adapter_dir / "preprocessor_config.json").is_file() else base
    AutoProcessor.from_pretrained(str(src)).save_pretrained(out_dir)
    (out_dir / "merge_info.json").write_text(json.dumps({"base": base, "adapter": str(adapter_dir.resolve())}, indent=2))
    logger.info("merged model saved to %s", out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="adapter folder written by mllm_tune.sft")
    ap.add_argument("--out", required=True, help="folder for the merged model + processor")
    ap.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return merge_adapter(args.adapter, args.out, args.base, args.dtype)
    except (MergeError, ModelSetupError) as exc:  # one line, no traceback
        raise SystemExit("error: " + " ".join(str(exc).split())) from None


if __name__ == "__main__":
    main()
