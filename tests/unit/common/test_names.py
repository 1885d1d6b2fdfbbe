"""The naming rules shared by ingestion, matching and the Triton repository writer."""

from __future__ import annotations

import pytest

from twinstream.common.names import MAX_ITEM_ID_BYTES, is_item_id, is_name


@pytest.mark.parametrize("name", ["acme", "A1", "a.b-c_d", "x" * 64, "0tenant"])
def test_names_of_the_strict_ascii_subset_are_valid(name: str) -> None:
    assert is_name(name)


@pytest.mark.parametrize("name", ["acme\n", "acme\r\n", "\nacme", "", "-a", ".a", "../x", "a/b",
                                  "a b", "Zürich", "x" * 65, 'a"b', "a\x00"])
def test_names_must_match_in_full(name: str) -> None:
    assert not is_name(name)


@pytest.mark.parametrize("item_id", [
    "p1", "10.1145/3299869.3319876", "https://example.org/a?b=c&d=%20#frag", "has space",
    " leading and trailing ", "Zürich-42", "東京/駅", "😀", "a\"b'c\\d", "x" * MAX_ITEM_ID_BYTES,
])
def test_item_ids_accept_the_characters_real_keys_use(item_id: str) -> None:
    assert is_item_id(item_id)


@pytest.mark.parametrize("item_id", [
    "", "p1\n", "p\r1", "tab\there", "nul\x00", "del\x7f", "c1\x85", "\ud800",
    "x" * (MAX_ITEM_ID_BYTES + 1), "ü" * (MAX_ITEM_ID_BYTES // 2 + 1),
])
def test_item_ids_refuse_control_characters_and_more_than_256_bytes(item_id: str) -> None:
    assert not is_item_id(item_id)
