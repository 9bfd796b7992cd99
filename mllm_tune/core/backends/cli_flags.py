"""Command-line flags shared by the MLLM-facing CLIs (eval.icl_end2end, data_builders.rda).

The ``--vllm-*`` engine controls map onto the vllm backend's keyword arguments; a flag left at
None keeps vLLM's own default, so only the flags given reach the engine.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli_exit import CLIError


def add_vllm_engine_flags(group: Any) -> None:
    """The vLLM engine controls (all default None: vLLM's own defaults)."""
    group.add_argument("--vllm-gpu-memory-utilization", type=float, default=None,
                       help="vllm: fraction of GPU memory for weights + KV cache")
    group.add_argument("--vllm-max-model-len", type=int, default=None, help="vllm: context length (prompt + answer)")
    group.add_argument("--vllm-max-num-seqs", type=int, default=None, help="vllm: sequences decoded at once")
    group.add_argument("--vllm-tensor-parallel-size", type=int, default=None, help="vllm: GPUs per model")
    group.add_argument("--vllm-enforce-eager", action="store_true", default=None,
                       help="vllm: no CUDA graphs (less memory, slower)")
    group.add_argument("--vllm-dtype", default=None, help="vllm: weights dtype (overrides --dtype for vllm)")
    group.add_argument("--vllm-engine-kwargs", default=None,
                       help='vllm: more vllm.LLM keyword arguments as a JSON object, e.g. \'{"swap_space": 8}\'')


def vllm_engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """make_backend("vllm", ...) keyword arguments from the --vllm-* flags (only those set)."""
    engine_kwargs = None
    if args.vllm_engine_kwargs is not None:
        try:
            engine_kwargs = json.loads(args.vllm_engine_kwargs)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--vllm-engine-kwargs is not valid JSON ({exc.msg} at column {exc.colno}): pass a JSON "
                           """object such as '{"swap_space": 8}'""") from None
        if not isinstance(engine_kwargs, dict):
            raise CLIError(f"--vllm-engine-kwargs must be a JSON object, got {type(engine_kwargs).__name__}")
    opts = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization, "max_model_len": args.vllm_max_model_len,
            "max_num_seqs": args.vllm_max_num_seqs, "tensor_parallel_size": args.vllm_tensor_parallel_size,
            "enforce_eager": args.vllm_enforce_eager, "engine_kwargs": engine_kwargs, "dtype": args.vllm_dtype}
    return {k: v for k, v in opts.items() if v is not None}
