"""Can vLLM serve this LoRA adapter? Checked from its files before any engine starts.

vLLM validates an adapter only when the first request that uses it arrives, and a refusal there
kills the engine (every later call fails with ``EngineDeadError``, and the reason is in a log
line far above). Reading ``adapter_config.json`` and the weight file's key names takes
milliseconds, so the vllm backend runs this check in its constructor and a user about to start
``vllm serve --lora-modules`` can run it by hand:

    python -m mllm_tune.core.backends.adapter_check ADAPTER [--max-lora-rank 8]

What vLLM 0.32 refuses for a generative (Qwen-VL) model, and what this module reports:
``modules_to_save`` (vLLM only accepts ``classifier``/``score``, and only on cross-encoder pooling
models), LoRA on the vision tower (off unless the engine sets ``enable_tower_connector_lora``,
and then only on models that support it), DoRA, LoRA bias, adapter bias, initialisations that
rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ), layer replication, aLoRA, and a rank above
the engine's ``max_lora_rank`` (at most 512).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .base import BackendError

# The values vLLM's LoRAConfig.max_lora_rank may take (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights values that only set the starting point of training (a saved adapter is a plain
# LoRA); the others (pissa, olora, corda, loftq) change the base weights when PEFT loads them.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_VISION_MARKERS = ("visual", "vision_tower", "vision_model", "patch_embed", "merger")

RETRAIN = ("retrain with `python -m mllm_tune.sft` defaults (LoRA on the language model only, no "
           "lora_modules_to_save)")
MERGE = ("or merge it into the base weights (`python -m mllm_tune.merge --adapter ADAPTER --out MERGED`) and "
         "serve MERGED without LoRA (--model MERGED, no --adapter / --enable-lora)")


class UnservableAdapterError(BackendError):
    """vLLM cannot serve this adapter; the message lists every reason and the fix for each."""


@dataclass
class AdapterCheck:
    """What was found in one adapter folder. ``problems``: one sentence per refusal (reason + fix)."""

    path: Path
    rank: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self, where: str = "vLLM") -> str:
        lines = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
        return f"{where}: adapter {self.path} cannot be served by vLLM: {lines}"


def lora_rank_for_engine(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank`` (vLLM refuses other values)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise UnservableAdapterError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}): "
                                 f"retrain with lora_r <= {VLLM_LORA_RANKS[-1]}, {MERGE}")


def _weight_keys(folder: Path) -> list[str]:
    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        return []  # .bin adapters: vLLM reads them too; the config alone is checked
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as fh:
        return list(fh.keys())


def _is_vision_name(name: str) -> bool:
    parts = name.replace("\\", ".").split(".")
    return any(m in parts for m in _VISION_MARKERS) or "visual" in name and "language_model" not in name


def check_adapter(adapter: str | Path, max_lora_rank: int | None = None) -> AdapterCheck:
    """Read ``adapter``'s config and weight names and list what vLLM would refuse.

    ``max_lora_rank``: the engine's setting when the caller fixes it (None: the backend picks the
    smallest allowed rank that fits, so only ranks above 512 are refused)."""
    folder = Path(adapter)
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise UnservableAdapterError(f"{folder} is not a PEFT adapter folder (no adapter_config.json): pass the "
                                     "folder sft.py wrote (it holds adapter_config.json and adapter_model.safetensors)")
    try:
        cfg: dict[str, Any] = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnservableAdapterError(f"{cfg_file} is not valid JSON ({exc.msg}); the file may be truncated: "
                                     "copy the adapter again") from None
    ranks = [int(cfg.get("r") or 8), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    check = AdapterCheck(folder, max(ranks))
    p = check.problems

    if cfg.get("peft_type", "LORA") != "LORA":
        p.append(f"peft_type is {cfg.get('peft_type')!r}; vLLM serves LoRA adapters only: {RETRAIN}, {MERGE}")
    saved = [m for m in (cfg.get("modules_to_save") or []) if m]
    if saved:
        p.append(f"modules_to_save={saved} (full copies of those modules inside the adapter); vLLM accepts none "
                 "for a generative model (only classifier/score, on cross-encoder models): "
                 f"{RETRAIN}, {MERGE}")
    keys = _weight_keys(folder)
    vision_keys = [k for k in keys if _is_vision_name(k)]
    tm = cfg.get("target_modules")
    tm_vision = (isinstance(tm, str) and "visual" in tm and "language_model" not in tm) or (
        isinstance(tm, list) and [t for t in tm if _is_vision_name(str(t))])
    if vision_keys or tm_vision:
        what = f"{len(vision_keys)} weights such as {vision_keys[0]}" if vision_keys else f"target_modules={tm!r}"
        p.append(f"LoRA on the vision tower ({what}); vLLM applies LoRA to the language model only unless the engine "
                 "sets enable_tower_connector_lora=True, which Qwen-VL models do not support there: "
                 f"{RETRAIN}, {MERGE}")
    if cfg.get("use_dora"):
        p.append(f"use_dora=true; vLLM does not serve DoRA: retrain with use_dora false, {MERGE}")
    if cfg.get("lora_bias") or (cfg.get("bias") or "none") != "none":
        p.append(f"adapter bias (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}); vLLM serves "
                 f"none: retrain with bias 'none', {MERGE}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        p.append(f"init_lora_weights={init!r} changes the base weights when PEFT loads the adapter, which vLLM does "
                 f"not do: {MERGE}")
    for key, what in (("layer_replication", "layer replication"), ("alora_invocation_tokens", "activated LoRA")):
        if cfg.get(key):
            p.append(f"{key} is set; vLLM does not serve {what}: {MERGE}")
    if check.rank > VLLM_LORA_RANKS[-1]:
        p.append(f"LoRA rank {check.rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}): retrain with "
                 f"lora_r <= {VLLM_LORA_RANKS[-1]}, {MERGE}")
    elif max_lora_rank is not None and check.rank > int(max_lora_rank):
        p.append(f"LoRA rank {check.rank} is above the engine's max_lora_rank {max_lora_rank}: start it with "
                 f"max_lora_rank {lora_rank_for_engine(check.rank)} (`vllm serve ... --max-lora-rank "
                 f"{lora_rank_for_engine(check.rank)}`, or leave max_lora_rank out of --vllm-engine-kwargs)")
    return check


def assert_servable(adapter: str | Path, max_lora_rank: int | None = None, where: str = "vllm backend") -> AdapterCheck:
    """:func:`check_adapter`, raising :class:`UnservableAdapterError` when vLLM would refuse."""
    check = check_adapter(adapter, max_lora_rank)
    if not check.ok:
        raise UnservableAdapterError(check.message(where))
    return check


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mllm_tune.core.backends.adapter_check",
                                 description="Check that vLLM can serve a PEFT LoRA adapter (before `vllm serve`).")
    ap.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank, if fixed")
    args = ap.parse_args(argv)
    try:
        check = check_adapter(args.adapter, args.max_lora_rank)
    except UnservableAdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not check.ok:
        print(f"error: {check.message('adapter_check')}", file=sys.stderr)
        return 1
    print(f"ok: {check.path} can be served by vLLM (LoRA rank {check.rank}: --enable-lora --max-lora-rank "
          f"{lora_rank_for_engine(check.rank)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
