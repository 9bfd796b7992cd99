"""On-disk answer cache shared by every backend.

Key = SHA-256 of (backend identity, task, prompt, image content hash). The identity holds the
model, the adapter's content hash and the decoding settings, so a changed model or adapter never
reuses an old answer, and a moved image with the same bytes still hits.

Storage is one SQLite file (``answers.sqlite``) in write-ahead-log mode: each batch of new
answers is committed in one transaction, so a killed run loses at most the batch in flight and
never leaves a torn entry; several processes (``accelerate launch``) can share the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .base import MLLMBackend, MLLMRequest, file_sha256

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    task TEXT NOT NULL,
    prompt TEXT NOT NULL,
    image TEXT,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (hash TEXT PRIMARY KEY, identity TEXT NOT NULL);
"""


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def request_key(ident_hash: str, req: MLLMRequest) -> str:
    img = file_sha256(req.image) if req.image is not None else "-"
    payload = "\x00".join((ident_hash, req.task, req.prompt, img))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CacheMiss(KeyError):
    """A replay-only cache (backend=None) was asked something it has not stored."""


class CachedBackend(MLLMBackend):
    """Wrap a backend with the persistent answer cache.

    Counters (per task): ``requests`` received, ``calls`` actually sent to the wrapped backend,
    ``hits`` answered from the cache (stored earlier, or a duplicate within the same batch).
    With ``backend=None`` it replays a cache and raises :class:`CacheMiss` on anything missing;
    then ``identity`` must be given.
    """

    def __init__(
        self,
        backend: MLLMBackend | None,
        cache_dir: str | Path,
        identity: dict[str, Any] | None = None,
    ) -> None:
        if backend is None and identity is None:
            raise ValueError("CachedBackend without a backend needs the identity of the answers to replay")
        self.backend = backend
        self._identity = dict(identity) if identity is not None else backend.identity()  # type: ignore[union-attr]
        self.kind = f"cached:{getattr(backend, 'kind', 'replay')}"
        self.simulated = bool(getattr(backend, "simulated", self._identity.get("simulated", False)))
        self.ident_hash = identity_hash(self._identity)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.cache_dir / "answers.sqlite"
        self._db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO identities VALUES (?, ?)",
            (self.ident_hash, json.dumps(self._identity, sort_keys=True, default=str)),
        )
        self.requests: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.backend_seconds: Counter[str] = Counter()

    # -- MLLMBackend -----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        requests = list(requests)
        keys = [request_key(self.ident_hash, r) for r in requests]
        for r in requests:
            self.requests[r.task] += 1
        found = self._lookup(set(keys))
        # one backend call per distinct missing key, in first-seen order
        missing: dict[str, MLLMRequest] = {}
        for k, r in zip(keys, requests):
            if k not in found and k not in missing:
                missing[k] = r
        if missing:
            if self.backend is None:
                r = next(iter(missing.values()))
                raise CacheMiss(
                    f"{len(missing)} answer(s) are not in the cache {self.path} "
                    f"(first: task {r.task}, image {r.image}); run with a backend to fill it"
                )
            todo = list(missing.values())
            t0 = time.perf_counter()
            answers = self.backend.generate(todo)
            dt = time.perf_counter() - t0
            if len(answers) != len(todo):
                raise RuntimeError(
                    f"backend {self.backend.kind} returned {len(answers)} answers for {len(todo)} requests"
                )
            now = time.time()
            rows = []
            for (k, r), a in zip(missing.items(), answers):
                if not isinstance(a, str):
                    raise TypeError(f"backend {self.backend.kind} returned a {type(a).__name__}, expected str")
                found[k] = a
                rows.append((k, self.ident_hash, r.task, r.prompt, r.image, a, now))
                self.calls[r.task] += 1
                self.backend_seconds[r.task] += dt / len(todo)
            # one transaction per batch: a kill loses at most this batch
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        for k, r in zip(keys, requests):
            if k not in missing:
                self.hits[r.task] += 1
            else:
                missing.pop(k)  # later duplicates of the same key count as hits
        return [found[k] for k in keys]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]
        if self.backend is not None:
            self.backend.close()

    # -- helpers ---------------------------------------------------------------------------
    def _lookup(self, keys: set[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        klist = list(keys)
        for i in range(0, len(klist), 500):
            chunk = klist[i : i + 500]
            q = f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(self._db.execute(q, chunk).fetchall())
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        tasks = sorted(set(self.requests) | set(self.calls))
        return {
            "requests": {t: self.requests[t] for t in tasks},
            "backend_calls": {t: self.calls[t] for t in tasks},
            "cache_hits": {t: self.hits[t] for t in tasks},
            "backend_seconds": {t: round(self.backend_seconds[t], 3) for t in tasks},
        }

    def reset_counters(self) -> None:
        for c in (self.requests, self.calls, self.hits, self.backend_seconds):
            c.clear()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers WHERE identity = ?", (self.ident_hash,)).fetchone()[0])
