"""LoRA adapters saved against an older Qwen-VL module layout, brought to today's.

Before transformers 4.52 (and so in every LLaMA-Factory run of that time, e.g. the ICL
authors' released adapter) ``Qwen2VLForConditionalGeneration`` held its language model at
``model.layers.N`` and its vision tower at ``visual``; current transformers nests them at
``model.language_model.layers.N`` and ``model.visual``. PEFT matches adapter weights to modules
by name, so an old adapter loads *silently wrong*: its LoRA weights match nothing and the model
keeps random LoRA initialisations or none at all. This module renames the keys (and a
``target_modules`` regex that spells the old path), reports what it mapped and what it left, and
unpacks ``.tar.gz`` archives (the form the authors published).

    from mllm_tune.core.adapter_layout import convert_adapter, current_layout_dir
    report = convert_adapter("lora.tar.gz", "runs/icl_lora")   # files in today's layout
    adapter_dir = current_layout_dir("runs/old_lora")           # converted copy only if needed
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

logger = logging.getLogger("mllm_tune.adapter_layout")

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# old prefix (after PREFIX) -> new prefix; the first rule that matches renames a key
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
    (re.compile(r"^visual\."), "model.visual."),
)


class AdapterLayoutError(ValueError):
    """An adapter folder/archive is unusable; the message names the file and the fix."""


@dataclass
class ConversionReport:
    source: str
    layout: str  # "old" (renamed), "current" (nothing to do) or "unknown"
    mapped: int = 0
    unchanged: int = 0
    unmatched: list[str] = field(default_factory=list)  # keys the model has no module for (with a model)
    out: str | None = None

    def summary(self) -> str:
        s = (f"{self.source}: {self.layout} layout, {self.mapped} keys mapped to model.language_model / "
             f"model.visual, {self.unchanged} left as they were")
        if self.unmatched:
            s += f", {len(self.unmatched)} match no module of the model (first: {', '.join(self.unmatched[:3])})"
        return s + (f" -> {self.out}" if self.out else "")


def map_key(key: str) -> str:
    """Today's name of one adapter key (unchanged when it already is, or is not a model key)."""
    if not key.startswith(PREFIX):
        return key
    rest = key[len(PREFIX):]
    for rx, new in _RULES:
        if rx.match(rest):
            return PREFIX + rx.sub(new, rest, count=1)
    return key


def layout_of(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(".language_model." in k or k.startswith(PREFIX + "model.visual.") for k in keys):
        return "current"
    if any(k.startswith(PREFIX + "model.layers.") or k.startswith(PREFIX + "visual.") for k in keys):
        return "old"
    return "unknown"


def remap_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    out, mapped = {}, 0
    for k, v in state.items():
        nk = map_key(k)
        mapped += nk != k
        if nk in out:
            raise AdapterLayoutError(f"adapter keys {k} and another one both map to {nk}: the file mixes layouts")
        out[nk] = v
    return out, mapped


def _map_target_modules(cfg: dict) -> dict:
    tm = cfg.get("target_modules")
    if isinstance(tm, str):  # a regex over module names: rename the old path inside it
        cfg["target_modules"] = re.sub(r"(?<![\w.])model\.layers", "model.language_model.layers", tm)
    return cfg


def unpack(path: str | Path, dest: str | Path) -> Path:
    """The adapter folder inside ``path`` (a folder or a .tar/.tar.gz archive extracted into ``dest``).

    LLaMA-Factory output folders hold the final adapter at the top and ``checkpoint-N/`` folders
    below it: the top one is taken; an archive whose only adapter sits one folder down works too."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterLayoutError(f"adapter {path} does not exist: pass the adapter folder or its .tar.gz")
    if path.is_file():
        try:
            is_tar = tarfile.is_tarfile(path)
        except (EOFError, OSError, tarfile.TarError):  # a cut .tar.gz fails while being sniffed
            is_tar = False
        if not is_tar:
            raise AdapterLayoutError(f"{path} is a file but not a tar archive: pass the adapter folder "
                                     f"(with {CONFIG}) or a .tar.gz of it")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(path) as tf:
                tf.extractall(dest, filter="data")  # refuses absolute paths and links out of dest
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise AdapterLayoutError(f"{path}: cannot unpack ({exc}); the archive may be truncated, "
                                     "download it again") from exc
        path = dest
    if (path / CONFIG).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(CONFIG)
                   if not any(part.startswith("checkpoint-") for part in p.relative_to(path).parts[:-1]))
    if not found:
        raise AdapterLayoutError(f"no {CONFIG} in {path}: this is not a PEFT/LLaMA-Factory LoRA adapter")
    if len(found) > 1:
        raise AdapterLayoutError(f"{path} holds several adapters ({', '.join(str(f) for f in found[:4])}); "
                                 "pass the one to use")
    return found[0]


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterLayoutError(f"{folder / CONFIG} is not valid JSON ({exc.msg}); the file may be truncated") from exc
    for name in WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return cfg, load_file(f), name
                return cfg, torch.load(f, map_location="cpu", weights_only=True), name
            except Exception as exc:  # safetensors/pickle errors have no common base class
                raise AdapterLayoutError(f"{f} cannot be read ({exc}); the file may be truncated") from exc
    raise AdapterLayoutError(f"{folder} has {CONFIG} but no {' or '.join(WEIGHT_FILES)}")


def unmatched_keys(model: torch.nn.Module, keys: Iterable[str]) -> list[str]:
    """Adapter keys naming a module ``model`` (the plain base model) does not have."""
    names = {n for n, _ in model.named_modules()}
    bad = []
    for k in keys:
        rest = k[len(PREFIX):] if k.startswith(PREFIX) else k
        # lora weights end in .lora_A.weight / .lora_B.weight / .lora_magnitude_vector...; others in .weight
        mod = re.sub(r"\.(lora_[A-Za-z_]+|modules_to_save)(\.[\w]+)*$", "", rest)
        mod = re.sub(r"\.(weight|bias)$", "", mod)
        if mod not in names:
            bad.append(k)
    return bad


def convert_adapter(src: str | Path, out: str | Path, model: torch.nn.Module | None = None) -> ConversionReport:
    """Write the adapter at ``src`` (folder or archive) to ``out`` in today's layout.

    With ``model`` (the base model, e.g. built from its config on the meta device) every key is
    checked to name one of its modules; an adapter of which NO key matches is refused."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        folder = unpack(src, tmp)
        cfg, state, weights = read_adapter(folder)
        layout = layout_of(state)
        new_state, mapped = remap_state_dict(state)
        report = ConversionReport(str(src), layout, mapped, len(state) - mapped, out=str(out))
        if model is not None:
            bad = set(unmatched_keys(model, new_state))
            report.unmatched = [k for k, nk in zip(state, new_state) if nk in bad]  # as the file names them
            if report.unmatched and len(report.unmatched) == len(new_state):
                raise AdapterLayoutError(
                    f"{folder / weights}: none of its {len(new_state)} keys names a module of the model "
                    f"(first: {', '.join(report.unmatched[:3])}); it was trained for another architecture")
        out.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():  # tokenizer files, README, ... travel along; checkpoints do not
            if f.is_file() and f.name not in (CONFIG, *WEIGHT_FILES):
                shutil.copy2(f, out / f.name)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in new_state.items()}, out / WEIGHT_FILES[0])
        (out / CONFIG).write_text(json.dumps(_map_target_modules(cfg), indent=2), encoding="utf-8")
    return report


def current_layout_dir(adapter: str | Path, cache_root: str | Path | None = None) -> Path:
    """``adapter`` itself when it is a folder in today's layout; otherwise a converted copy (one log
    line says so), kept under ``cache_root`` (default ~/.cache/mllm_tune/adapters) by content hash."""
    path = Path(adapter).expanduser()
    if path.is_dir() and (path / CONFIG).is_file():
        _, state, _ = read_adapter(path)
        if layout_of(state) != "old":
            return path
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    root = Path(cache_root) if cache_root else Path.home() / ".cache" / "mllm_tune" / "adapters"
    dest = root / h.hexdigest()[:16]
    if not (dest / WEIGHT_FILES[0]).is_file():
        report = convert_adapter(path, dest)
        logger.info("adapter %s", report.summary())
    else:
        logger.info("adapter %s: using its converted copy %s", path, dest)
    return dest
