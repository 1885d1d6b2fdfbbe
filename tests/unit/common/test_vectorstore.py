"""Milvus string literals: raw UTF-8 with only the escapes Milvus' parsers accept (the live
round trip through Milvus is in tests/stack/test_bad_input.py)."""

from __future__ import annotations

import pytest

from twinstream.common.vectorstore import pk_filter, quote


@pytest.mark.parametrize(("value", "literal"), [
    ("Zürich", '"Zürich"'), ("😀", '"😀"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'),
    ("a\nb\rc", '"a\\nb\\rc"'), ("tab\there", '"tab\there"'), ("x','y", '"x\',\'y"'),
])
def test_quote_keeps_utf8_raw_and_escapes_only_what_ends_a_literal(value: str, literal: str) -> None:
    assert quote(value) == literal


def test_quote_never_emits_json_unicode_escapes() -> None:
    assert "\\u" not in quote("Zürich \u2028 \x01 \x7f ü")


def test_primary_keys_are_quoted_by_us_not_by_pymilvus() -> None:
    assert pk_filter(["a/default/x','b/default/y", 'a/default/"q"']) == (
        'pk in ["a/default/x\',\'b/default/y", "a/default/\\"q\\""]')
