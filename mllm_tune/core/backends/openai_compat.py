"""Any OpenAI-compatible chat-completions server (vLLM serve, SGLang, hosted APIs).

Plain HTTP with the standard library (no extra dependency). Images travel as base64 data URLs.
Requests run in a bounded thread pool (``concurrency``); a request that fails with a connection
error, a timeout, 429 or 5xx is retried with exponential backoff. Before the first batch the
server is probed (``GET /models``), so a wrong URL fails at once with a clear message rather than
after every retry.

What the server must share with training (set when starting it; a client cannot change it):

- **Image budget.** Start vLLM with the training budget, min = max = 50,176 pixels (224x224)::

      python -m vllm.entrypoints.openai.api_server --model M \\
          --mm-processor-kwargs '{"min_pixels":50176,"max_pixels":50176}' ...

  Without it the server uses the model's own processor (min 3,136 px on Qwen2-VL): a 64x128 crop
  gets ~10 visual tokens instead of the 72 it had in training. ``min_pixels``/``max_pixels`` here
  state the budget the server was started with; they go into the cache identity and give the
  expected visual tokens per image (computed with the processor's resize, not measured).
- **Decoding.** Requests ask for exactly-greedy decoding: temperature 0, top_p 1, no penalties,
  and (``greedy_extras``, on by default) vLLM's/SGLang's ``repetition_penalty`` 1.0 and
  ``top_k`` -1, because vLLM's server otherwise fills unset fields from the checkpoint's
  generation_config (``repetition_penalty`` 1.05 on real Qwen2-VL). Turn ``greedy_extras`` off for
  servers that reject unknown fields. Caps are per task (:data:`~.base.DEFAULT_MAX_NEW_TOKENS`);
  replies with ``finish_reason == "length"`` are counted and warned about.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from .base import (
    BackendError,
    MLLMBackend,
    MLLMRequest,
    expected_visual_tokens,
    greedy_decoding_settings,
    max_new_tokens_for,
    max_new_tokens_table,
    resolve_pixel_budget,
    warn_truncated,
)

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


class OpenAIBackend(MLLMBackend):
    kind = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        concurrency: int = 8,
        max_new_tokens: int | dict[str, int] | None = None,
        temperature: float = 0.0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        adapter: str | None = None,
        greedy_extras: bool = True,
        patch_size: int = 14,
        max_retries: int = 5,
        backoff: float = 0.5,
        timeout: float = 300.0,
        identity_extra: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if not model:
            raise BackendError("openai backend: a model name is required (the name the server serves, or the LoRA name)")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = max(1, int(concurrency))
        self.max_new_tokens = max_new_tokens_table(max_new_tokens)
        self.temperature = float(temperature)
        if adapter is not None and Path(adapter).is_dir():
            # the adapter the server is meant to serve (--lora-modules): refuse what vLLM cannot load
            # here, before the first request would kill the server's engine
            from .adapter_check import assert_servable  # raises UnservableAdapterError (a BackendError)

            assert_servable(adapter, where="openai backend (vLLM server)")
        try:  # the budget the server runs with (documented above); the adapter's when one is named
            self.pixel_budget = resolve_pixel_budget(adapter, min_pixels, max_pixels)
        except ValueError as exc:
            raise BackendError(f"openai backend: {exc}") from None
        self.min_pixels, self.max_pixels = self.pixel_budget.min_pixels, self.pixel_budget.max_pixels
        self.greedy_extras = bool(greedy_extras)
        self.patch_size = int(patch_size)
        self.visual_tokens: list[int] = []  # expected from the budget, per image sent
        self.capped: Counter[str] = Counter()
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.identity_extra = dict(identity_extra or {})
        self._checked = False
        self._pool: ThreadPoolExecutor | None = None
        self.retries = 0  # retried requests, for reports and tests

    def sampling_fields(self) -> dict[str, Any]:
        """The decoding fields every request carries (besides max_tokens)."""
        out: dict[str, Any] = {"temperature": self.temperature, "top_p": 1.0, "presence_penalty": 0.0,
                               "frequency_penalty": 0.0}
        if self.greedy_extras:
            out.update({"repetition_penalty": 1.0, "top_k": -1})
        return out

    def decoding(self) -> dict[str, Any]:
        greedy = greedy_decoding_settings() if self.temperature == 0.0 else {"do_sample": True}
        return {**greedy, "request_fields": self.sampling_fields(), "max_new_tokens": dict(self.max_new_tokens)}

    def identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "decoding": self.decoding(),
            "pixels": {"min": self.min_pixels, "max": self.max_pixels, "as_stated_for_the_server": True},
            **self.identity_extra,
        }

    def visual_token_stats(self) -> dict[str, Any]:
        n = len(self.visual_tokens)
        return {"images": n, "mean_visual_tokens": round(sum(self.visual_tokens) / n, 2) if n else None,
                "measured": (f"not measured: expected from the stated server budget {self.min_pixels}/"
                             f"{self.max_pixels} with {self.patch_size}-px patches" if n else "no image sent")}

    # -- HTTP --------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the user's server
            return json.loads(resp.read().decode("utf-8"))

    def check_server(self) -> None:
        try:
            listing = self._http("GET", "/models", None, timeout=min(10.0, self.timeout))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise BackendError(f"openai backend: {self.base_url} refused the API key (HTTP {exc.code}); set the "
                                   "key's environment variable (--api-key-env)") from None
            logger.warning("openai backend: GET %s/models answered HTTP %d; trying anyway", self.base_url, exc.code)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendError(
                f"openai backend: cannot reach {self.base_url} ({reason}). Start the server first (e.g. `vllm serve "
                f"MODEL --port 8000`) or pass the right --base-url"
            ) from None
        names = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if names and self.model not in names:
            raise BackendError(f"openai backend: {self.base_url} does not serve model '{self.model}'; it serves {names}")

    def _one(self, req: MLLMRequest) -> tuple[str, bool]:
        content: list[dict] = []
        if req.image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(req.image)}})
        content.append({"type": "text", "text": req.prompt})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                **self.sampling_fields(), "max_tokens": max_new_tokens_for(req.task, self.max_new_tokens)}
        last: str = ""
        for attempt in range(self.max_retries + 1):
            try:
                out = self._http("POST", "/chat/completions", body, self.timeout)
                choice = out["choices"][0]
                return (choice["message"].get("content") or "").strip(), choice.get("finish_reason") == "length"
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                if exc.code == 400 and self.greedy_extras and ("repetition_penalty" in detail or "top_k" in detail):
                    raise BackendError(f"openai backend: {self.base_url} rejects the greedy fields repetition_penalty/"
                                       f"top_k ({detail}); build the backend with greedy_extras=False for this "
                                       "server") from None
                if exc.code not in _RETRY_STATUS:
                    raise BackendError(f"openai backend: HTTP {exc.code} from {self.base_url}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last = str(getattr(exc, "reason", exc))
            except (KeyError, IndexError, json.JSONDecodeError) as exc:
                raise BackendError(f"openai backend: malformed reply from {self.base_url}: {exc!r}") from None
            if attempt < self.max_retries:
                self.retries += 1
                time.sleep(self.backoff * (2 ** attempt) * (1 + 0.25 * random.random()))
        raise BackendError(f"openai backend: request failed after {self.max_retries + 1} attempts ({last})")

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        requests = list(requests)
        if not requests:
            return []
        if not self._checked:
            self.check_server()
            self._checked = True
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai")
        for r in requests:
            if r.image is not None:
                self.visual_tokens.append(self._expected_tokens(r.image))
        results = list(self._pool.map(self._one, requests))  # map keeps the order; the first error propagates
        cut = Counter(r.task for r, (_, capped) in zip(requests, results) if capped)
        self.capped.update(cut)
        warn_truncated(self.kind, sum(cut.values()), len(requests), dict(cut))
        return [a for a, _ in results]

    def _expected_tokens(self, path: str) -> int:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return expected_visual_tokens(w, h, self.min_pixels, self.max_pixels, self.patch_size)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
