"""Readers of the four PEDES annotation formats, on small files written here in each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mllm_tune.core.pedes import PedesFormatError, load_pedes, load_split


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (10, 20, 30)).save(path)


def write_dataset(root: Path, dataset: str, records: list[dict] | None = None, make_images: bool = True) -> Path:
    """Write a 3-record dataset in the native layout of ``dataset``."""
    spec = {
        "cuhk-pedes": ("reid_raw.json", "file_path", "imgs", 1),
        "icfg-pedes": ("ICFG-PEDES.json", "file_path", "imgs", 0),
        "rstpreid": ("data_captions.json", "img_path", "imgs", 0),
        "ufine6926": ("UFine6926_Annotations_1024.json", "file_path", "", 1),
    }[dataset]
    fname, key, imgdir, first_id = spec
    if records is None:
        records = [
            {"split": "train", "id": first_id, key: "a/1.jpg", "captions": ["A man in red.", "Red coat."]},
            {"split": "test", "id": first_id + 1, key: "b/2.jpg", "captions": ["A woman in blue."]},
            {"split": "test", "id": first_id + 1, key: "b/3.jpg", "captions": ["Blue  skirt,\n white shoes."]},
        ]
    root.mkdir(parents=True, exist_ok=True)
    (root / fname).write_text(json.dumps(records))
    if make_images:
        for r in records:
            if isinstance(r, dict) and isinstance(r.get(key), str):
                _img(root / imgdir / r[key])
    return root / fname


@pytest.mark.parametrize("dataset", ["cuhk-pedes", "icfg-pedes", "rstpreid", "ufine6926"])
def test_each_format_reads_into_one_record_model(tmp_path, dataset):
    write_dataset(tmp_path, dataset)
    ds = load_pedes(tmp_path, dataset)
    assert [r.split for r in ds.records] == ["train", "test", "test"]
    # 0-based person ids whatever the dataset's own numbering
    assert [r.pid for r in ds.records] == [0, 1, 1]
    test = ds.split("test")
    assert test.gallery_pids == [1, 1]
    assert test.query_texts == ["A woman in blue.", "Blue skirt, white shoes."]  # white space folded
    assert test.query_pids == [1, 1]
    assert test.query_image_index == [0, 1]
    assert all(Path(p).is_file() for p in test.gallery_paths)
    train = ds.split("train")
    assert len(train.query_texts) == 2 and train.query_image_index == [0, 0]


def test_other_split_names_are_val(tmp_path):
    recs = [{"split": "validation", "id": 1, "file_path": "x.jpg", "captions": ["c"]},
            {"split": "train", "id": 2, "file_path": "y.jpg", "captions": ["d"]}]
    write_dataset(tmp_path, "cuhk-pedes", recs)
    assert load_pedes(tmp_path, "cuhk-pedes").split("val").gallery_pids == [0]


def test_hf_dataset_view_has_image_column(tmp_path):
    write_dataset(tmp_path, "cuhk-pedes")
    hf = load_split(tmp_path, "cuhk-pedes", "test").to_hf_dataset()
    assert len(hf) == 2
    assert hf[0]["image"].size == (8, 16)
    assert hf[1]["captions"] == ["Blue skirt, white shoes."]


def test_synthpedes_is_read_as_cuhk(synth_root):
    view = load_split(synth_root, "synthpedes", "test")
    assert view.num_ids > 0 and len(view.query_texts) == 2 * len(view.gallery_paths)


# -- bad input: every error names the file, the record and the field --------------------------

def test_malformed_json(tmp_path):
    path = write_dataset(tmp_path, "cuhk-pedes")
    path.write_text('[{"split": "train", "id": 1,')
    with pytest.raises(PedesFormatError, match=r"reid_raw.json: not valid JSON.*truncated"):
        load_pedes(tmp_path, "cuhk-pedes")


def test_missing_field_named(tmp_path):
    recs = [{"split": "train", "id": 1, "captions": ["c"]}]
    write_dataset(tmp_path, "cuhk-pedes", recs)
    with pytest.raises(PedesFormatError, match=r"reid_raw.json: record 0 has no field 'file_path'"):
        load_pedes(tmp_path, "cuhk-pedes")


def test_rstpreid_uses_img_path(tmp_path):
    recs = [{"split": "train", "id": 1, "file_path": "a.jpg", "captions": ["c"]}]
    write_dataset(tmp_path, "rstpreid", recs, make_images=False)
    with pytest.raises(PedesFormatError, match="no field 'img_path'"):
        load_pedes(tmp_path, "rstpreid")


@pytest.mark.parametrize("caps", [[], [""], ["ok", "   "], None])
def test_empty_captions(tmp_path, caps):
    recs = [{"split": "train", "id": 1, "file_path": "a.jpg", "captions": ["fine"]},
            {"split": "train", "id": 2, "file_path": "b.jpg", "captions": caps}]
    write_dataset(tmp_path, "cuhk-pedes", recs)
    with pytest.raises(PedesFormatError, match=r"record 1 field 'captions'"):
        load_pedes(tmp_path, "cuhk-pedes")


def test_split_with_no_records(tmp_path):
    write_dataset(tmp_path, "icfg-pedes")
    with pytest.raises(PedesFormatError, match=r"split 'val' has no records.*splits present: \['test', 'train'\]"):
        load_pedes(tmp_path, "icfg-pedes").split("val")


def test_missing_images_counted_not_first_only(tmp_path):
    write_dataset(tmp_path, "cuhk-pedes", make_images=False)
    _img(tmp_path / "imgs" / "a/1.jpg")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 image files do not exist \(first: record 1: .*2.jpg, record 2: .*3.jpg"):
        load_pedes(tmp_path, "cuhk-pedes")
    # annotation-only use (e.g. counting captions) can skip the check
    assert len(load_pedes(tmp_path, "cuhk-pedes", check_images=False).records) == 3


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../outside.jpg", "a/../../x.jpg"])
def test_paths_must_stay_under_root(tmp_path, bad):
    recs = [{"split": "train", "id": 1, "file_path": bad, "captions": ["c"]}]
    write_dataset(tmp_path, "cuhk-pedes", recs, make_images=False)
    with pytest.raises(PedesFormatError, match=r"record 0 field 'file_path'.*(absolute|escapes)"):
        load_pedes(tmp_path, "cuhk-pedes")


def test_bad_id_and_unknown_dataset(tmp_path):
    write_dataset(tmp_path, "cuhk-pedes", [{"split": "train", "id": 0, "file_path": "a.jpg", "captions": ["c"]}])
    with pytest.raises(PedesFormatError, match="ids start at 1"):
        load_pedes(tmp_path, "cuhk-pedes")
    with pytest.raises(ValueError, match="unknown dataset 'market'"):
        load_pedes(tmp_path, "market")


def test_missing_annotation_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected ICFG-PEDES.json.*--dataset-root"):
        load_pedes(tmp_path, "icfg-pedes")
