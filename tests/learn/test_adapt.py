"""``adapt``: field-aware corruptions, the collection's items, and a tiny run end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from twinstream.learn import adapt
from twinstream.learn.cli import main
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2

RECORD = {"name": "Allianz SE", "street": "Koniginstrasse 28", "city": "Munich", "founded": "1890-02-05",
          "phone": "+49 89 3800 0"}


def test_a_corrupted_record_is_a_different_spelling_of_the_same_fields() -> None:
    rng = random.Random(3)
    copies = [adapt.corrupt_record(RECORD, rng) for _ in range(50)]
    assert all(copy != RECORD for copy in copies)
    assert all(set(copy) <= set(RECORD) and copy for copy in copies)  # fields dropped or merged, none invented
    assert any(len(copy) < len(RECORD) for copy in copies)
    assert sum(copy.get("city") == "Munich" for copy in copies) > 25  # most fields survive a copy


def test_a_date_is_reformatted_with_its_parts_kept() -> None:
    rng = random.Random(0)
    spellings = {adapt._reformat("1890-02-05", rng) for _ in range(40)}
    assert len(spellings) > 1
    assert all("1890" in s and "02" in s and "05" in s for s in spellings)


def test_abbreviations_shorten_known_words() -> None:
    rng = random.Random(0)
    assert {adapt._abbreviate("Main Street", rng) for _ in range(20)} & {"Main st", "M. st", "M st"}


def test_an_image_collection_is_refused_with_a_reason() -> None:
    with pytest.raises(adapt.AdaptError, match="record and text collections"):
        adapt.collection_items([("image", b"\x89PNG")] * 30)


def test_too_few_items_are_refused() -> None:
    items = adapt.collection_items([("record", json.dumps(RECORD).encode())] * 5)
    with pytest.raises(adapt.AdaptError, match="too few"):
        adapt.build_splits(items, adapt.AdaptConfig())


def test_a_jsonl_line_without_content_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"record": {"a": "b"}}\n{"text": "hello"}\n{"id": "x"}\n')
    with pytest.raises(adapt.AdaptError, match=r"items\.jsonl:3"):
        adapt.read_jsonl(path)


def test_the_next_version_follows_the_highest(tmp_path: Path) -> None:
    assert adapt.next_version(tmp_path) == "2"
    for version in ("1", "2", "7"):
        (tmp_path / "twinstream_text" / version).mkdir(parents=True)
    assert adapt.next_version(tmp_path) == "8"


def _companies(count: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    words = ["North", "Atlas", "Cedar", "Harbor", "Summit", "Quartz", "Meadow", "Falcon", "Beacon", "Orchid"]
    kinds = ["Holdings", "Logistics", "Bakery", "Analytics", "Motors"]
    cities = ["Lyon", "Porto", "Graz", "Turku", "Leeds", "Gent"]
    return [{"name": f"{rng.choice(words)} {rng.choice(words)} {rng.choice(kinds)}",
             "street": f"{rng.randint(1, 200)} {rng.choice(words)} Road", "city": rng.choice(cities),
             "founded": f"{rng.randint(1900, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"}
            for _ in range(count)]


def test_adapt_writes_a_new_version_the_services_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"record": r}) + "\n" for r in _companies(60)))
    models = tmp_path / "models"
    (models / "twinstream_text" / "1").mkdir(parents=True)  # the base
    assert main(["adapt", "--tenant", "acme", "--collection", "suppliers", "--items", str(items),
                 "--models", str(models), "--epochs", "1", "--text-tuning", "head", "--calibration-views", "40",
                 "--no-progress"]) == 0
    out = models / "twinstream_text" / "2"
    loaded = ModelBundle.load(out)
    assert (loaded.name, loaded.version, loaded.modalities) == ("twinstream_text", "2", ("text", "record"))
    assert set(loaded.by_modality) == {"record", "text"}
    record = loaded.for_modality(items_pb2.RECORD)
    assert record.match_threshold <= record.duplicate_threshold
    manifest = json.loads((out / "manifest.json").read_text())
    adapted = manifest["training"]["adapted"]
    assert (adapted["tenant"], adapted["collection"], adapted["items"], adapted["kind"]) == (
        "acme", "suppliers", 60, "record")
    printed = json.loads(capsys.readouterr().out)
    assert printed["next"] == [f"twinstream reembed --bundle {out}",
                               "twinstream promote --model twinstream_text --version 2"]


def test_the_calibration_stream_leaves_out_the_collections_own_duplicates() -> None:
    views = ["name: allianz se | city: munich", "name: allianz se | city: muenchen", "name: airbus se | city: leiden",
             "name: adidas ag | city: herzogenaurach"]
    assert adapt.distinct([0, 1, 2, 3], views) == [0, 2, 3]
