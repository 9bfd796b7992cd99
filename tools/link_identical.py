"""Replace files of one venv that are byte-identical to the same path in another venv by hard links.

    python tools/link_identical.py SOURCE_SITE_PACKAGES TARGET_SITE_PACKAGES

Why: `.venv` (torch 2.14.1) and `.venv-vllm` (torch 2.13.0) are both CUDA builds of torch and
carry mostly the same NVIDIA libraries, pyarrow, pandas, sympy...: about 2.4 GB that would be on
disk twice. pip never writes into an installed file (an upgrade unlinks it and writes a new one),
so a shared inode stays correct in both venvs when either is later upgraded or removed.
Files on another file system, symlinks and files under 64 KiB are left alone.
"""

from __future__ import annotations

import filecmp
import os
import sys
from pathlib import Path

MIN_BYTES = 64 * 1024  # small files save nothing worth an extra compare


def link_identical(source: Path, target: Path) -> tuple[int, int]:
    """Hard-link every large file under `target` identical to `source`/same path; (files, bytes)."""
    if source.stat().st_dev != target.stat().st_dev:
        return 0, 0
    files = saved = 0
    for root, _, names in os.walk(target):
        rel = Path(root).relative_to(target)
        for name in names:
            dst = Path(root) / name
            src = source / rel / name
            if dst.is_symlink() or not src.is_file() or src.is_symlink():
                continue
            sd, ss = dst.stat(), src.stat()
            if sd.st_size < MIN_BYTES or sd.st_size != ss.st_size or sd.st_ino == ss.st_ino:
                continue
            if sd.st_mode != ss.st_mode:  # one inode has one mode: keep both as they are
                continue
            if not filecmp.cmp(src, dst, shallow=False):
                continue
            tmp = dst.with_name(dst.name + ".link-tmp")
            os.link(src, tmp)
            os.replace(tmp, dst)  # atomic: the file is never missing
            files += 1
            saved += sd.st_size
    return files, saved


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = (Path(a) for a in argv)
    for p in (source, target):
        if not p.is_dir():
            print(f"link_identical: {p} is not a directory", file=sys.stderr)
            return 2
    files, saved = link_identical(source, target)
    print(f"link_identical: {files} files of {target} now share {saved / 2**30:.2f} GiB with {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
