"""Push a trained adapter (weights, adapter config, processor files, model card) to a model hub.

    python -m mllm_tune.push --adapter outputs/run --repo-id you/qwen2-vl-anchor-lora [--private]

Uses huggingface_hub (`HfApi.create_repo` + `upload_folder`); `--endpoint` or `HF_ENDPOINT`
selects another hub. Checkpoints, optimizer states and logs in the folder are not uploaded.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("mllm_tune.push")

# Training leftovers that do not belong in a published adapter.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "global_step*/**", "*.pt", "*.pth",
                   "training_args.bin", "zero_to_fp32.py", "zero_to_torch.py", "latest"]


class PushError(ValueError):
    pass


def _http_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's base error (huggingface_hub 2.x uses httpx2, 1.x httpx): connection
    failures are not OSErrors there."""
    out = []
    for name in ("httpx2", "httpx"):
        try:
            out.append(__import__(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _weights_problem(path: Path) -> str | None:
    from mllm_tune.core.modeling import safetensors_problem

    return safetensors_problem(path)


def push_adapter(adapter_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                 endpoint: str | None = None, revision: str | None = None,
                 commit_message: str = "Upload LoRA adapter") -> str:
    """Create the repo if needed and upload the adapter folder; returns the commit URL."""
    from huggingface_hub import HfApi

    from mllm_tune.model_card import CARD_NAME, card_from_adapter

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise PushError(f"adapter folder {adapter_dir} does not exist; pass the output_dir of an mllm_tune.sft run")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / f).is_file():
            raise PushError(f"{adapter_dir} is not a trained adapter folder: {f} is missing")
    problem = _weights_problem(adapter_dir / "adapter_model.safetensors")
    if problem:  # never publish a cut file
        raise PushError(f"{problem}: copy the adapter again or re-save it before pushing")
    if not repo_id or repo_id.count("/") > 1:
        raise PushError(f"repo id {repo_id!r} must look like 'name' or 'owner/name'")
    card = adapter_dir / CARD_NAME
    if not card.is_file():
        card.write_text(card_from_adapter(adapter_dir, repo_id), encoding="utf-8")
    # The endpoint is read here, not at import: huggingface_hub may have been imported before
    # HF_ENDPOINT was set.
    from huggingface_hub.errors import HfHubHTTPError

    url_base = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=url_base, token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", None) or repo_id
        info = api.upload_folder(folder_path=str(adapter_dir), repo_id=repo_id, repo_type="model",
                                 revision=revision, commit_message=commit_message, ignore_patterns=IGNORE_PATTERNS)
    except (HfHubHTTPError, OSError, *_http_errors()) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise PushError(f"pushing {adapter_dir} to {repo_id} at {url_base or 'the default hub'} failed ({first}): "
                        "check --endpoint / HF_ENDPOINT, the network and the token (--token, HF_TOKEN or "
                        "`hf auth login`)") from None
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s (%s)", adapter_dir, repo_id, url)
    return url


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="adapter folder written by mllm_tune.sft")
    ap.add_argument("--repo-id", required=True, help="hub repo, e.g. you/qwen2-vl-anchor-lora")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--token", default=None, help="hub token (default: HF_TOKEN / the cached login)")
    ap.add_argument("--endpoint", default=None, help="hub URL (default: HF_ENDPOINT or huggingface.co)")
    ap.add_argument("--revision", default=None, help="branch to push to")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        url = push_adapter(args.adapter, args.repo_id, args.token, args.private, args.endpoint, args.revision)
    except PushError as exc:
        raise SystemExit("error: " + " ".join(str(exc).split())) from None
    print(url)
    return url


if __name__ == "__main__":
    main()
