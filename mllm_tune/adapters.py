"""Bring a LoRA adapter trained on an older transformers to today's Qwen-VL layout.

    python -m mllm_tune.adapters convert lora.tar.gz runs/icl_lora [--base MODEL_DIR]

IN is an adapter folder (PEFT or LLaMA-Factory output) or a .tar/.tar.gz of one; OUT receives
``adapter_config.json`` + ``adapter_model.safetensors`` with keys renamed from ``model.layers.N``
/ ``visual`` to ``model.language_model.layers.N`` / ``model.visual`` (see
:mod:`mllm_tune.core.adapter_layout`). With ``--base`` (a model folder; only its config is read,
the model is built on the meta device) every key is checked against the model's modules.
Prints keys mapped and left over; exits 1 with one ``error:`` line on a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from mllm_tune.core.adapter_layout import AdapterLayoutError, convert_adapter


def meta_model(base: str):
    """The base model's modules without its weights (for the key check)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        cfg = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise AdapterLayoutError(f"--base {base}: cannot read its config.json ({exc}); pass the base model's "
                                 "folder") from exc
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mllm_tune.adapters", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write IN in today's layout to OUT")
    c.add_argument("src", metavar="IN")
    c.add_argument("out", metavar="OUT")
    c.add_argument("--base", default=None, help="base model folder to check every key against")
    args = ap.parse_args(argv)
    try:
        model = meta_model(args.base) if args.base else None
        report = convert_adapter(args.src, args.out, model=model)
    except AdapterLayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(json.dumps({"layout": report.layout, "mapped": report.mapped, "unchanged": report.unchanged,
                      "unmatched": report.unmatched[:20], "out": report.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
