from __future__ import annotations

from twinstream.model.records import serialize_record

FIELDS = ["given_name", "surname", "postcode"]


def test_fields_in_declared_order_then_extras_sorted() -> None:
    record = {"zeta": "z", "postcode": 2600, "surname": "Lovelace", "alpha": "a", "given_name": "Ada"}
    assert serialize_record(record, FIELDS) == (
        "given name: ada | surname: lovelace | postcode: 2600 | alpha: a | zeta: z")


def test_missing_and_blank_fields_are_left_out() -> None:
    sparse = {"surname": "  Lovelace ", "given_name": None, "postcode": float("nan"), "note": "   "}
    assert serialize_record(sparse, FIELDS) == "surname: lovelace"


def test_deterministic_and_insensitive_to_key_order_and_whitespace() -> None:
    a = {"given_name": "Ada  Augusta", "surname": "KING"}
    b = {"surname": "king", "given_name": " ada augusta"}
    assert serialize_record(a, FIELDS) == serialize_record(b, FIELDS) == "given name: ada augusta | surname: king"


def test_unicode_is_normalised() -> None:
    composed = {"surname": "Zo\u00eb"}
    decomposed = {"surname": "Zoe\u0308"}
    assert serialize_record(composed, FIELDS) == serialize_record(decomposed, FIELDS)
