"""Benchmarks of mllm-tune (not tests): ``python -m bench [--smoke] [--only NAME]``.

Each benchmark is a module ``bench/bench_<name>.py`` with ``run(smoke: bool = False) -> dict``
returning ``{"title": str, "markdown": str, "figures": dict}``. Comparisons are measured side by
side in one run and reported as ratios. This package also holds the shared helpers:
:func:`measure` (wall time and peak memory of one call, in a fresh process) and
:func:`md_table`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter so VmHWM measures from now (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _child(setup: Callable, work: Callable, args: tuple, repeat: int, queue) -> None:
    try:
        state = setup(*args)
        best = None
        peak = 0
        result = None
        for _ in range(repeat):
            base = _proc_status().get("VmRSS", 0)
            exact = _reset_peak()
            t0 = time.perf_counter()
            result = work(state)
            dt = time.perf_counter() - t0
            st = _proc_status()
            hwm = st.get("VmHWM", 0) if exact else st.get("VmRSS", 0)
            peak = max(peak, hwm - base)
            best = dt if best is None else min(best, dt)
        queue.put({"ok": True, "seconds": best, "peak_bytes": max(peak, 0), "peak_exact": exact, "result": result})
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put({"ok": False, "error": traceback.format_exc()})


def measure(setup: Callable, work: Callable, *args: Any, repeat: int = 1, timeout: float | None = None,
            isolate: bool = True) -> dict:
    """Time ``work(setup(*args))`` and its peak memory above the set-up, in a fresh process.

    A fresh (spawned) process per measurement keeps allocator caches of one candidate from
    hiding the memory of the next. ``setup`` and ``work`` must be module-level functions.
    Returns ``{"seconds", "peak_mb", "peak_exact", "result"}``; ``seconds`` is the best of
    ``repeat`` runs. Peak memory is the growth of the resident set (VmHWM after resetting it).
    ``isolate=False`` runs in this process (smoke runs: fast, memory figures not meaningful).
    """
    if not isolate:
        import queue as _queue

        q: Any = _queue.Queue()
        _child(setup, work, args, repeat, q)
        msg = q.get()
        if not msg["ok"]:
            raise RuntimeError(f"benchmark call failed:\n{msg['error']}")
        msg.pop("ok")
        msg["peak_mb"] = msg.pop("peak_bytes") / 2**20
        return msg
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(setup, work, args, repeat, queue))
    proc.start()
    try:
        msg = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if not msg["ok"]:
        raise RuntimeError(f"benchmark child failed:\n{msg['error']}")
    msg.pop("ok")
    msg["peak_mb"] = msg.pop("peak_bytes") / 2**20
    return msg


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get 3 significant decimals."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return info


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_<name>.py`` -> ``<name>``), sorted."""
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


__all__ = ["measure", "md_table", "machine_info", "discover", "BENCH_DIR", "REPO_ROOT"]
