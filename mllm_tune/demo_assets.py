"""Where the demo models shipped in the repository live.

``demo_model("synthpedes-vl")`` returns the folder of a shipped model (safetensors, processor
files and a README model card), so the demo, the evaluation CLI and the tests load it by name
instead of by a path that depends on the working directory.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS_DIR = Path(__file__).resolve().parent.parent / "demo_models"

# name -> folder under demo_models/, and the file that proves it is complete
DEMO_MODELS: dict[str, str] = {
    "synthpedes-vl": "synthpedes-vl",
    "clip-synthpedes": "clip-synthpedes",
}


def demo_model(name: str = "synthpedes-vl") -> Path:
    """The folder of a shipped demo model; a clear error when it is missing."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model '{name}': choose one of {', '.join(sorted(DEMO_MODELS))}")
    path = DEMO_MODELS_DIR / DEMO_MODELS[name]
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"demo model '{name}' is not in {path}: it ships with the repository (git checkout of "
            f"demo_models/), or rebuild it with the command in {path / 'README.md'}"
        )
    return path
