"""Validation of matching requests and their translation into Milvus filter expressions.

User input never reaches an expression unescaped: names are checked against a strict pattern
and values are quoted, and the tenant/collection scope is always ANDed in front.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence

from twinstream.common.names import DEFAULT_COLLECTION, ITEM_ID_RULE, NAME_RULE, is_item_id, is_name
from twinstream.common.status import InvalidArgument, ResourceExhausted
from twinstream.common.vectorstore import quote, scope_filter
from twinstream.v1 import matching_pb2

MAX_FILTERS = 16
MAX_FILTER_VALUES = 256


class BadRequest(InvalidArgument):
    """INVALID_ARGUMENT with this message."""


class OverLimit(ResourceExhausted):
    """RESOURCE_EXHAUSTED with this message."""


def check_scope(tenant: str, collection: str) -> str:
    """Validate the tenant/collection pair; returns the effective collection name."""
    if not tenant:
        raise BadRequest("tenant is required")
    if not is_name(tenant):
        raise BadRequest(f"tenant must be {NAME_RULE}")
    collection = collection or DEFAULT_COLLECTION
    if not is_name(collection):
        raise BadRequest(f"collection must be {NAME_RULE}")
    return collection


def check_item_id(item_id: str) -> None:
    if not is_item_id(item_id):
        raise BadRequest(f"item_id must be {ITEM_ID_RULE}")


def metadata_filter(conditions: Sequence[matching_pb2.MetadataCondition]) -> str:
    """AND of the conditions as a Milvus expression over the ``metadata`` JSON field."""
    if len(conditions) > MAX_FILTERS:
        raise OverLimit(f"at most {MAX_FILTERS} filter conditions per request")
    parts = []
    for condition in conditions:
        if not is_name(condition.key):
            raise BadRequest(f"filter key {condition.key[:40]!r} is not a valid metadata name")
        field = f"metadata[{quote(condition.key)}]"
        values = list(condition.values)
        if len(values) > MAX_FILTER_VALUES:
            raise OverLimit(f"at most {MAX_FILTER_VALUES} values per filter condition")
        op = condition.op
        if op in (matching_pb2.MetadataCondition.EQ, matching_pb2.MetadataCondition.NE):
            if len(values) != 1:
                raise BadRequest(f"filter on {condition.key!r}: EQ/NE take exactly one value")
            symbol = "==" if op == matching_pb2.MetadataCondition.EQ else "!="
            parts.append(f"{field} {symbol} {quote(values[0])}")
        elif op in (matching_pb2.MetadataCondition.IN, matching_pb2.MetadataCondition.NOT_IN):
            if not values:
                raise BadRequest(f"filter on {condition.key!r}: IN/NOT_IN need values")
            # Spelled out: Milvus Lite accepts `in [...]` only on plain fields, not JSON paths.
            if op == matching_pb2.MetadataCondition.IN:
                parts.append("(" + " or ".join(f"{field} == {quote(v)}" for v in values) + ")")
            else:
                parts.append("(" + " and ".join(f"{field} != {quote(v)}" for v in values) + ")")
        else:
            raise BadRequest(f"filter on {condition.key!r}: op must be EQ, NE, IN or NOT_IN")
    return " and ".join(parts)


def time_filter(from_ms: int, to_ms: int) -> str:
    if from_ms < 0 or to_ms < 0:
        raise BadRequest("time bounds must be >= 0")
    if from_ms and to_ms and from_ms >= to_ms:
        raise BadRequest("from_time_ms must be before to_time_ms")
    parts = []
    if from_ms:
        parts.append(f"ingest_ms >= {int(from_ms)}")
    if to_ms:
        parts.append(f"ingest_ms < {int(to_ms)}")
    return " and ".join(parts)


def full_filter(tenant: str, collection: str, ttl_s: int, *extra: str) -> str:
    """The scope (live, unexpired rows of one tenant/collection) ANDed with the extra parts."""
    return " and ".join(f"({p})" for p in (scope_filter(tenant, collection, ttl_s), *extra) if p)


def _fingerprint(request: matching_pb2.MatchRequest) -> str:
    copy = matching_pb2.MatchRequest()
    copy.CopyFrom(request)
    copy.page_token = ""
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:16]


def page_offset(request: matching_pb2.MatchRequest) -> int:
    """The offset a page token points at; the token must come from the same query."""
    if not request.page_token:
        return 0
    try:
        token = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
        offset, fingerprint = int(token["o"]), str(token["f"])
    except Exception as exc:
        raise BadRequest("page_token is not a token this server issued") from exc
    if fingerprint != _fingerprint(request) or offset < 0:
        raise BadRequest("page_token belongs to a different query")
    return offset


def next_page_token(request: matching_pb2.MatchRequest, offset: int) -> str:
    token = {"o": offset, "f": _fingerprint(request)}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
