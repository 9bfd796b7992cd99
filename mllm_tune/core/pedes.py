"""Readers of the four text-to-image person re-ID annotation formats (SPEC §2).

One record model (:class:`PedesRecord`) for CUHK-PEDES, ICFG-PEDES, RSTPReid and UFine6926
(and SynthPEDES, which is written in the CUHK-PEDES layout). A split gives the retrieval view
used everywhere else: the gallery (one entry per image) and the queries (one per caption).

Identities: CUHK-PEDES and UFine6926 number persons from 1 and are shifted to 0-based, as the
IRRA/RDE loaders do; ICFG-PEDES is already 0-based; RSTPReid ids are kept as given.
Splits: "train" and "test" are kept; any other split name is read as "val".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

logger = logging.getLogger(__name__)


class PedesFormatError(ValueError):
    """An annotation file does not follow its dataset's format. The message names the file,
    the record and the field, and says how to fix it."""


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    annotation_files: tuple[str, ...]  # tried in order; UFine6926's name varies
    path_field: str
    image_dir: str  # image paths are relative to root/image_dir
    id_offset: int  # added to the annotated id to get a 0-based pid
    splits: tuple[str, ...]
    annotation_glob: str | None = None


FORMATS: dict[str, DatasetFormat] = {
    "cuhk-pedes": DatasetFormat("cuhk-pedes", ("reid_raw.json",), "file_path", "imgs", -1, ("train", "val", "test")),
    "icfg-pedes": DatasetFormat("icfg-pedes", ("ICFG-PEDES.json",), "file_path", "imgs", 0, ("train", "test")),
    "rstpreid": DatasetFormat("rstpreid", ("data_captions.json",), "img_path", "imgs", 0, ("train", "val", "test")),
    "ufine6926": DatasetFormat(
        "ufine6926", ("UFine6926_Annotations_1024.json",), "file_path", "", -1, ("train", "val", "test"),
        annotation_glob="UFine6926*.json",
    ),
}
# SynthPEDES is written in the CUHK-PEDES layout.
ALIASES = {"synthpedes": "cuhk-pedes", "cuhk": "cuhk-pedes", "icfg": "icfg-pedes", "rstp": "rstpreid", "ufine": "ufine6926"}
DATASET_NAMES: tuple[str, ...] = tuple(FORMATS)


def dataset_format(name: str) -> DatasetFormat:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown dataset '{name}': choose one of {', '.join(DATASET_NAMES)} (or 'synthpedes')")
    return FORMATS[key]


@dataclass(frozen=True)
class PedesRecord:
    """One annotated image."""

    index: int  # position in the annotation file
    split: str  # "train" | "val" | "test"
    pid: int  # 0-based person id
    rel_path: str  # as annotated
    image_path: Path  # resolved under the dataset root
    captions: tuple[str, ...]


@dataclass
class SplitView:
    """The retrieval view of one split: gallery = images, queries = captions."""

    dataset: str
    split: str
    records: list[PedesRecord]
    gallery_paths: list[str] = field(init=False)
    gallery_pids: list[int] = field(init=False)
    query_texts: list[str] = field(init=False)
    query_pids: list[int] = field(init=False)
    query_image_index: list[int] = field(init=False)  # gallery index of the caption's own image

    def __post_init__(self) -> None:
        self.gallery_paths = [str(r.image_path) for r in self.records]
        self.gallery_pids = [r.pid for r in self.records]
        self.query_texts, self.query_pids, self.query_image_index = [], [], []
        for gi, r in enumerate(self.records):
            for c in r.captions:
                self.query_texts.append(c)
                self.query_pids.append(r.pid)
                self.query_image_index.append(gi)

    @property
    def num_ids(self) -> int:
        return len(set(self.gallery_pids))

    def summary(self) -> dict[str, int | str]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "images": len(self.gallery_paths),
            "captions": len(self.query_texts),
            "ids": self.num_ids,
        }

    def to_hf_dataset(self):
        """A `datasets.Dataset` with an Image column (decoded lazily), pid and captions."""
        import datasets

        feats = datasets.Features(
            {
                "image": datasets.Image(),
                "image_path": datasets.Value("string"),
                "pid": datasets.Value("int64"),
                "captions": datasets.Sequence(datasets.Value("string")),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "image": self.gallery_paths,
                "image_path": self.gallery_paths,
                "pid": self.gallery_pids,
                "captions": [list(r.captions) for r in self.records],
            },
            features=feats,
        )


@dataclass
class PedesDataset:
    name: str
    root: Path
    annotation_file: Path
    records: list[PedesRecord]

    def split(self, name: str) -> SplitView:
        split = normalise_split(name)
        recs = [r for r in self.records if r.split == split]
        if not recs:
            have = sorted({r.split for r in self.records})
            raise PedesFormatError(
                f"{self.annotation_file}: split '{name}' has no records (splits present: {have}). "
                f"{self.name} has splits {list(dataset_format(self.name).splits)}"
            )
        return SplitView(self.name, split, recs)

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})


def normalise_split(name: str) -> str:
    name = str(name).lower()
    return name if name in ("train", "test") else "val"


def find_annotation_file(root: Path, fmt: DatasetFormat) -> Path:
    for fname in fmt.annotation_files:
        if (root / fname).is_file():
            return root / fname
    if fmt.annotation_glob:
        hits = sorted(root.glob(fmt.annotation_glob))
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"no {fmt.name} annotation file in {root}: expected {' or '.join(fmt.annotation_files)}"
        + (f" (or a file matching {fmt.annotation_glob})" if fmt.annotation_glob else "")
        + "; pass --dataset-root pointing at the folder that holds it, or --annotation-file"
    )


def _field(rec: Any, key: str, path: Path, i: int) -> Any:
    if key not in rec:
        raise PedesFormatError(f"{path}: record {i} has no field '{key}' (fields present: {sorted(rec)})")
    return rec[key]


def _resolve_image(root: Path, image_dir: str, rel: str, path: Path, i: int, key: str) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise PedesFormatError(f"{path}: record {i} field '{key}' must be a non-empty relative path, got {rel!r}")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or Path(rel).is_absolute():
        raise PedesFormatError(
            f"{path}: record {i} field '{key}' is an absolute path ({rel}); paths must be relative to "
            f"{root / image_dir if image_dir else root}"
        )
    base = (root / image_dir).resolve() if image_dir else root.resolve()
    full = (base / Path(*p.parts)).resolve()
    if not full.is_relative_to(base):
        raise PedesFormatError(f"{path}: record {i} field '{key}' ({rel}) escapes the image folder {base}")
    return full


def load_pedes(
    root: str | Path,
    dataset: str,
    annotation_file: str | Path | None = None,
    check_images: bool = True,
) -> PedesDataset:
    """Read a dataset's annotation file into records, validating every field.

    With ``check_images`` every image file must exist; missing files are counted and the
    first few named in one error rather than failing at the first.
    """
    fmt = dataset_format(dataset)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    path = Path(annotation_file) if annotation_file else find_annotation_file(root, fmt)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PedesFormatError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "the file may be truncated: download or copy it again"
        ) from exc
    if not isinstance(data, list):
        raise PedesFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records: list[PedesRecord] = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise PedesFormatError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        split = _field(rec, "split", path, i)
        raw_id = _field(rec, "id", path, i)
        try:
            pid = int(raw_id) + fmt.id_offset
        except (TypeError, ValueError):
            raise PedesFormatError(f"{path}: record {i} field 'id' must be an integer, got {raw_id!r}") from None
        if pid < 0:
            raise PedesFormatError(
                f"{path}: record {i} field 'id' is {raw_id}, but {fmt.name} ids start at {-fmt.id_offset}"
            )
        caps = _field(rec, "captions", path, i)
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not caps:
            raise PedesFormatError(f"{path}: record {i} field 'captions' must be a non-empty list of strings")
        clean = []
        for j, c in enumerate(caps):
            if not isinstance(c, str) or not c.strip():
                raise PedesFormatError(f"{path}: record {i} field 'captions'[{j}] is empty or not a string")
            clean.append(" ".join(c.split()))
        rel = _field(rec, fmt.path_field, path, i)
        img = _resolve_image(root, fmt.image_dir, rel, path, i, fmt.path_field)
        records.append(PedesRecord(i, normalise_split(split), pid, rel, img, tuple(clean)))
    if not records:
        raise PedesFormatError(f"{path}: the file holds no records")
    if check_images:
        missing = [r for r in records if not r.image_path.is_file()]
        if missing:
            first = ", ".join(f"record {r.index}: {r.image_path}" for r in missing[:5])
            raise FileNotFoundError(
                f"{path}: {len(missing)} of {len(records)} image files do not exist (first: {first}). "
                f"Check that the images are unpacked under {root / fmt.image_dir if fmt.image_dir else root}"
            )
    logger.info("read %d records from %s", len(records), path)
    return PedesDataset(fmt.name, root, path, records)


def load_split(root: str | Path, dataset: str, split: str, **kw: Any) -> SplitView:
    return load_pedes(root, dataset, **kw).split(split)


def pids_to_tensor(pids: Sequence[int]):
    import torch

    return torch.as_tensor(list(pids), dtype=torch.long)
