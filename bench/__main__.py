"""``python -m bench [--smoke] [--only NAME ...]``: run the benchmarks, write bench/RESULTS.md.

Every ``bench/bench_<name>.py`` is discovered and its ``run(smoke)`` called. Full runs store each
section in ``bench/results.json`` (so ``--only`` refreshes one section and keeps the others) and
render ``bench/RESULTS.md`` from it, with the machine and the command of each section. ``--smoke``
runs every entry on tiny sizes to check it starts, and writes nothing in the repository.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from bench import BENCH_DIR, discover, machine_info

logger = logging.getLogger("bench")


def run_one(name: str, smoke: bool) -> dict:
    """Import ``bench.bench_<name>`` and run it; failures become an error section."""
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(f"bench.bench_{name}")
        res = mod.run(smoke=smoke)
        missing = {"title", "markdown", "figures"} - set(res)
        if missing:
            raise ValueError(f"bench/bench_{name}.py: run() must return the keys {sorted(missing)} too")
        res["ok"] = True
    except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
        res = {"title": name, "markdown": f"```\n{traceback.format_exc()}```", "figures": {}, "ok": False}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def render(sections: dict[str, dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench` (see bench/__main__.py). Comparisons inside a section are",
        "measured side by side in one run on the machine named in it; ratios are the figures to",
        "read, absolute times depend on the machine and its load.",
        "",
    ]
    for name, sec in sorted(sections.items()):
        m = sec.get("machine", {})
        lines += [
            f"## {sec['title']}",
            "",
            f"*`{sec.get('command', '')}` at {sec.get('date', '?')}, commit {m.get('git_commit', '?')}; "
            f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('memory_gb', '?')} GB, "
            f"torch {m.get('torch', '?')}, load {m.get('load_average', '?')}; took {sec.get('seconds')} s*",
            "",
            sec["markdown"].strip(),
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, only check each entry starts; writes nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these benchmarks (known: {discover()})")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results.json", help="JSON store of sections")
    ap.add_argument("--markdown", type=Path, default=BENCH_DIR / "RESULTS.md", help="the rendered report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    known = discover()
    names = known
    if args.only:
        names = [n.removeprefix("bench_").removesuffix(".py") for n in args.only]
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; known: {known}")
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else list(argv))])
    machine = machine_info()
    sections: dict[str, dict] = {}
    for name in names:
        logger.info("running bench_%s%s", name, " (smoke)" if args.smoke else "")
        sec = run_one(name, args.smoke)
        sec.update(command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=machine)
        sections[name] = sec
        print(f"\n## {sec['title']} ({'ok' if sec['ok'] else 'FAILED'}, {sec['seconds']} s)\n{sec['markdown']}\n",
              flush=True)

    if not args.smoke:
        stored: dict[str, dict] = {}
        if args.results.is_file():
            try:
                stored = json.loads(args.results.read_text())
            except json.JSONDecodeError:
                logger.warning("%s is not valid JSON; starting it afresh", args.results)
        stored = {k: v for k, v in stored.items() if k in known}
        stored.update(sections)
        args.results.write_text(json.dumps(stored, indent=1, default=str) + "\n")
        args.markdown.write_text(render(stored))
        logger.info("wrote %s and %s", args.markdown, args.results)
    failed = [n for n, s in sections.items() if not s["ok"]]
    if failed:
        logger.error("failed: %s", failed)
    return {"sections": sections, "failed": failed}


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
