"""The README's main command (`make demo`): the whole toolkit on SynthPEDES, on a CPU.

For now it generates SynthPEDES and prints its statistics; the end-to-end stages are added
as the issues land."""

from __future__ import annotations

import argparse
import logging
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="working folder for the demo's data and models")
    ap.add_argument("--num-ids", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_builders.synthetic import format_stats, generate

    data = f"{args.out}/synthpedes"
    stats = generate(data, num_ids=args.num_ids, seed=args.seed)
    print(format_stats(stats, data))
    return {"synthpedes": stats}


if __name__ == "__main__":
    main()
