"""Any OpenAI-compatible chat-completions server (vLLM serve, SGLang, hosted APIs).

Plain HTTP with the standard library (no extra dependency). Images travel as base64 data URLs.
Requests run in a bounded thread pool (``concurrency`` in flight per server); a request that fails
with a connection error, a timeout, 429 or 5xx is retried with exponential backoff. Before the first
batch the server is probed (``GET /models``), so a wrong URL fails at once with a clear message
rather than after every retry.

**Several servers** (``base_url`` a list; ``--base-url`` given several times): every server must
serve the model name (checked at start; a mismatch names the URLs). Each request goes to the
healthy server with the fewest requests in flight (at most ``concurrency`` per server). A request
that fails there (connection error, timeout, a reply cut off after its headers, retryable HTTP
status) takes that server out and is retried at once on another healthy one; only when none is
left does it back off. A server that is out comes back when its health check (``GET /models``, at
most every ``health_interval`` s) passes. :meth:`OpenAIBackend.server_stats` reports requests, errors, retries and the seconds lost
per server. The cache identity of a multi-server backend names the model, not the URLs, so a run
resumed against another set of servers reuses its answers.

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

**T_loc as a probability** (:meth:`OpenAIBackend.localize`): the same request as ``generate``
plus ``logprobs: true, top_logprobs: 20`` (the most the OpenAI API allows; vLLM's default
``--max-logprobs`` is 20 too). From the first generated token's ``top_logprobs`` the tokens whose
text is exactly one of :data:`~mllm_tune.core.yes_no.YES_STRINGS` / ``NO_STRINGS`` give
``p_yes`` (renormalised over them, :func:`~mllm_tune.core.yes_no.p_yes_from_logprobs`); tokens
of the same text are summed. A server that sends no logprobs, or a first position where none of
the 20 tokens is a Yes/No string, gives the text answer with ``p_yes=None``; the first such reply
logs one warning per backend, :meth:`OpenAIBackend.loc_score_stats` counts them, and a server
without logprobs turns ``scores_loc`` off (so a cache does not ask again for scores it cannot get).
Asking for logprobs changes neither the answer text nor the cache identity.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import mimetypes
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..yes_no import NO_STRINGS, YES_STRINGS, p_yes_from_logprobs
from .base import (
    BackendError,
    LocAnswer,
    MLLMBackend,
    MLLMRequest,
    check_loc_requests,
    expected_visual_tokens,
    greedy_decoding_settings,
    max_new_tokens_for,
    max_new_tokens_table,
    resolve_pixel_budget,
    warn_truncated,
)

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
TOP_LOGPROBS = 20  # the most OpenAI's chat API allows per position


def p_yes_from_top_logprobs(logprobs: Any) -> tuple[float | None, str]:
    """(p_yes, how) from a chat completion choice's ``logprobs`` object: the first generated
    token's ``top_logprobs`` (and the token itself), matched to the Yes/No strings by exact text.
    ``how``: "scored", "no logprobs" (the server sent none) or "no Yes/No token" (none of the
    first position's tokens is one)."""
    content = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
    if not content or not isinstance(content[0], dict):
        return None, "no logprobs"
    first = content[0]
    entries = [e for e in (first.get("top_logprobs") or []) if isinstance(e, dict)]
    if isinstance(first.get("token"), str) and first.get("logprob") is not None \
            and all(e.get("token") != first["token"] for e in entries):
        entries.append(first)  # the chosen token, when the top list does not hold it already
    table: dict[str, float] = {}
    for e in entries:
        tok, lp = e.get("token"), e.get("logprob")
        if not isinstance(tok, str) or lp is None:
            continue
        lp = float(lp)
        table[tok] = lp if tok not in table else _logaddexp(table[tok], lp)  # ids with the same text
    p = p_yes_from_logprobs(table, YES_STRINGS, NO_STRINGS)
    if p is None:
        return None, "no Yes/No token"
    return min(1.0, max(0.0, p)), "scored"


def _logaddexp(a: float, b: float) -> float:
    m = max(a, b)
    return m if m == -math.inf else m + math.log(math.exp(a - m) + math.exp(b - m))


def image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


@dataclass
class _Server:
    """One server of the pool and what happened to it (guarded by the backend's lock)."""

    url: str
    healthy: bool = True
    inflight: int = 0
    requests: int = 0  # answered
    errors: int = 0  # failed attempts (each one retried elsewhere or later, or the last one)
    taken_out: int = 0
    put_back: int = 0
    lost_seconds: float = 0.0  # time spent in attempts that failed here
    next_check: float = 0.0
    checking: bool = False
    last_error: str = ""
    names: list = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "requests": self.requests, "errors": self.errors, "taken_out": self.taken_out,
                "put_back": self.put_back, "healthy": self.healthy, "lost_seconds": round(self.lost_seconds, 3),
                **({"last_error": self.last_error} if self.last_error else {})}


def parse_base_urls(base_url: str | Sequence[str]) -> list[str]:
    """One URL or several: the distinct URLs, in order, without a trailing slash."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    out: list[str] = []
    for u in urls:
        u = str(u).strip().rstrip("/")
        if u and u not in out:
            out.append(u)
    if not out:
        raise BackendError("openai backend: no server URL given (--base-url)")
    return out


def read_url_file(path: str | Path) -> list[str]:
    """URLs from a file, one a line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BackendError(f"openai backend: cannot read the URL file {path}: {exc}") from None
    urls = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    urls = [u for u in urls if u]
    if not urls:
        raise BackendError(f"openai backend: the URL file {path} holds no URL (one a line)")
    return urls


class _Retry(Exception):
    """An attempt failed in a way another server (or a later try) may not."""


class OpenAIBackend(MLLMBackend):
    kind = "openai"
    scores_loc = True  # until a server answers a localize() request without logprobs

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str] = "http://127.0.0.1:8000/v1",
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
        health_interval: float = 1.0,
        **_: Any,
    ) -> None:
        if not model:
            raise BackendError("openai backend: a model name is required (the name the server serves, or the LoRA name)")
        self.model = model
        self.base_urls = parse_base_urls(base_url)
        self.base_url = self.base_urls[0] if len(self.base_urls) == 1 else ", ".join(self.base_urls)
        self.servers = [_Server(u) for u in self.base_urls]
        self.health_interval = float(health_interval)
        self._lock = threading.Condition()
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
        self.loc_scores: Counter[str] = Counter()  # localize() replies: scored / no logprobs / no Yes/No token
        self._warned_unscored = False

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
        # one server: its URL, as before; several: the model name alone (any set of servers serving it)
        where = ({"base_url": self.base_url} if len(self.servers) == 1
                 else {"servers": "several, all serving the model name below"})
        return {
            "kind": self.kind,
            **where,
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
    def _http(self, method: str, path: str, body: dict | None, timeout: float, url: str | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request((url or self.servers[0].url) + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the user's server
            return json.loads(resp.read().decode("utf-8"))

    def _served_names(self, url: str) -> list[str] | None:
        """The model names ``url`` serves ([] when it does not list them); raises on no answer."""
        try:
            listing = self._http("GET", "/models", None, timeout=min(10.0, self.timeout), url=url)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise BackendError(f"openai backend: {url} refused the API key (HTTP {exc.code}); set the "
                                   "key's environment variable (--api-key-env)") from None
            logger.warning("openai backend: GET %s/models answered HTTP %d; trying anyway", url, exc.code)
            return None
        return [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]

    def check_server(self) -> None:
        """Every server is asked what it serves; all must serve ``model``. With several servers an
        unreachable one starts out of the pool (its health check may bring it back); none reachable
        is an error."""
        reached, wrong = [], []
        for srv in self.servers:
            try:
                names = self._served_names(srv.url)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                srv.healthy, srv.taken_out, srv.last_error = False, srv.taken_out + 1, str(getattr(exc, "reason", exc))
                srv.next_check = time.monotonic() + self.health_interval
                continue
            reached.append(srv)
            srv.names = names or []
            if names and self.model not in names:
                wrong.append(srv)
        if wrong:
            if len(self.servers) == 1:
                raise BackendError(f"openai backend: {wrong[0].url} does not serve model '{self.model}'; it serves "
                                   f"{wrong[0].names}")
            raise BackendError(
                f"openai backend: the servers must all serve the model name '{self.model}'; "
                + "; ".join(f"{s.url} serves {s.names}" for s in wrong)
                + (f" (these serve it: {', '.join(s.url for s in reached if s not in wrong)})"
                   if len(reached) > len(wrong) else "")
                + ". Start every server with the same --served-model-name / --lora-modules NAME=...")
        if not reached:
            if len(self.servers) == 1:
                raise BackendError(
                    f"openai backend: cannot reach {self.servers[0].url} ({self.servers[0].last_error}). Start the "
                    "server first (e.g. `vllm serve MODEL --port 8000`) or pass the right --base-url")
            raise BackendError("openai backend: cannot reach any of the servers: "
                               + "; ".join(f"{s.url} ({s.last_error})" for s in self.servers))
        for srv in self.servers:
            if not srv.healthy:
                logger.warning("openai backend: %s is not reachable (%s); starting without it (health check every "
                               "%.1f s)", srv.url, srv.last_error, self.health_interval)

    # -- the pool ----------------------------------------------------------------------------
    def _health_check(self, srv: _Server) -> None:
        """Probe a server that is out; it comes back if it answers and serves the model."""
        try:
            names = self._served_names(srv.url)
            ok = names is None or not names or self.model in names
        except (urllib.error.URLError, OSError, TimeoutError, BackendError, ValueError):
            ok = False
        with self._lock:
            srv.checking = False
            srv.next_check = time.monotonic() + self.health_interval
            if ok and not srv.healthy:
                srv.healthy = True
                srv.put_back += 1
                logger.warning("openai backend: %s passed its health check; back in the pool", srv.url)
            self._lock.notify_all()

    def _acquire(self, avoid: _Server | None) -> _Server | None:
        """A healthy server with a free slot (least loaded, ``avoid`` last); waits for a slot while
        one is healthy. None: no healthy server (after probing the ones due for a check)."""
        while True:
            due: list[_Server] = []
            with self._lock:
                now = time.monotonic()
                for srv in self.servers:
                    if not srv.healthy and not srv.checking and now >= srv.next_check:
                        srv.checking = True
                        due.append(srv)
                if not due:
                    healthy = [s for s in self.servers if s.healthy]
                    if not healthy:
                        return None
                    free = [s for s in healthy if s.inflight < self.concurrency]
                    if free:
                        srv = min(free, key=lambda s: (s is avoid and len(free) > 1, s.inflight, s.requests))
                        srv.inflight += 1
                        return srv
                    self._lock.wait(timeout=0.5)
                    continue
            for srv in due:
                self._health_check(srv)

    def _release(self, srv: _Server, ok: bool, seconds: float, error: str = "") -> None:
        with self._lock:
            srv.inflight -= 1
            if ok:
                srv.requests += 1
            else:
                srv.errors += 1
                srv.lost_seconds += seconds
                srv.last_error = error
                if srv.healthy and len(self.servers) > 1:
                    srv.healthy = False
                    srv.taken_out += 1
                    srv.next_check = time.monotonic() + self.health_interval
                    logger.warning("openai backend: %s failed (%s); out of the pool until its health check passes",
                                   srv.url, error)
            self._lock.notify_all()

    def _post(self, srv: _Server, body: dict) -> tuple[str, bool, Any]:
        try:
            out = self._http("POST", "/chat/completions", body, self.timeout, url=srv.url)
            choice = out["choices"][0]
            return ((choice["message"].get("content") or "").strip(), choice.get("finish_reason") == "length",
                    choice.get("logprobs"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            if exc.code == 400 and self.greedy_extras and ("repetition_penalty" in detail or "top_k" in detail):
                raise BackendError(f"openai backend: {srv.url} rejects the greedy fields repetition_penalty/"
                                   f"top_k ({detail}); build the backend with greedy_extras=False for this "
                                   "server") from None
            if exc.code not in _RETRY_STATUS:
                raise BackendError(f"openai backend: HTTP {exc.code} from {srv.url}: {detail}") from None
            raise _Retry(f"HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:  # refused, reset, timed out
            raise _Retry(str(getattr(exc, "reason", exc)) or type(exc).__name__) from None
        except http.client.HTTPException as exc:
            # the server died between the status line and the end of the body (IncompleteRead: seen
            # when a real vLLM server is SIGKILLed mid-reply), or sent no valid status line
            raise _Retry(f"{type(exc).__name__}: {exc!r}"[:300]) from None
        except (KeyError, IndexError, json.JSONDecodeError) as exc:
            raise BackendError(f"openai backend: malformed reply from {srv.url}: {exc!r}") from None

    def _one(self, req: MLLMRequest, score: bool = False) -> tuple[str, bool, Any]:
        content: list[dict] = []
        if req.image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(req.image)}})
        content.append({"type": "text", "text": req.prompt})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                **self.sampling_fields(), "max_tokens": max_new_tokens_for(req.task, self.max_new_tokens)}
        if score:  # the first token's alternatives, for p_yes; the answer itself is unchanged
            body.update({"logprobs": True, "top_logprobs": TOP_LOGPROBS})
        last, failed, backoffs = "", None, 0
        for attempt in range(self.max_retries + 1):
            srv = self._acquire(avoid=failed)
            if srv is None:
                last = last or "no server is healthy: " + "; ".join(f"{s.url} ({s.last_error})" for s in self.servers)
            else:
                t0 = time.monotonic()
                try:
                    result = self._post(srv, body)
                except _Retry as exc:
                    last, failed = f"{srv.url}: {exc}", srv
                    self._release(srv, False, time.monotonic() - t0, str(exc))
                except BaseException:
                    self._release(srv, False, time.monotonic() - t0, "not retried")
                    raise
                else:
                    self._release(srv, True, 0.0)
                    return result
            if attempt < self.max_retries:
                with self._lock:
                    self.retries += 1
                    others = any(s.healthy and s is not failed for s in self.servers)
                if not others:  # nowhere else to go: back off before the next try
                    time.sleep(self.backoff * (2 ** backoffs) * (1 + 0.25 * random.random()))
                    backoffs += 1
        raise BackendError(f"openai backend: request failed after {self.max_retries + 1} attempts ({last})")

    def server_stats(self) -> dict[str, Any]:
        """Requests answered, failed attempts, times taken out / put back and seconds lost, per
        server; ``retries`` counts the re-sent requests of the whole backend."""
        with self._lock:
            return {"servers": [s.stats() for s in self.servers], "retries": self.retries,
                    "concurrency_per_server": self.concurrency}

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        return [a for a, _ in self._answer_all(list(requests), score=False)]

    def localize(self, requests: Sequence[MLLMRequest]) -> list[LocAnswer]:
        """T_loc answers with p_yes from the first token's ``top_logprobs`` (module docstring);
        p_yes None where the server gave none that can be read."""
        requests = list(requests)
        check_loc_requests(requests)
        out = []
        for text, logprobs in self._answer_all(requests, score=True):
            p, how = p_yes_from_top_logprobs(logprobs)
            with self._lock:
                self.loc_scores[how] += 1
                warn = p is None and not self._warned_unscored
                if warn:
                    self._warned_unscored = True
                if how == "no logprobs":
                    self.scores_loc = False
            if warn:
                logger.warning(
                    "openai backend: %s for a T_loc reply (%s, model %s): such answers keep their text with no "
                    "p_yes (counted in loc_score_stats(); this warning is shown once)",
                    "the server sent no logprobs" if how == "no logprobs"
                    else f"none of the first token's top {TOP_LOGPROBS} logprobs is a Yes/No token", self.base_url,
                    self.model)
            out.append(LocAnswer(text, p))
        return out

    def loc_score_stats(self) -> dict[str, int]:
        """How many localize() replies were scored, had no logprobs, or had no Yes/No token."""
        with self._lock:
            return dict(self.loc_scores)

    def _answer_all(self, requests: list[MLLMRequest], score: bool) -> list[tuple[str, Any]]:
        if not requests:
            return []
        if not self._checked:
            self.check_server()
            self._checked = True
        if self._pool is None:  # ``concurrency`` in flight per server (``_acquire`` bounds it)
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency * len(self.servers),
                                            thread_name_prefix="openai")
        for r in requests:
            if r.image is not None:
                self.visual_tokens.append(self._expected_tokens(r.image))
        # map keeps the order; the first error propagates
        results = list(self._pool.map(lambda r: self._one(r, score), requests))
        cut = Counter(r.task for r, (_, capped, _) in zip(requests, results) if capped)
        self.capped.update(cut)
        warn_truncated(self.kind, sum(cut.values()), len(requests), dict(cut))
        return [(a, lp) for a, _, lp in results]

    def _expected_tokens(self, path: str) -> int:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return expected_visual_tokens(w, h, self.min_pixels, self.max_pixels, self.patch_size)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
