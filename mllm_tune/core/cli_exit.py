"""One ``error: ...`` line instead of a traceback for the mistakes a user makes on a command line.

The CLIs (``eval.icl_end2end``, ``data_builders.rda``, ``data_builders.anchor_pairs``) let
:func:`user_errors` through their ``main()`` (tests match on them) and turn them into one line and
exit status 2 in :func:`run_cli`. Anything else is a bug and keeps its traceback. Set
``MLLM_TUNE_TRACEBACK=1`` to see the traceback of a user error too.

This module sits on the core floor next to ``hub`` and ``pedes``; the error types of the
sub-packages (``backends.BackendError``, ``retrievers.RetrieverLoadError``) are added by the
callers through ``extra``, so the core folder never imports its sub-packages (no circle).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


class CLIError(ValueError):
    """Bad command-line input; the message names the argument/file and the fix."""


def user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug, plus ``extra``."""
    from mllm_tune.core.hub import ModelResolveError
    from mllm_tune.core.pedes import PedesFormatError

    return (CLIError, ModelResolveError, PedesFormatError, FileNotFoundError, NotADirectoryError,
            PermissionError, *extra)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages are joined)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if isinstance(exc, (FileNotFoundError, PermissionError)) and getattr(exc, "filename", None) and not text.count(" "):
        text = f"{exc.strerror}: {exc.filename}"
    return text or type(exc).__name__


def check_dataset_root(root: str | Path, flag: str = "--dataset-root") -> Path:
    """The dataset root must be an existing folder; say so before anything loads."""
    p = Path(root).expanduser()
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise CLIError(f"{flag} {root} {what}: pass the folder that holds the dataset's annotation file "
                       "(e.g. reid_raw.json or data_captions.json) and its images")
    return p


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
            extra: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``main(argv)``; a user error prints ``error: ...`` on stderr and returns 2."""
    try:
        main(argv)
    except user_errors(*extra) as exc:
        if os.environ.get("MLLM_TUNE_TRACEBACK"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume from the cache", file=sys.stderr)
        return 130
    return 0
