"""tools/link_identical.py: the second venv shares identical files with the first, and nothing else."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("link_identical", ROOT / "tools" / "link_identical.py")
link_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(link_mod)

BIG = 100 * 1024


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_links_only_identical_large_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    same = os.urandom(BIG)
    _write(a / "nvidia/cublas/lib/libcublas.so", same)
    _write(b / "nvidia/cublas/lib/libcublas.so", same)
    _write(a / "torch/lib/libtorch.so", os.urandom(BIG))
    _write(b / "torch/lib/libtorch.so", os.urandom(BIG))  # same path and size, other bytes
    _write(a / "small.py", b"x = 1\n")
    _write(b / "small.py", b"x = 1\n")  # identical but small: left alone
    _write(a / "mode.so", same, 0o755)
    _write(b / "mode.so", same, 0o644)  # identical bytes, other mode: left alone
    _write(b / "only_b.so", same)  # no counterpart

    files, saved = link_mod.link_identical(a, b)

    assert (files, saved) == (1, BIG)
    ino = lambda p: p.stat().st_ino  # noqa: E731
    assert ino(a / "nvidia/cublas/lib/libcublas.so") == ino(b / "nvidia/cublas/lib/libcublas.so")
    assert ino(a / "torch/lib/libtorch.so") != ino(b / "torch/lib/libtorch.so")
    assert ino(a / "small.py") != ino(b / "small.py")
    assert ino(a / "mode.so") != ino(b / "mode.so")
    assert (b / "nvidia/cublas/lib/libcublas.so").read_bytes() == same
    assert not list(b.rglob("*.link-tmp"))
    # a second pass finds nothing left to do
    assert link_mod.link_identical(a, b) == (0, 0)


def test_upgrade_in_one_venv_leaves_the_other_intact(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    same = os.urandom(BIG)
    _write(a / "lib.so", same)
    _write(b / "lib.so", same)
    link_mod.link_identical(a, b)
    # what pip does on an upgrade or uninstall: unlink, then write a new file
    (a / "lib.so").unlink()
    _write(a / "lib.so", os.urandom(BIG))
    assert (b / "lib.so").read_bytes() == same


def test_cli_rejects_a_missing_directory(tmp_path: Path, capsys) -> None:
    assert link_mod.main([str(tmp_path), str(tmp_path / "missing")]) == 2
    assert "missing is not a directory" in capsys.readouterr().err
