"""On-disk answer cache shared by every backend.

Key = SHA-256 of (backend identity, task, prompt, image content hash). The identity holds the
model, the adapter's content hash and the decoding settings, so a changed model or adapter never
reuses an old answer, and a moved image with the same bytes still hits.

Storage (docs/multinode.md): one SQLite file per writer, each batch of new answers committed in one
transaction, so a killed run loses at most the batch in flight and never leaves a torn entry.

- ``answers.sqlite``: the cache of a single-process run (write-ahead-log mode on a local disk) and
  the merged cache of a sharded one.
- ``shard-RANK.sqlite``: under ``accelerate launch`` / torchrun each process writes its own file
  (rollback journal, no shared memory, one writer: safe on NFS/Lustre/GPFS, where SQLite's WAL mode
  is not) and reads the merged ``answers.sqlite`` of earlier runs read-only. The main process then
  merges every shard into ``answers.sqlite`` atomically (:func:`merge_shards`: a temporary file,
  then ``os.replace``), also at the start of a run, so a run resumed with any number of processes
  reuses every shard's answers.

``python -m mllm_tune.core.backends.cache merge OUT IN...`` merges caches (files or folders) by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .base import LocAnswer, MLLMBackend, MLLMRequest, check_loc_requests, file_sha256, localize_any

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    task TEXT NOT NULL,
    prompt TEXT NOT NULL,
    image TEXT,
    answer TEXT NOT NULL,
    created REAL NOT NULL,
    p_yes REAL
);
CREATE TABLE IF NOT EXISTS identities (hash TEXT PRIMARY KEY, identity TEXT NOT NULL);
"""


COLUMNS = ("key", "identity", "task", "prompt", "image", "answer", "created", "p_yes")


def has_p_yes_column(con: sqlite3.Connection, schema: str = "main") -> bool:
    return any(r[1] == "p_yes" for r in con.execute(f"PRAGMA {schema}.table_info(answers)"))


def _ensure_p_yes_column(con: sqlite3.Connection) -> None:
    """Caches written before T_loc scores existed have no p_yes column: add it (NULL = not scored)."""
    if not has_p_yes_column(con):
        con.execute("ALTER TABLE answers ADD COLUMN p_yes REAL")


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def request_key(ident_hash: str, req: MLLMRequest) -> str:
    img = file_sha256(req.image) if req.image is not None else "-"
    payload = "\x00".join((ident_hash, req.task, req.prompt, img))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


SHARED_NAME = "answers.sqlite"
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "lustre", "gpfs", "beegfs",
                        "ceph", "glusterfs", "9p", "afs", "panfs", "wekafs"})


def shard_name(rank: int) -> str:
    return f"shard-{int(rank)}.sqlite"


def shard_files(cache_dir: str | Path) -> list[Path]:
    """The per-process cache files of a folder, by rank."""
    found = [p for p in Path(cache_dir).glob("shard-*.sqlite") if p.stem.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("-", 1)[1]))


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The file-system type of the mount holding ``path`` (longest matching mount point in
    ``/proc/mounts``, or the ``mounts`` text given); None when it cannot be told."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    target = os.path.realpath(os.path.abspath(path))  # also for a folder not created yet
    best, fstype = -1, None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and len(point) > best:
            best, fstype = len(point), parts[2]
    return fstype


def is_network_fs(fstype: str | None) -> bool:
    return bool(fstype) and (fstype in NETWORK_FS or fstype.startswith("fuse."))  # type: ignore[union-attr]


def _checkpoint(path: Path) -> None:
    """Fold a WAL file back into ``path`` and leave it in rollback-journal mode (no -wal/-shm)."""
    con = sqlite3.connect(path, timeout=120, isolation_level=None)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA journal_mode=DELETE")
    finally:
        con.close()


def merge_caches(out: str | Path, inputs: Sequence[str | Path]) -> int:
    """Merge answer-cache files (or folders: their answers.sqlite and shard files) into ``out``,
    atomically: everything is written to a temporary file next to ``out`` that replaces it with
    ``os.replace``, so a kill mid-merge leaves the old ``out`` whole. ``out`` itself, when it
    exists, is kept (its answers win over equal keys). Returns the rows of the merged file.
    Nothing may write to ``out`` or the inputs meanwhile."""
    out = Path(out)
    files: list[Path] = []
    for src in [out, *map(Path, inputs)]:
        group = ([src / SHARED_NAME] + shard_files(src)) if src.is_dir() else [src]
        for f in group:
            if f.is_file() and f.resolve() not in {g.resolve() for g in files}:
                files.append(f)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merge-{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp, isolation_level=None)
    try:
        con.executescript(_SCHEMA)
        for f in files:
            if f == out:
                _checkpoint(f)  # a single-process run's WAL folded in before it is read
            con.execute("ATTACH DATABASE ? AS src", (str(f),))
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM src.sqlite_master WHERE type='table'")}
                con.execute("BEGIN")
                if "answers" in tables:
                    # earlier answers win, except that a scored T_loc answer (p_yes) replaces an
                    # unscored one of the same key: a score, once paid for, is never lost
                    p_yes = "p_yes" if has_p_yes_column(con, "src") else "NULL"
                    cols = ", ".join(COLUMNS)
                    con.execute(
                        f"INSERT INTO main.answers ({cols}) SELECT {', '.join(COLUMNS[:-1])}, {p_yes} FROM src.answers WHERE true "
                        "ON CONFLICT(key) DO UPDATE SET answer = excluded.answer, p_yes = excluded.p_yes "
                        "WHERE answers.p_yes IS NULL AND excluded.p_yes IS NOT NULL")
                if "identities" in tables:
                    con.execute("INSERT OR IGNORE INTO main.identities SELECT * FROM src.identities")
                con.execute("COMMIT")
            finally:
                con.execute("DETACH DATABASE src")
        rows = int(con.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
    finally:
        con.close()
    with open(tmp, "rb") as fh:  # on disk before it becomes the cache
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    for stale in (out.with_name(out.name + "-wal"), out.with_name(out.name + "-shm")):
        stale.unlink(missing_ok=True)
    return rows


def merge_shards(cache_dir: str | Path) -> dict[str, Any]:
    """Merge the folder's shard files into its ``answers.sqlite`` (atomically) and remove them.
    Idempotent: killed after the replace but before the removal, the next call merges the same
    rows again. Returns what was merged."""
    cache_dir = Path(cache_dir)
    shards = shard_files(cache_dir)
    shared = cache_dir / SHARED_NAME
    if not shards and not shared.exists():
        return {"shards": 0, "rows": 0}
    rows = merge_caches(shared, shards)
    for f in shards:
        for p in (f, f.with_name(f.name + "-journal")):
            p.unlink(missing_ok=True)
    return {"shards": len(shards), "rows": rows, "merged_into": str(shared)}


class CacheMiss(KeyError):
    """A replay-only cache (backend=None) was asked something it has not stored."""


class CachedBackend(MLLMBackend):
    """Wrap a backend with the persistent answer cache.

    Counters (per task): ``requests`` received, ``calls`` actually sent to the wrapped backend,
    ``hits`` answered from the cache (stored earlier, or a duplicate within the same batch).
    With ``backend=None`` it replays a cache and raises :class:`CacheMiss` on anything missing;
    then ``identity`` must be given. ``shard=RANK`` writes to ``shard-RANK.sqlite`` (one file per
    process) and also reads the folder's merged ``answers.sqlite`` (read-only).
    """

    def __init__(
        self,
        backend: MLLMBackend | None,
        cache_dir: str | Path,
        identity: dict[str, Any] | None = None,
        shard: int | None = None,
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
        self.shard = shard
        self.fs_type = filesystem_type(self.cache_dir)
        self._base: sqlite3.Connection | None = None
        if shard is None:
            self.path = self.cache_dir / SHARED_NAME
            self._db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            if is_network_fs(self.fs_type):
                logger.warning(
                    "answer cache %s is on a network file system (%s): SQLite's WAL mode is not safe there, so it "
                    "uses a rollback journal, and several processes or nodes must not share this file; sharded runs "
                    "(accelerate launch / torchrun) write one file per process. See docs/multinode.md",
                    self.path, self.fs_type)
                self._db.execute("PRAGMA journal_mode=DELETE")
            else:
                self._db.execute("PRAGMA journal_mode=WAL")
        else:
            self.path = self.cache_dir / shard_name(shard)
            self._db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=DELETE")  # one writer, no shared memory: NFS-safe
            shared = self.cache_dir / SHARED_NAME
            if shared.exists():  # merged answers of earlier runs; nobody writes it during the sharded phase
                self._base = sqlite3.connect(f"{shared.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        _ensure_p_yes_column(self._db)
        self._base_p_yes = self._base is not None and has_p_yes_column(self._base)
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
        return [a.text for a in self._answer(requests, scored=False, need_score=False)]

    @property
    def scores_loc(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.backend, "scores_loc", False))

    def localize(self, requests: Sequence[MLLMRequest], need_score: bool = False) -> list[LocAnswer]:
        """T_loc answers with their p_yes. An entry stored without a score (a text-only run, a
        cache older than scores) is reused as it is unless ``need_score`` and the wrapped backend
        can score; then it is asked again and replaced by the scored answer."""
        check_loc_requests(requests)
        return self._answer(requests, scored=True, need_score=need_score and (self.backend is None or self.scores_loc))

    def _answer(self, requests: Sequence[MLLMRequest], scored: bool, need_score: bool) -> list[LocAnswer]:
        requests = list(requests)
        keys = [request_key(self.ident_hash, r) for r in requests]
        for r in requests:
            self.requests[r.task] += 1
        found = self._lookup(set(keys))
        if need_score:
            found = {k: v for k, v in found.items() if v.p_yes is not None}
        # one backend call per distinct missing key, in first-seen order
        missing: dict[str, MLLMRequest] = {}
        for k, r in zip(keys, requests):
            if k not in found and k not in missing:
                missing[k] = r
        if missing:
            if self.backend is None:
                r = next(iter(missing.values()))
                what = "scored (p_yes) answer(s)" if need_score else "answer(s)"
                raise CacheMiss(
                    f"{len(missing)} {what} are not in the cache {self.path} "
                    f"(first: task {r.task}, image {r.image}); run with a backend to fill it"
                )
            todo = list(missing.values())
            t0 = time.perf_counter()
            if scored:
                answers = localize_any(self.backend, todo)
            else:
                answers = [LocAnswer(a, None) if isinstance(a, str) else a for a in self.backend.generate(todo)]
            dt = time.perf_counter() - t0
            if len(answers) != len(todo):
                raise RuntimeError(
                    f"backend {self.backend.kind} returned {len(answers)} answers for {len(todo)} requests"
                )
            now = time.time()
            rows = []
            for (k, r), a in zip(missing.items(), answers):
                if not isinstance(a, LocAnswer) or not isinstance(a.text, str):
                    raise TypeError(f"backend {self.backend.kind} returned a {type(a).__name__}, expected str")
                found[k] = a
                rows.append((k, self.ident_hash, r.task, r.prompt, r.image, a.text, now,
                             None if a.p_yes is None else float(a.p_yes)))
                self.calls[r.task] += 1
                self.backend_seconds[r.task] += dt / len(todo)
            # one transaction per batch: a kill loses at most this batch
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(f"INSERT OR REPLACE INTO answers ({', '.join(COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(COLUMNS))})", rows)
        for k, r in zip(keys, requests):
            if k not in missing:
                self.hits[r.task] += 1
            else:
                missing.pop(k)  # later duplicates of the same key count as hits
        return [found[k] for k in keys]

    def close_cache(self) -> None:
        """Close the cache files only (the wrapped backend stays usable)."""
        for con in (self._db, self._base):
            if con is not None:
                con.close()
        self._db = self._base = None  # type: ignore[assignment]

    def close(self) -> None:
        self.close_cache()
        if self.backend is not None:
            self.backend.close()

    # -- helpers ---------------------------------------------------------------------------
    def _lookup(self, keys: set[str]) -> dict[str, LocAnswer]:
        out: dict[str, LocAnswer] = {}
        klist = list(keys)
        for i in range(0, len(klist), 500):
            chunk = klist[i : i + 500]
            q = f"SELECT key, answer, p_yes FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
            out.update((k, LocAnswer(a, p)) for k, a, p in self._db.execute(q, chunk))
            if self._base is not None:
                # the merged file may hold an unscored entry that a shard has scored, or the reverse
                rest = [k for k in chunk if k not in out or out[k].p_yes is None]
                if rest:
                    p_col = "p_yes" if self._base_p_yes else "NULL"
                    q = f"SELECT key, answer, {p_col} FROM answers WHERE key IN ({','.join('?' * len(rest))})"
                    for k, a, p in self._base.execute(q, rest):
                        if k not in out or p is not None:
                            out[k] = LocAnswer(a, p)
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
        """Answers of this identity in this file (a shard: plus the merged file it reads)."""
        n = int(self._db.execute("SELECT COUNT(*) FROM answers WHERE identity = ?", (self.ident_hash,)).fetchone()[0])
        if self._base is not None:
            n += int(self._base.execute("SELECT COUNT(*) FROM answers WHERE identity = ?",
                                        (self.ident_hash,)).fetchone()[0])
        return n


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mllm_tune.core.backends.cache merge OUT IN...``"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mllm_tune.core.backends.cache",
                                 description="Answer-cache tools (docs/multinode.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge caches (files, or folders with answers.sqlite / shard-*.sqlite) into "
                                     "OUT atomically; OUT's own answers are kept")
    m.add_argument("out", help="the merged file, e.g. runs/e2e/cache/answers.sqlite (a folder: its answers.sqlite)")
    m.add_argument("inputs", nargs="+")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.is_dir() or not out.suffix:
        out = out / SHARED_NAME
    missing = [i for i in a.inputs if not Path(i).exists()]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        rows = merge_caches(out, a.inputs)
    except sqlite3.DatabaseError as exc:
        print(f"error: not an answer cache ({exc}); inputs: {', '.join(a.inputs)}", file=sys.stderr)
        return 2
    print(f"{out}: {rows} answers (merged {len(a.inputs)} input(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
