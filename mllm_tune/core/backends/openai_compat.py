"""Any OpenAI-compatible chat-completions server (vLLM serve, SGLang, hosted APIs).

Plain HTTP with the standard library (no extra dependency). Images travel as base64 data URLs.
Requests run in a bounded thread pool (``concurrency``); a request that fails with a connection
error, a timeout, 429 or 5xx is retried with exponential backoff. Before the first batch the
server is probed (``GET /models``), so a wrong URL fails at once with a clear message rather than
after every retry.
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from .base import BackendError, MLLMBackend, MLLMRequest

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
        max_new_tokens: int = 256,
        temperature: float = 0.0,
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
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.identity_extra = dict(identity_extra or {})
        self._checked = False
        self._pool: ThreadPoolExecutor | None = None
        self.retries = 0  # retried requests, for reports and tests

    def identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "decoding": {"temperature": self.temperature, "max_tokens": self.max_new_tokens},
            **self.identity_extra,
        }

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

    def _one(self, req: MLLMRequest) -> str:
        content: list[dict] = []
        if req.image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(req.image)}})
        content.append({"type": "text", "text": req.prompt})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_new_tokens}
        last: str = ""
        for attempt in range(self.max_retries + 1):
            try:
                out = self._http("POST", "/chat/completions", body, self.timeout)
                return (out["choices"][0]["message"].get("content") or "").strip()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
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
        return list(self._pool.map(self._one, requests))  # map keeps the order; the first error propagates

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
