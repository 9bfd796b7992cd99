"""Model arguments that name either a local folder or a hub repository (``org/name[@revision]``).

``resolve_model`` turns such an argument into a local folder. A hub id is fetched with
huggingface_hub's ``snapshot_download`` into the ordinary HF cache (``HF_HOME`` /
``HF_HUB_CACHE``), so a second run reuses it and ``HF_HUB_OFFLINE=1`` serves it from the cache
without any request. The resolved commit hash goes into backend cache identities: a moving
branch (``main``) that gets a new commit never reuses answers of the old weights.

Every failure is one :class:`ModelResolveError` whose message names the argument and the fix.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

# org/name with the characters the hub allows; an optional @revision (branch, tag or commit).
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+))?$")
_COMMIT_RE = re.compile(r"/snapshots/([0-9a-f]{40})(?:/|$)")


class ModelResolveError(ValueError):
    """A model argument is neither an existing local folder nor a hub id that can be fetched."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model argument lives: ``path`` (always a local folder) and, for hub ids, the
    repository, the revision asked for and the commit it resolved to."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def identity(self) -> dict[str, str | None]:
        """What names the weights in a cache identity (the commit for hub models)."""
        if self.repo_id is None:
            return {"path": str(self.path.resolve())}
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be meant as a filesystem path (absolute, ./, ../, ~, or more
    than one '/'), so a missing folder is reported as a missing folder, not a bad repo id."""
    return (spec.startswith(("/", "./", "../", "~", "."))
            or spec.count("/") > 1 and "@" not in spec
            or "\\" in spec)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """``org/name[@rev]`` -> (repo_id, revision or None); ModelResolveError when malformed."""
    m = _REPO_RE.match(spec)
    if not m or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        raise ModelResolveError(
            f"model '{spec}' is not a local folder and not a hub id: pass an existing folder, or a hub id "
            "written org/name or org/name@revision (e.g. Qwen/Qwen2-VL-7B-Instruct@main)")
    return m.group("repo"), m.group("rev")


def _offline() -> bool:
    # read at call time too: huggingface_hub reads HF_HUB_OFFLINE once, at import
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None and env.strip():
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model(spec: str | Path, *, allow_patterns: Sequence[str] | None = None,
                  what: str = "model") -> ResolvedModel:
    """A local folder -> itself; ``org/name[@revision]`` -> a snapshot in the HF cache.

    ``allow_patterns`` limits the download (e.g. configs and safetensors only); ``what`` names
    the argument in error messages ("model", "adapter", "CLIP retriever").
    """
    text = str(spec).strip()
    if not text:
        raise ModelResolveError(f"the {what} argument is empty: pass a local folder or a hub id org/name")
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelResolveError(f"{what} {local} is a file, not a folder: pass the folder that holds config.json")
        return ResolvedModel(path=local)
    if isinstance(spec, Path) or looks_like_path(text):
        raise ModelResolveError(f"{what} folder {text} does not exist: check the path (or pass a hub id org/name)")
    repo_id, revision = parse_hub_id(text)

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    try:
        # HF_ENDPOINT is passed explicitly: huggingface_hub reads it only at import time
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None,
                                 endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline)
    except GatedRepoError:
        raise ModelResolveError(f"{what} '{repo_id}' is gated on the hub: accept its licence on the hub page and log in "
                                "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelResolveError(f"{what} '{text}' is neither a local folder (no such path) nor a repo on the hub (or the "
                                "repo is private): check the path or the id, or log in for a private repo") from None
    except RevisionNotFoundError:
        raise ModelResolveError(f"{what} '{repo_id}' has no revision '{revision}': pass an existing branch, tag or "
                                "commit after '@'") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelResolveError(f"{what} '{text}' is not in the HF cache and HF_HUB_OFFLINE=1 forbids downloading "
                                    "it: download it once online (`hf download " + repo_id + "`) or unset "
                                    "HF_HUB_OFFLINE") from None
        raise ModelResolveError(f"{what} '{text}' could not be downloaded (no connection to the hub?) and is not in the "
                                "HF cache: check the network or HF_ENDPOINT, or pass a local folder") from None
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelResolveError(f"{what} '{text}' could not be fetched from the hub ({first}): check the id and the "
                                "network, or pass a local folder") from None
    m = _COMMIT_RE.search(Path(path).as_posix())
    commit = m.group(1) if m else None
    logger.info("%s %s resolved to %s (commit %s)", what, text, path, commit)
    return ResolvedModel(path=Path(path), repo_id=repo_id, revision=revision, commit=commit)
