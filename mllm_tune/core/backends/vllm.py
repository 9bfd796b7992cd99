"""Offline vLLM engine backend, with the LoRA adapter served through ``LoRARequest``.

vLLM is optional (``pip install 'mllm-tune[vllm]'`` on a GPU machine; ``make test-vllm`` builds a
CPU engine in ``.venv-vllm``). The engine starts on the first ``generate`` call. Images travel as
base64 data URLs in chat messages, like the openai backend, so both send the same conversation.
As in the hf backend, ``adapter_tasks`` selects the tasks answered with the adapter; the others
run on the base weights (no LoRARequest).

What must match the hf backend and training, and how:
- **Image budget**: :func:`~.base.resolve_pixel_budget` (explicit > the adapter's saved budget >
  min = max = 50,176), passed to the engine as ``mm_processor_kwargs``; visual tokens per image are
  counted on the prompt token ids the engine actually ran.
- **Decoding**: exactly greedy with every penalty off (:func:`~.base.greedy_decoding_settings`),
  per-task answer caps (:func:`~.base.max_new_tokens_for`); answers that hit the cap are counted.
- **Engine settings** (``gpu_memory_utilization``, ``max_model_len``, ``max_num_seqs``,
  ``tensor_parallel_size``, ``enforce_eager``, ``dtype``, free-form ``engine_kwargs``) are recorded
  in :meth:`VLLMBackend.engine_settings`. ``max_model_len`` defaults to a bound computed from the
  image budget and the answer caps, not the model's 32k-256k context (whose KV cache is what ran
  24 GB cards out of memory).
- **Adapters** are checked before the engine starts (:mod:`.adapter_check`), and engine failures
  (start-up, a dead engine core) become one :class:`~.base.BackendError` with the root cause and
  the fix.

**T_loc as a probability** (:meth:`VLLMBackend.localize`): the loc requests are generated exactly
as :meth:`~VLLMBackend.generate` generates them (same greedy settings and cap, so the same text) with
``SamplingParams(logprob_token_ids=[...])`` naming every single-token Yes/No variant of the
tokenizer (:func:`~mllm_tune.core.yes_no.yes_no_ids`). vLLM then returns, for each generated
position, the logprobs of exactly those ids (plus the sampled token); the first position's give
``p_yes`` (:func:`~mllm_tune.core.yes_no.p_yes_from_logprobs`). What the numbers are computed from:
vLLM's V1 sampler takes ``log_softmax`` of the model's logits *before* any logits processor,
penalty or temperature (``logprobs_mode="raw_logprobs"``, vLLM's default, which the backend sets
explicitly), i.e. raw model log-probabilities over the full vocabulary. With greedy decoding and
every penalty off they equal the processed ones anyway. Measured on the CPU engine
(``tests/test_vllm_real.py``, float32, the shipped SynthPEDES-VL + an SFT LoRA, 16 T_loc requests):
p_yes within 1.2e-6 of the hf backend's softmax over the same ids. Requesting the logprobs
changes neither the text nor the cache identity.

**One GPU (or one block of GPUs) per process** (:func:`pin_engine_gpus`): under ``accelerate
launch`` / torchrun with several processes on a node, every process would otherwise start its engine
on the node's first GPU(s). Before the engine starts, the backend sets ``CUDA_VISIBLE_DEVICES`` of
the process to its own block: local rank ``r`` with tensor parallelism ``t`` gets the visible GPUs
``r*t .. r*t+t-1`` (:func:`engine_gpus`). vLLM's engine core (and its tensor-parallel workers) are
separate processes started after that, so they see only that block, even when this process
initialised CUDA earlier (the retriever). An in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
in a process that already initialised CUDA cannot be moved: that is refused with the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .adapter_check import assert_servable, check_adapter, lora_rank_for_engine
from ..yes_no import YesNoIds, p_yes_from_logprobs, yes_no_ids
from .base import (
    BackendError,
    LocAnswer,
    MLLMBackend,
    MLLMRequest,
    check_loc_requests,
    greedy_decoding_settings,
    max_new_tokens_table,
    resolve_pixel_budget,
    warn_truncated,
)
from .hf import local_model_identity, resolve_model_folders
from .openai_compat import image_data_url

logger = logging.getLogger(__name__)

# Tokens allowed for the text of one conversation (chat template, system line, the T_aggr prompt
# with its facts) when max_model_len is derived; a longer prompt fails with a BackendError that
# names --vllm-max-model-len.
TEXT_TOKENS = 1024
# The Qwen-VL resize rounds each side to a multiple of patch x merge keeping the aspect ratio, so a
# tall crop can land above max_pixels (336x168 -> 56,448 px for a 50,176 cap): leave a margin.
RESIZE_OVERSHOOT = 1.25


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs vLLM, which is not installed here: `pip install 'mllm-tune[vllm]'` on a machine "
            "with a CUDA GPU (or `make test-vllm`, which builds a CPU engine in .venv-vllm), or use --mllm hf "
            "(transformers) or --mllm openai (a running `vllm serve`)"
        ) from exc
    return vllm, LoRARequest


def _model_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def derived_max_model_len(config: dict[str, Any], max_pixels: int, max_new_tokens: int) -> int:
    """A context long enough for one image at ``max_pixels`` + :data:`TEXT_TOKENS` of text + the
    longest answer, rounded up to 256 and never above the model's own context."""
    vision = config.get("vision_config") or {}
    unit = int(vision.get("patch_size", 14)) * int(vision.get("spatial_merge_size", 2))
    visual = math.ceil(max_pixels * RESIZE_OVERSHOOT / (unit * unit))
    want = 256 * math.ceil((visual + TEXT_TOKENS + max_new_tokens) / 256)
    text = config.get("text_config") or config
    ctx = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return min(want, int(ctx)) if ctx else want


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _describe(exc: BaseException) -> str:
    """The root cause of ``exc`` in one line (vLLM wraps the real error in 'see root cause above')."""
    root = _root_cause(exc)
    text = " ".join(str(root).split()) or type(root).__name__
    if root is not exc:
        text = f"{text} (raised as {type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return f"{type(root).__name__}: {text}"[:900]


# substring of the root cause (lower case) -> the fix to print
_START_FIXES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("unsupported cpu attention", "head size"),
     "vLLM's CPU attention serves head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 only: use a GPU, "
     "--mllm hf, or a model with a supported head size"),
    (("max_model_len", "max_position_embeddings", "maximum model length"),
     "pass --vllm-max-model-len at most the model's context (max_position_embeddings in config.json), or leave it "
     "out to use the bound derived from the image budget"),
    (("memory", "kv cache", "cache blocks"),
     "give the KV cache less to hold or more room: lower --vllm-max-model-len or --vllm-max-num-seqs, raise "
     "--vllm-gpu-memory-utilization (and close other GPU users), or on a CPU raise VLLM_CPU_KVCACHE_SPACE (GiB)"),
    (("tensor_parallel", "tensor parallel", "world_size", "divisible"),
     "--vllm-tensor-parallel-size must divide the attention heads and not exceed the visible GPUs"),
    (("gpu_memory_utilization",), "--vllm-gpu-memory-utilization is a fraction in (0, 1]"),
    (("lora",), "check the adapter (python -m mllm_tune.core.backends.adapter_check ADAPTER) and max_lora_rank"),
)


def _start_fix(cause: str) -> str:
    low = cause.lower()
    for keys, fix in _START_FIXES:
        if any(k in low for k in keys):
            return fix
    return ("check the engine settings (--vllm-* flags, --vllm-engine-kwargs); in a multi-process engine the core "
            "process's own error is in the log above (VLLM_ENABLE_V1_MULTIPROCESSING=0 brings it into this one)")


# -- one GPU block per process --------------------------------------------------------------------

def engine_gpus(local_rank: int, local_world_size: int, tensor_parallel_size: int, visible: Sequence[str],
                per_process: bool = False) -> list[str]:
    """The GPUs (entries of ``visible``, the devices this process sees, in order) the engine of
    local rank ``local_rank`` uses: the block ``[r*t, r*t + t)`` for ``t = tensor_parallel_size``,
    so ``local_world_size`` processes get disjoint blocks. ``per_process``: ``visible`` was set for
    this process by the launcher (``CUDA_VISIBLE_DEVICES`` given, e.g. ``srun --gpus-per-task``);
    then exactly ``t`` visible GPUs are this process's own and are kept. Raises
    :class:`~.base.BackendError` when there are too few GPUs for every process's block."""
    r, n, t = int(local_rank), int(local_world_size), int(tensor_parallel_size or 1)
    visible = [str(v).strip() for v in visible if str(v).strip()]
    if t < 1 or n < 1 or not 0 <= r < n:
        raise BackendError(f"vllm backend: impossible process layout (local rank {r} of {n}, tensor parallel size {t})")
    if per_process and len(visible) == t:
        return list(visible)  # pinned by the launcher: this process sees only its own block
    if len(visible) < n * t:
        raise BackendError(
            f"vllm backend: {n} processes on this node with --vllm-tensor-parallel-size {t} need {n * t} GPUs, but "
            f"{len(visible)} are visible ({','.join(visible) or 'none'}); start fewer processes per node "
            "(--num_processes), lower the tensor parallel size, or give each process its own GPUs "
            "(srun --gpus-per-task)")
    return visible[r * t:(r + 1) * t]


def _visible_gpus(env: dict[str, str] | os._Environ, gpu_count: int | None) -> list[str]:
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [v.strip() for v in cvd.split(",") if v.strip()]
    if gpu_count is None:
        try:
            import torch

            gpu_count = torch.cuda.device_count()  # NVML count: does not initialise CUDA
        except Exception:  # noqa: BLE001 - no torch / no driver: no GPU to pin
            gpu_count = 0
    return [str(i) for i in range(int(gpu_count))]


def pin_engine_gpus(tensor_parallel_size: int | None = None, env: dict[str, str] | os._Environ | None = None,
                    gpu_count: int | None = None, cuda_initialised: bool | None = None) -> dict[str, Any] | None:
    """Restrict this process's ``CUDA_VISIBLE_DEVICES`` to its own GPU block before its vLLM engine
    starts, when several processes share the node (``LOCAL_WORLD_SIZE`` > 1, set by torchrun and
    ``accelerate launch``; ``LOCAL_RANK`` says which block). ``env`` defaults to ``os.environ`` and
    is changed in place. Returns what was decided (for results.json), or None when there is nothing
    to pin (one process on the node, or no GPU). ``gpu_count``/``cuda_initialised`` are for tests;
    by default they are asked from torch without initialising CUDA."""
    env = os.environ if env is None else env
    n = int(env.get("LOCAL_WORLD_SIZE") or 1)
    if n <= 1:
        return None
    r = int(env.get("LOCAL_RANK") or 0)
    before = env.get("CUDA_VISIBLE_DEVICES")
    visible = _visible_gpus(env, gpu_count)
    if not visible:
        return None  # a CPU engine: nothing to pin
    t = int(tensor_parallel_size or 1)
    block = engine_gpus(r, n, t, visible, per_process=before is not None)
    if block == visible:
        return {"local_rank": r, "local_world_size": n, "cuda_visible_devices": ",".join(block),
                "source": "as given by the launcher"}
    if env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        if cuda_initialised is None:
            try:
                import torch

                cuda_initialised = bool(torch.cuda.is_initialized())
            except Exception:  # noqa: BLE001
                cuda_initialised = False
        if cuda_initialised:
            raise BackendError(
                f"vllm backend: local rank {r} of {n} must run its engine on GPU(s) {','.join(block)}, but the engine "
                "would run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which already initialised CUDA with "
                f"every GPU visible ({before or 'all'}); unset VLLM_ENABLE_V1_MULTIPROCESSING (the engine core then "
                "starts in its own process on its own GPUs), or set CUDA_VISIBLE_DEVICES per process in the launcher")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(block)
    logger.info("vllm backend: local rank %d of %d runs its engine on GPU(s) %s (CUDA_VISIBLE_DEVICES was %s)",
                r, n, env["CUDA_VISIBLE_DEVICES"], before if before is not None else "unset")
    return {"local_rank": r, "local_world_size": n, "cuda_visible_devices": env["CUDA_VISIBLE_DEVICES"],
            "visible_before": before if before is not None else f"unset ({len(visible)} GPUs)",
            "source": "pinned by local rank"}


class VLLMBackend(MLLMBackend):
    kind = "vllm"
    scores_loc = True

    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        adapter_tasks: Sequence[str] | None = None,
        max_new_tokens: int | dict[str, int] | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        tensor_parallel_size: int | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        pin_gpus: bool = True,
        **_: Any,
    ) -> None:
        self._vllm, self._LoRARequest = _import_vllm()
        self.pin_gpus = bool(pin_gpus)
        self.gpu_pinning: dict[str, Any] | None = None  # what pin_engine_gpus decided (engine start)
        self.model_resolved, self.adapter_resolved = resolve_model_folders(self.kind, model, adapter)
        self.model_path = self.model_resolved.path
        self.adapter_path = self.adapter_resolved.path if self.adapter_resolved else None
        self.adapter_tasks = tuple(adapter_tasks) if adapter_tasks else None
        self.engine_kwargs = dict(engine_kwargs or {})
        self.adapter_rank = 0
        if self.adapter_path is not None:
            # before the engine: vLLM checks adapters only on the first LoRA request, and a refusal
            # there kills the engine with the reason buried in its log
            check = assert_servable(self.adapter_path, self.engine_kwargs.get("max_lora_rank"))
            self.adapter_rank = check.rank
        self.max_new_tokens = max_new_tokens_table(max_new_tokens)
        try:
            self.pixel_budget = resolve_pixel_budget(self.adapter_path, min_pixels, max_pixels)
        except ValueError as exc:
            raise BackendError(f"vllm backend: {exc}") from None
        self.min_pixels, self.max_pixels = self.pixel_budget.min_pixels, self.pixel_budget.max_pixels
        self.dtype = dtype or "auto"
        self._config = _model_config(self.model_path)
        explicit_len = max_model_len is not None or "max_model_len" in self.engine_kwargs
        self.max_model_len_source = "explicit" if explicit_len else "derived"
        if max_model_len is None and "max_model_len" not in self.engine_kwargs:
            max_model_len = derived_max_model_len(self._config, self.max_pixels, max(self.max_new_tokens.values()))
        self.settings: dict[str, Any] = {
            k: v for k, v in (("gpu_memory_utilization", gpu_memory_utilization), ("max_model_len", max_model_len),
                              ("max_num_seqs", max_num_seqs), ("tensor_parallel_size", tensor_parallel_size),
                              ("enforce_eager", enforce_eager)) if v is not None}
        self._llm = None
        self._tokenizer = None
        self._dead: str | None = None  # root cause once the engine core has died
        self.visual_tokens: list[int] = []
        self.capped: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self._yes_no: YesNoIds | None = None
        # T_loc answers whose first generated token was not a Yes/No id (p_yes still from their logprobs)
        self.loc_first_not_yes_no = 0

    # -- what the answers depend on, and what results.json records -------------------------
    def decoding(self) -> dict[str, Any]:
        return {**greedy_decoding_settings(), "max_new_tokens": dict(self.max_new_tokens)}

    def identity(self) -> dict[str, Any]:
        ident = local_model_identity(self, self.decoding())
        # numerics only: memory and batching settings do not change a greedy answer
        ident["engine"] = {"tensor_parallel_size": self.settings.get("tensor_parallel_size", 1)}
        return ident

    def engine_kwargs_used(self) -> dict[str, Any]:
        """The keyword arguments ``vllm.LLM`` is (or will be) started with."""
        kw: dict[str, Any] = {"model": str(self.model_path), "dtype": self.dtype, "limit_mm_per_prompt": {"image": 1},
                              "mm_processor_kwargs": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
                              # sampling defaults from the checkpoint's generation_config (repetition
                              # penalty 1.05 on Qwen2-VL) must not leak in: every field is set below
                              "generation_config": "vllm",
                              # localize(): logprobs of the model's logits before any processor
                              "logprobs_mode": "raw_logprobs", **self.settings}
        if self.adapter_path is not None:
            kw["enable_lora"] = True
            kw["max_lora_rank"] = lora_rank_for_engine(self.adapter_rank)
        kw.update(self.engine_kwargs)
        return kw

    def engine_settings(self) -> dict[str, Any]:
        """For results.json: the engine arguments, where max_model_len came from, and the budget."""
        kw = {k: v for k, v in self.engine_kwargs_used().items() if k != "model"}
        return {**kw, "max_model_len_source": self.max_model_len_source, "pixel_budget": self.pixel_budget.as_dict(),
                **({"gpus": dict(self.gpu_pinning)} if self.gpu_pinning else {})}

    def visual_token_stats(self) -> dict[str, Any]:
        n = len(self.visual_tokens)
        return {"images": n, "mean_visual_tokens": round(sum(self.visual_tokens) / n, 2) if n else None,
                "measured": "image pad tokens in the prompts the engine ran" if n else "not measured (no image encoded)"}

    # -- engine ------------------------------------------------------------------------------
    def _engine(self):
        if self._dead is not None:
            raise BackendError(f"vllm backend: the engine for {self.model_path} died earlier ({self._dead}); start a "
                               "new process (the engine cannot be restarted in this one)")
        if self._llm is None:
            kw = self.engine_kwargs_used()
            if self.pin_gpus:  # several processes on this node: this one's own GPU block
                self.gpu_pinning = pin_engine_gpus(kw.get("tensor_parallel_size"))
            logger.info("starting vLLM engine: %s", kw)
            try:
                self._llm = self._vllm.LLM(**kw)
            except Exception as exc:  # noqa: BLE001 - vLLM raises ValueError, RuntimeError, pydantic errors...
                cause = _describe(exc)
                raise BackendError(f"vllm backend: the engine did not start for {self.model_path} (settings "
                                   f"{ {k: v for k, v in kw.items() if k != 'model'} }): {cause}. Fix: "
                                   f"{_start_fix(cause)}") from exc
        return self._llm

    def _uses_adapter(self, task: str) -> bool:
        return self.adapter_path is not None and (self.adapter_tasks is None or task in self.adapter_tasks)

    def _params(self, task: str, logprob_ids: Sequence[int] | None = None):
        g = greedy_decoding_settings()
        extra = {"logprob_token_ids": [int(i) for i in logprob_ids]} if logprob_ids else {}
        return self._vllm.SamplingParams(
            temperature=g["temperature"], top_p=g["top_p"], top_k=0, repetition_penalty=g["repetition_penalty"],
            presence_penalty=g["presence_penalty"], frequency_penalty=g["frequency_penalty"],
            max_tokens=self.max_new_tokens[task], **extra)

    def _chat_error(self, exc: Exception, lora: Any) -> BackendError:
        cause = _describe(exc)
        dead = "enginedead" in (type(exc).__name__ + cause).lower().replace(" ", "")
        low = cause.lower()
        if "maximum model length" in low or "max_model_len" in low or "too long" in low:
            fix = (f"a prompt is longer than max_model_len ({self.settings.get('max_model_len')}): pass a larger "
                   "--vllm-max-model-len")
        elif lora is not None:  # with a LoRA request in the batch, the adapter is the suspect
            fix = (f"the adapter {self.adapter_path} could not be applied to {self.model_path}: check it with "
                   f"`python -m mllm_tune.core.backends.adapter_check {self.adapter_path}`, and that it was trained on "
                   "this base model (--model)")
            if dead:
                # a core in its own process only logs its reason; the file check can usually name it
                found = check_adapter(self.adapter_path, self.engine_kwargs_used().get("max_lora_rank")).problems
                if found:
                    fix += f". The adapter check finds: {'; '.join(found)}"
        else:
            fix = "the vLLM engine failed on this batch; see the cause (the full error is chained below)"
        if dead:
            self._dead = cause  # every later call would fail the same way
        return BackendError(f"vllm backend: {cause}. Fix: {fix}")

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        return [text for text, _ in self._run(list(requests), None)]

    def yes_no(self) -> YesNoIds:
        """The Yes/No token ids :meth:`localize` scores (from the engine's tokenizer; starts it)."""
        if self._yes_no is None:
            llm = self._engine()
            if self._tokenizer is None:
                self._tokenizer = llm.get_tokenizer()
            try:
                self._yes_no = yes_no_ids(self._tokenizer)
            except ValueError as exc:
                raise BackendError(f"vllm backend: {exc}") from None
        return self._yes_no

    def localize(self, requests: Sequence[MLLMRequest]) -> list[LocAnswer]:
        """T_loc answers with p_yes: the text :meth:`generate` gives (the same greedy request and
        cap) and P(Yes) over the Yes/No ids from the engine's logprobs at the first generated token
        (see the module docstring). p_yes is None only if the engine returned no logprobs."""
        requests = list(requests)
        check_loc_requests(requests)
        if not requests:
            return []
        ids = self.yes_no()
        out = []
        for text, (table, first_token) in self._run(requests, ids.all):
            p = p_yes_from_logprobs(table, ids.yes, ids.no) if table else None
            if first_token is not None and first_token not in ids.all:
                self.loc_first_not_yes_no += 1
            out.append(LocAnswer(text, None if p is None else min(1.0, max(0.0, p))))
        return out

    @staticmethod
    def _first_position(output: Any) -> tuple[dict[int, float] | None, int | None]:
        """({token id: logprob} at the first generated position, or None when the engine sent no
        logprobs; the first generated token id, or None)."""
        ids = list(getattr(output, "token_ids", None) or [])
        first_token = int(ids[0]) if ids else None
        positions = getattr(output, "logprobs", None)
        if not positions or not positions[0]:
            return None, first_token
        return {int(t): float(getattr(lp, "logprob", lp)) for t, lp in positions[0].items()}, first_token

    def _run(self, requests: list[MLLMRequest], logprob_ids: Sequence[int] | None
             ) -> list[tuple[str, tuple[dict[int, float] | None, int | None]]]:
        """Greedy answers, each with (first position's logprobs of ``logprob_ids``, first token)."""
        if not requests:
            return []
        llm = self._engine()
        image_token = self._config.get("image_token_id")
        out: list[Any] = [None] * len(requests)
        capped: Counter[str] = Counter()
        for use_adapter in (True, False):
            idx = [i for i, r in enumerate(requests) if self._uses_adapter(r.task) == use_adapter]
            if not idx:
                continue
            convs, params = [], []
            for i in idx:
                r = requests[i]
                content: list[dict] = []
                if r.image is not None:
                    content.append({"type": "image_url", "image_url": {"url": image_data_url(r.image)}})
                content.append({"type": "text", "text": r.prompt})
                convs.append([{"role": "user", "content": content}])
                params.append(self._params(r.task, logprob_ids))
            lora = self._LoRARequest("thi_adapter", 1, str(self.adapter_path)) if use_adapter else None
            try:
                results = llm.chat(convs, params, lora_request=lora, use_tqdm=False)
            except Exception as exc:  # noqa: BLE001 - EngineDeadError, ValueError, RuntimeError...
                raise self._chat_error(exc, lora) from exc
            for i, res in zip(idx, results):
                first = res.outputs[0]
                out[i] = (self._text(llm, first), self._first_position(first) if logprob_ids else (None, None))
                task = requests[i].task
                self.answered[task] += 1
                if getattr(first, "finish_reason", None) == "length":
                    capped[task] += 1
                if requests[i].image is not None and image_token is not None and res.prompt_token_ids is not None:
                    self.visual_tokens.append(sum(1 for t in res.prompt_token_ids if t == image_token))
        self.capped.update(capped)
        warn_truncated(self.kind, sum(capped.values()), len(requests), dict(capped))
        return out

    def _text(self, llm: Any, output: Any) -> str:
        # Decoded from the token ids, as the hf backend decodes them: vLLM's incremental text drops
        # a trailing incomplete UTF-8 sequence (an answer cut at the cap mid-character), so its
        # ``text`` can differ from the hf backend's for the same tokens.
        ids = list(getattr(output, "token_ids", None) or [])
        if not ids:
            return output.text.strip()
        if self._tokenizer is None:
            self._tokenizer = llm.get_tokenizer()
        return self._tokenizer.decode(ids, skip_special_tokens=True).strip()

    def close(self) -> None:
        self._llm = None
        self._tokenizer = None


__all__ = ["VLLMBackend", "derived_max_model_len", "engine_gpus", "pin_engine_gpus"]
