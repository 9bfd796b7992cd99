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

from mllm_tune.core.modeling import base_model_of_adapter

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


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: str = "auto") -> Path:
    """Merge `adapter_dir` into its base (or `base`) and save the result with the processor."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "adapter_model.bin").is_file():
        raise MergeError(f"{adapter_dir} holds no adapter weights (adapter_model.safetensors)")
    base = base or base_model_of_adapter(adapter_dir)
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
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
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
    except MergeError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
