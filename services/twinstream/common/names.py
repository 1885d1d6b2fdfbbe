"""The naming rules every entry point shares: tenants, collections, item ids, metadata keys and
model names. One place, full matches only (``$`` would accept a trailing newline, which once
let ``"acme\\n"`` in and stalled indexing for every tenant).

Row keys in Milvus are ``tenant/collection/item_id``: tenants and collections can never contain
``/``, so splitting a key on its first two ``/`` is unambiguous while ids may contain ``/``.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_COLLECTION = "default"
# Tenants, collections, metadata keys and model names: they appear in row keys, partition keys,
# Milvus expressions, file paths and metric labels, so they stay a strict ASCII subset.
NAME_RULE = "1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Item ids are the client's own keys (URLs, paths, DOIs, "a#b?c=%20"): any printable text.
# The limit is in UTF-8 bytes because Milvus counts VARCHAR lengths in bytes (item_id and
# cluster_id are VARCHAR(256)).
MAX_ITEM_ID_BYTES = 256
ITEM_ID_RULE = (f"1-{MAX_ITEM_ID_BYTES} bytes of UTF-8 text without control characters "
                "(any other character, '/', '#', '?', '%', spaces and non-ASCII included)")


def is_name(value: str) -> bool:
    """Whether ``value`` is a valid tenant, collection, metadata key or model name."""
    return _NAME.fullmatch(value) is not None


def is_item_id(value: str) -> bool:
    """Whether ``value`` is a valid item id (see ``ITEM_ID_RULE``)."""
    if not value or len(value.encode("utf-8", "surrogatepass")) > MAX_ITEM_ID_BYTES:
        return False
    # Cc: C0/C1 controls and DEL (a newline ends a Milvus string literal); Cs: lone surrogates
    # (not encodable as UTF-8).
    return not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)
