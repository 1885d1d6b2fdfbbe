"""Field-aware, deterministic serialisation of structured records for the text encoder."""

from __future__ import annotations

import unicodedata


def _clean(value: object) -> str:
    text = unicodedata.normalize("NFC", str(value)).strip().lower()
    return " ".join(text.split())


def serialize_record(record: dict[str, object], fields: list[str]) -> str:
    """``"field: value | field: value"`` in ``fields`` order, then any extra fields sorted.

    Missing and empty fields are left out, so a record with a blank field still lines up with
    its complete duplicate field by field.
    """
    ordered = [f for f in fields if f in record] + sorted(k for k in record if k not in fields)
    parts = []
    for name in ordered:
        value = record[name]
        if value is None:
            continue
        cleaned = _clean(value)
        if cleaned and cleaned != "nan":
            parts.append(f"{name.replace('_', ' ')}: {cleaned}")
    return " | ".join(parts)
