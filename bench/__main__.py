"""``python -m bench [--smoke] [--only NAME ...]``: run the benchmarks, write bench/RESULTS.md.

Every ``bench/bench_<name>.py`` is discovered and its ``run(smoke)`` called. Full runs store each
section in ``bench/results.json`` and replace only the sections they ran in ``bench/RESULTS.md``
(every other section, including hand-written ones, stays as it is), with the machine and the command of each section. ``--smoke``
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


HEADER = [
    "# Benchmarks",
    "",
    "Written by `python -m bench` (see bench/__main__.py). Comparisons inside a section are",
    "measured side by side in one run on the machine named in it; ratios are the figures to",
    "read, absolute times depend on the machine and its load.",
    "",
]


def render_section(sec: dict) -> list[str]:
    m = sec.get("machine", {})
    return [
        f"## {sec['title']}",
        "",
        f"*`{sec.get('command', '')}` at {sec.get('date', '?')}, commit {m.get('git_commit', '?')}; "
        f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('memory_gb', '?')} GB, "
        f"torch {m.get('torch', '?')}, load {m.get('load_average', '?')}; took {sec.get('seconds')} s*",
        "",
        sec["markdown"].strip(),
        "",
    ]


def render(sections: dict[str, dict]) -> str:
    lines = list(HEADER)
    for _, sec in sorted(sections.items()):
        lines += render_section(sec)
    return "\n".join(lines)


def splice(existing: str, fresh: dict[str, dict], old_titles: dict[str, str]) -> str:
    """``existing`` (a RESULTS.md) with the sections of ``fresh`` replaced in place (matched by
    their title, or the title the same benchmark had before) and new ones appended. Everything
    else, including sections written by hand or by other scripts, is kept as it is."""
    lines = existing.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")] + [len(lines)]
    head, blocks = lines[: starts[0]], [lines[a:b] for a, b in zip(starts, starts[1:])]
    for name, sec in sorted(fresh.items()):
        titles = {sec["title"], old_titles.get(name)}
        new = render_section(sec)
        at = next((i for i, b in enumerate(blocks) if b[0][3:].strip() in titles), None)
        if at is None:
            blocks.append(new)
        else:
            blocks[at] = new
    return "\n".join(head + [line for b in blocks for line in b]).rstrip("\n") + "\n"


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
        old_titles = {k: v.get("title", "") for k, v in stored.items()}
        stored.update(sections)
        args.results.write_text(json.dumps(stored, indent=1, default=str) + "\n")
        # only the sections run now change in RESULTS.md: hand-written ones and others' stay verbatim
        md = splice(args.markdown.read_text(), sections, old_titles) if args.markdown.is_file() else render(stored)
        args.markdown.write_text(md)
        logger.info("wrote %s and %s", args.markdown, args.results)
    failed = [n for n, s in sections.items() if not s["ok"]]
    if failed:
        logger.error("failed: %s", failed)
    return {"sections": sections, "failed": failed}


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
