"""The interface every offline retrieval model (f_cross) implements, and the pieces they share.

A retriever turns gallery images and query texts into L2-normalised float32 feature rows on the
CPU; the score of (text i, image j) is ``text_feats[i] @ image_feats[j]`` (SPEC §1). Its
``identity`` is derived from the weights and the preprocessing settings, so it can key an
on-disk feature cache: two retrievers with the same identity give the same features.

Images are read as RGB, resized straight to (H, W) with no crop (person crops must keep head and
feet), scaled to [0, 1] and normalised per channel. The resize filter is a setting of each
retriever (``resample``, part of its identity):

* ``"bilinear"`` for ``irra:``/``rde:`` checkpoints: the released test transform is torchvision's
  ``T.Resize((H, W))`` on a PIL image, whose default interpolation (bilinear) maps to
  ``PIL.Image.resize(..., Image.BILINEAR)``; on PIL input torchvision always antialiases (PIL's
  filters widen their support when shrinking) and ignores ``antialias``. Doing the same PIL call
  and ToTensor/Normalize's arithmetic gives bitwise the same pixel values.
* ``"bicubic"`` for a Hugging Face CLIP folder without a saved setting: the default ``resample=3``
  of ``CLIPImageProcessor`` (and OpenAI CLIP's own preprocessing). A folder's
  ``preprocessor_config.json`` ``resample`` or its ``retriever.json`` ``resample`` wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Resize filters by name, with the PIL codes that HF preprocessor configs store as ``resample``.
RESAMPLE_CODES = {"bilinear": 2, "bicubic": 3}
RELEASED_RESAMPLE = "bilinear"  # IRRA/RDE: torchvision T.Resize default on PIL images
HF_CLIP_RESAMPLE = "bicubic"  # CLIPImageProcessor's default, what plain CLIP folders were trained with


class RetrieverLoadError(ValueError):
    """A retriever checkpoint or spec cannot be loaded; the message names the file and the fix."""


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def file_digest(paths: Iterable[str | Path], chunk: int = 1 << 22) -> str:
    """sha256 over the bytes of the given files (in order): a content key for weights."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def parse_image_size(value: Any) -> tuple[int, int] | None:
    """(height, width) from "384x128", [384, 128], (384, 128) or 224 (square); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            nums = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ValueError(f"image size '{value}' is not HEIGHTxWIDTH (e.g. 384x128)") from None
    elif isinstance(value, int):
        nums = [value, value]
    else:
        nums = [int(v) for v in value]
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise ValueError(f"image size {value!r} must be two positive integers HEIGHTxWIDTH (e.g. 384x128)")
    return nums[0], nums[1]


def resample_name(value: Any, where: str = "resample") -> str:
    """'bilinear' / 'bicubic' from a name or a PIL filter code (2 / 3, as in preprocessor configs)."""
    if isinstance(value, str) and value.strip().lower() in RESAMPLE_CODES:
        return value.strip().lower()
    for name, code in RESAMPLE_CODES.items():
        if not isinstance(value, (str, bool)) and value == code:
            return name
    raise ValueError(f"{where}: resize filter {value!r} is not supported; use 'bilinear' (IRRA/RDE, code 2) or "
                     "'bicubic' (HF CLIP, code 3)")


def load_resized(path: str | Path, size: tuple[int, int], resample: str = HF_CLIP_RESAMPLE) -> np.ndarray:
    """Read one image and resize it with PIL (``resample``: 'bilinear' or 'bicubic') to ``size`` =
    (H, W); uint8 array H x W x 3. Pass the retriever's own ``resample``: the default is only the
    plain-CLIP one."""
    from PIL import Image, UnidentifiedImageError

    code = RESAMPLE_CODES[resample_name(resample)]
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):  # torchvision's T.Resize also returns an exact-size image as is
                im = im.resize((size[1], size[0]), code)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist; check the dataset root and its image folder") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {path} cannot be read ({exc}); the file may be truncated: copy it again") from exc


def to_pixel_values(arrays: Sequence[np.ndarray] | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float32 N x 3 x H x W."""
    x = torch.from_numpy(np.stack(arrays) if not isinstance(arrays, np.ndarray) else arrays)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


class ImageFolderDataset(torch.utils.data.Dataset):
    """Paths -> resized uint8 arrays (decoded in DataLoader workers when there are any)."""

    def __init__(self, paths: Sequence[str | Path], size: tuple[int, int], resample: str = HF_CLIP_RESAMPLE):
        self.paths = [str(p) for p in paths]
        self.size = size
        self.resample = resample_name(resample)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return load_resized(self.paths[i], self.size, self.resample)


def _stack_uint8(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Retriever(ABC):
    """An offline text-image retrieval model (f_cross).

    Subclasses set ``kind``, ``image_size`` (H, W), ``text_length``, ``mean``/``std``, ``resample``,
    ``device`` and implement ``_image_batch`` / ``_text_batch`` (raw features for one batch) and
    ``save_pretrained``.
    """

    kind: str = "retriever"
    image_size: tuple[int, int]
    text_length: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: str = HF_CLIP_RESAMPLE
    device: torch.device
    num_workers: int = 0

    # -- what subclasses provide -------------------------------------------------------------
    @property
    @abstractmethod
    def identity(self) -> str:
        """Stable, content-based name: weights + preprocessing; used as the feature-cache key."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the returned feature rows."""

    @abstractmethod
    def _image_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised features of a batch of pixel values (already on ``self.device``)."""

    @abstractmethod
    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        """Normalised features of a batch of texts."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a folder that ``load_retriever(out_dir)`` reads back with identical features."""

    # -- shared batching ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, paths: Sequence[str | Path], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """Features of image files: float32, CPU, L2-normalised, one row per path (in order)."""
        from tqdm import tqdm

        if len(paths) == 0:
            return torch.zeros(0, self.dim)
        ds = ImageFolderDataset(paths, self.image_size, self.resample)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                                         collate_fn=_stack_uint8)
        out = []
        for arr in tqdm(dl, desc=f"{self.kind}: images", unit="batch", disable=not progress):
            px = to_pixel_values(arr, self.mean, self.std).to(self.device)
            out.append(self._image_batch(px).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of already-normalised pixel values N x 3 x H x W."""
        return self._image_batch(pixel_values.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        """Features of query texts: float32, CPU, L2-normalised, one row per text (in order)."""
        from tqdm import tqdm

        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_texts: item {i} is a {type(t).__name__}, expected a string")
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        starts = range(0, len(texts), batch_size)
        for s in tqdm(starts, desc=f"{self.kind}: texts", unit="batch", disable=not progress):
            out.append(self._text_batch(texts[s:s + batch_size]).float().cpu())
        return torch.cat(out)

    @staticmethod
    def similarity(text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        return text_feats.float() @ image_feats.float().T

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "identity": self.identity, "image_size": list(self.image_size),
                "text_length": self.text_length, "resample": self.resample, "dim": self.dim}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
