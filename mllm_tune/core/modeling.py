"""Load a Qwen-VL class model and its processor for LoRA SFT, and build the LoRA config.

Design choices:
- LoRA goes on the linear layers of the **language model only** by default. The vision tower and
  its projector stay frozen and adapter-free, so the adapter is servable by vLLM (which applies
  LoRA to the language model of Qwen-VL models).
- PEFT has no default targets for Qwen-VL, and `all-linear` also hits the vision tower (whose
  Qwen2.5-VL MLP reuses `gate_proj/up_proj/down_proj`), so the targets are resolved here against
  the loaded model, and the vision tower is excluded explicitly whenever a target name also
  matches inside it.
- A one-element list of names stays a list (TRL's ModelConfig turns it into a string, which PEFT
  then reads as a full-match regex; STACK.md).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

# Names of the top-level vision modules of VLMs in transformers 5 (Qwen-VL: `model.visual`, which
# also holds the merger/projector).
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "mm_projector")
VISION_REGEX = r"(.*\.)?(" + "|".join(VISION_MODULE_NAMES) + r")(\..*)?"
_REGEX_CHARS = set(".*+?[](){}|^$\\")


class ModelSetupError(ValueError):
    """The model, its processor or the LoRA targets cannot be set up as asked."""


def is_vision_module(name: str) -> bool:
    return re.fullmatch(VISION_REGEX, name) is not None


def resolve_dtype(dtype: str, use_cpu: bool, bf16: bool | None) -> torch.dtype:
    """'auto' means bfloat16 when training in bf16 (the GPU default), float32 otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise ModelSetupError(f"dtype '{dtype}' is not a torch dtype; use auto, float32, bfloat16 or float16")
    return out


def quantization_config(load_in_4bit: bool, quant_type: str = "nf4", nested: bool = False):
    """QLoRA: a 4-bit BitsAndBytes config (GPU only). Vision tower and lm_head stay unquantised."""
    if not load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise ModelSetupError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; set load_in_4bit: false on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelSetupError("load_in_4bit needs bitsandbytes: pip install 'mllm-tune[qlora]'") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=[*VISION_MODULE_NAMES, "lm_head"],
    )


def set_pixel_budget(processor: Any, min_pixels: int | None, max_pixels: int | None) -> Any:
    """Resize images to between min and max pixels (Qwen-VL image processors: `size` edges)."""
    if min_pixels is None and max_pixels is None:
        return processor
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise ModelSetupError("image_min_pixels/image_max_pixels need a processor with an image_processor")
    size = dict(getattr(ip, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
        if hasattr(ip, "min_pixels"):
            ip.min_pixels = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = int(max_pixels)
    ip.size = size
    return processor


def _looks_local(name: str) -> bool:
    """A name a user meant as a folder: an explicit path, or something no hub repo id can be."""
    from mllm_tune.core.hub import ModelResolveError, looks_like_path, parse_hub_id

    if looks_like_path(name):
        return True
    try:
        parse_hub_id(name)
    except ModelResolveError:
        return True
    return False


def check_model_source(name: str, what: str = "model", need_config: bool = True) -> None:
    """Fail early, naming the path, when `name` is meant as a local folder and is not one.

    transformers reports a missing folder as an invalid hub repo id; this says what is wrong.
    Hub ids ('owner/name') pass through to the hub (or its cache)."""
    path = Path(str(name)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSetupError(f"{what} {name} is a file; pass the model folder (the one holding config.json)")
        if need_config and not (path / "config.json").is_file():  # processors also load from adapter folders
            raise ModelSetupError(f"{what} folder {name} has no config.json: not a saved model; pass the folder "
                                  "written by save_pretrained (or a hub id such as Qwen/Qwen2-VL-7B-Instruct)")
        return
    if _looks_local(str(name)):
        raise ModelSetupError(f"{what} folder {name} does not exist; pass an existing model folder or a hub id "
                              "such as Qwen/Qwen2-VL-7B-Instruct")


def safetensors_problem(path: str | Path) -> str | None:
    """Why a .safetensors file is unusable (truncated, unreadable header), or None if it is whole.
    Reads the header only, so it is cheap for multi-GB shards."""
    import json

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path} is truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if n > size:
            return f"{path} is truncated or corrupt: its header claims {n} bytes, the file has {size}"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return f"{path} is truncated or corrupt: its header cannot be read"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        return f"{path} is truncated: {size} bytes, its header needs {8 + n + end}"
    return None


def broken_weights(path: str) -> str | None:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    for w in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(w)
        if problem:
            return problem
    return None


def load_processor(path: str, revision: str = "main", min_pixels: int | None = None,
                   max_pixels: int | None = None, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    check_model_source(path, need_config=False)
    try:
        processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelSetupError(f"cannot load a processor from {path}: {exc}") from exc
    set_pixel_budget(processor, min_pixels, max_pixels)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None:  # the vision collator pads; fall back to eos like TRL
        tok.pad_token = tok.eos_token
    return processor


def load_model(path: str, dtype: torch.dtype = torch.float32, revision: str = "main",
               attn_implementation: str | None = None, quantization: Any = None,
               trust_remote_code: bool = False, device_map: Any = None):
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = device_map if device_map is not None else {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    check_model_source(path)
    try:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unless a weight file explains it
        broken = broken_weights(path)
        if broken:  # safetensors' own error does not name the file
            raise ModelSetupError(f"cannot load {path}: {broken}. Copy or download the model again") from None
        if isinstance(exc, OSError):
            raise ModelSetupError(f"cannot load a vision-language model from {path}: {exc}") from exc
        raise


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [torch.nn.Linear]
    try:  # QLoRA layers
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:  # noqa: BLE001 - bitsandbytes is optional
        pass
    return tuple(types)


def language_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers of the language model (no vision tower, no lm_head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, _linear_types()) and not is_vision_module(name) and mod is not out_emb:
            names.append(name)
    return names


def normalise_targets(spec: str | Sequence[str] | None) -> str | list[str] | None:
    """None / 'all-linear' -> None (the default); a string or a one-element list holding regex
    characters -> that regex; otherwise a list of module names (kept a list even with one name)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = spec.strip()
        if spec in ("", "all-linear", "all_linear"):
            return None
        return spec if _REGEX_CHARS & set(spec) else [spec]
    items = [str(s).strip() for s in spec if str(s).strip()]
    if not items or items == ["all-linear"]:
        return None
    if len(items) == 1 and _REGEX_CHARS & set(items[0]):
        return items[0]
    bad = [s for s in items if _REGEX_CHARS & set(s)]
    if bad:
        raise ModelSetupError(
            f"lora_target_modules: {bad} look like regexes inside a list of names; give one regex string instead"
        )
    return items


def _matches(spec: str | list[str], name: str) -> bool:
    # Same rule as PEFT: a string is a full-match regex, list items match the name or its suffix.
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def build_lora_config(model: torch.nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                      target_modules: str | Sequence[str] | None = None, freeze_vision_tower: bool = True,
                      modules_to_save: Sequence[str] | None = None, use_rslora: bool = False,
                      use_dora: bool = False):
    """A LoraConfig whose targets are resolved against `model` (see module docstring)."""
    from peft import LoraConfig

    spec = normalise_targets(target_modules)
    lm_linear = language_linear_names(model)
    if not lm_linear:
        raise ModelSetupError("the model has no linear layer outside its vision tower: nothing to put LoRA on")
    all_names = [n for n, _ in model.named_modules() if n]
    if spec is None:
        spec = sorted({n.rsplit(".", 1)[-1] for n in lm_linear})
    hit = [n for n in all_names if _matches(spec, n)]
    hit_lang = [n for n in hit if not is_vision_module(n)]
    hit_vision = [n for n in hit if is_vision_module(n)]
    if not hit_lang:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in lm_linear})
        raise ModelSetupError(
            f"lora_target_modules {target_modules!r} matches no module of the language model. Its linear layers "
            f"are named {leaves} (e.g. {lm_linear[0]}); a regex must match the full module name"
        )
    exclude = None
    save = list(modules_to_save or [])
    if freeze_vision_tower:
        if hit_vision:
            exclude = VISION_REGEX  # e.g. Qwen2.5-VL's vision MLP shares gate/up/down_proj names
    else:
        roots = sorted({m.group(0) for n in all_names if (m := re.match(r"(.*?\.)?(" + "|".join(VISION_MODULE_NAMES) + r")", n))})
        vision_leaves = sorted({r.rsplit(".", 1)[-1] for r in roots})
        logger.warning("freeze_vision_tower is false: training %s fully; vLLM cannot serve such adapters", vision_leaves)
        save += [v for v in vision_leaves if v not in save]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=spec,
        exclude_modules=exclude,
        modules_to_save=save or None,
        use_rslora=use_rslora,
        use_dora=use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of modules that carry a LoRA adapter (for checks and reports)."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def base_model_of_adapter(adapter_dir: str | Path) -> str:
    import json

    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        raise ModelSetupError(f"{adapter_dir} is not a PEFT adapter folder: adapter_config.json is missing")
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelSetupError(f"{cfg} names no base_model_name_or_path; pass the base model explicitly")
    return base


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, dtype: torch.dtype = torch.float32):
    """Base model + adapter, the way other engineers load it (`PeftModel.from_pretrained`)."""
    from peft import PeftModel

    from mllm_tune.core.adapter_layout import current_layout_dir

    base = base or base_model_of_adapter(adapter_dir)
    adapter_dir = current_layout_dir(adapter_dir)  # old Qwen-VL key layout -> today's (cached copy)
    model = load_model(base, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir))


# -- no backward through a frozen vision tower ------------------------------------------------------


def _vision_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_vision_module(n)]


def keep_frozen_vision_out_of_backward(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model.enable_input_require_grads()` hook the language model's input embeddings only.

    Why: with gradient checkpointing (or PEFT's preparation for it) transformers 5.x calls
    `enable_input_require_grads`, which registers an output-requires-grad hook on the input
    embeddings of *every* PreTrainedModel inside the model. For Qwen2-VL and Qwen2.5-VL that
    includes the vision tower (`visual.patch_embed`), so the whole frozen tower is kept in the
    autograd graph (and its checkpointed blocks recomputed) although no parameter in it trains.
    Qwen3-VL's vision model exposes no input embeddings and is not hooked.

    The language model's embedding output is what the reentrant checkpoints of the decoder need to
    carry gradients to LoRA weights; the visual features enter the same `inputs_embeds` by a
    scatter, so the loss and every LoRA gradient stay the same. The vision hook is kept only while
    some vision parameter requires grad (freeze_vision_tower: false), where it is needed.
    Idempotent; returns `model`.
    """
    if getattr(model, "_mllm_tune_lm_only_input_grads", False):
        return model
    get_emb = getattr(model, "get_input_embeddings", None)
    stock = getattr(model, "enable_input_require_grads", None)
    if get_emb is None or stock is None:
        return model
    def make_output_require_grad(module, inputs, output):
        output.requires_grad_(True)

    def enable_input_require_grads_lm_only() -> None:
        # read at call time: PEFT may have replaced vision modules (modules_to_save) since
        if any(p.requires_grad for p in _vision_parameters(model)):
            stock()  # the vision tower trains: keep transformers' hooks on every embedding
            return
        disable = getattr(model, "disable_input_require_grads", None)
        if disable is not None:
            disable()  # drop hooks registered before this call (idempotent, as the stock method)
        hook = get_emb().register_forward_hook(make_output_require_grad)
        model._require_grads_hooks = [hook]
        model._require_grads_hook = hook  # the name older callers read

    # An instance attribute wins over the class method, and PEFT's wrappers forward attribute
    # look-ups to this model, so TRL, PEFT and Trainer all reach this version.
    model.enable_input_require_grads = enable_input_require_grads_lm_only
    model._mllm_tune_lm_only_input_grads = True
    if getattr(model, "_require_grads_hooks", None):
        enable_input_require_grads_lm_only()  # hooks already registered: redo them
    return model
