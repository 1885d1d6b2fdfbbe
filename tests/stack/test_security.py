"""TLS and tokens on the real services (the shared stack serves TLS with the dev CA and checks
tokens signed with its key): cross-tenant calls change and return nothing of the other tenant,
bad tokens and plain-text clients are refused, and a fuzz of every method, with a token and
without, ends with no UNKNOWN/INTERNAL and no cross-tenant leak."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack_helpers import read_decisions, text
from twinstream.client import TwinstreamClient
from twinstream.common.kafka import TopicReader
from twinstream.common.security import SCOPES, ClientCredentials, issue_token, read_key
from twinstream.devstack import LocalStack
from twinstream.v1 import ingestion_pb2, ingestion_pb2_grpc, items_pb2, matching_pb2, matching_pb2_grpc

pytestmark = pytest.mark.stack

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
VICTIM_TEXT = "the victim tenant's private note about a merger that must never leak"


@pytest.fixture(scope="module")
def victim(stack: LocalStack) -> Iterator[str]:
    """A tenant with two near-identical items, decided before the tests start."""
    tenant = f"victim{time.monotonic_ns() % 10**8}"
    with stack.client(credentials=stack.credentials((tenant,), ("ingest",))) as client:
        client.ingest(text("secret-1", VICTIM_TEXT, tenant))
        client.ingest(text("secret-2", VICTIM_TEXT + "!", tenant))
    read_decisions(stack, ["secret-1", "secret-2"], tenant)
    yield tenant


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def _untouched(stack: LocalStack, victim: str) -> None:
    with stack.client(credentials=stack.credentials((victim,), ("match",))) as owner:
        assert owner.get(victim, "secret-1").item_id == "secret-1"
        assert sorted(owner.cluster(victim, "secret-1").member_ids) == ["secret-1", "secret-2"]
        assert _code(lambda: owner.get(victim, "intruder")) == grpc.StatusCode.NOT_FOUND


def test_another_tenants_token_is_denied_everything_and_changes_nothing(
        stack: LocalStack, victim: str, tenant: str) -> None:
    with stack.client(credentials=stack.credentials((tenant,))) as intruder:
        for call in (lambda: intruder.ingest(text("intruder", "x", victim)),
                     lambda: intruder.ingest_many([text("intruder", "x", victim)]),
                     lambda: intruder.match(victim, item_id="secret-1"),
                     lambda: intruder.match(victim, text=VICTIM_TEXT),
                     lambda: list(intruder.match_stream(
                         [matching_pb2.MatchRequest(tenant=victim, item_id="secret-1")])),
                     lambda: intruder.get(victim, "secret-1"),
                     lambda: intruder.delete(victim, ["secret-1", "secret-2"]),
                     lambda: intruder.cluster(victim, "secret-1")):
            assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
        # its own tenant works with the same token
        assert intruder.ingest(text("mine", "a note of my own", tenant)).item_id == "mine"
    _untouched(stack, victim)


def test_no_expired_or_forged_token_is_unauthenticated_on_both_services(
        stack: LocalStack, victim: str) -> None:
    assert stack.security is not None
    key = read_key(stack.security.token_key_file)
    expired = issue_token(key, "old", [victim], list(SCOPES), 60, now=time.time() - 7200)
    forged = issue_token(b"f" * 64, "mallory", ["*"], list(SCOPES), 600)
    for token in ("", expired, forged, "not.a.token"):
        credentials = replace(stack.credentials(), token=token)
        with stack.client(credentials=credentials, retry_budget_s=0) as client:
            assert _code(lambda: client.get(victim, "secret-1")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: client.ingest(text("intruder", "x", victim))) == \
                grpc.StatusCode.UNAUTHENTICATED
    _untouched(stack, victim)


def test_a_plain_text_client_fails_unavailable_at_once(stack: LocalStack, victim: str) -> None:
    credentials = ClientCredentials.plaintext(stack.credentials().token)
    started = time.monotonic()
    with stack.client(credentials=credentials, timeout_s=20, retry_budget_s=0) as client:
        assert _code(lambda: client.get(victim, "secret-1")) == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10, "refused, not left to run into its deadline"


# -- fuzz: every method, with the fuzzer's own token and without one ---------------------------
FUZZER = "fuzzer"
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "secret-1", "a/b", "ü" * 129]))
tenants = st.one_of(st.just(FUZZER), st.just("VICTIM"), texts)
modalities = st.integers(0, 4)
contents = st.one_of(st.binary(max_size=100), st.just(VICTIM_TEXT.encode()))
item = st.builds(items_pb2.Item, item_id=texts, tenant=tenants, collection=st.just("default"),
                 modality=modalities, content=contents)
ingest = st.builds(ingestion_pb2.IngestRequest, item=item, assign_id=st.booleans())
match = st.builds(matching_pb2.MatchRequest, tenant=tenants, item_id=texts,
                  k=st.integers(-1, 20), min_score=st.floats(-1, 1))
get = st.builds(matching_pb2.GetRequest, tenant=tenants, item_id=texts)
delete = st.builds(matching_pb2.DeleteRequest, tenant=tenants,
                   item_ids=st.lists(texts, max_size=3))
cluster = st.builds(matching_pb2.GetClusterRequest, tenant=tenants, item_id=texts)
CALLS = st.one_of(
    st.tuples(st.just("Ingest"), ingest), st.tuples(st.just("IngestStream"), st.lists(ingest, max_size=3)),
    st.tuples(st.just("Match"), match), st.tuples(st.just("MatchStream"), st.lists(match, max_size=3)),
    st.tuples(st.just("Get"), get), st.tuples(st.just("Delete"), delete),
    st.tuples(st.just("GetCluster"), cluster), st.tuples(st.sampled_from(
        ["Ingest", "Match", "Get", "Delete", "GetCluster"]), st.binary(max_size=60)))


REQUEST_TYPES: dict[str, Any] = {
    "Ingest": ingestion_pb2.IngestRequest, "Match": matching_pb2.MatchRequest,
    "Get": matching_pb2.GetRequest, "Delete": matching_pb2.DeleteRequest,
    "GetCluster": matching_pb2.GetClusterRequest}
RESPONSE_TYPES: dict[str, Any] = {
    "Ingest": ingestion_pb2.IngestResponse, "Match": matching_pb2.MatchResponse,
    "Get": matching_pb2.StoredItem, "Delete": matching_pb2.DeleteResponse,
    "GetCluster": matching_pb2.Cluster}


def _tenants_of(request: Any) -> list[str]:
    requests = request if isinstance(request, list) else [request]
    return [r.item.tenant if isinstance(r, ingestion_pb2.IngestRequest) else r.tenant
            for r in requests]


def _invoke(channel: grpc.Channel, method: str, request: Any) -> list[Any]:
    """Call ``method``; raw bytes go through an untyped call (undecodable messages)."""
    service = "twinstream.v1.Ingestion" if method.startswith("Ingest") else "twinstream.v1.Matching"
    if isinstance(request, bytes):
        raw = channel.unary_unary(f"/{service}/{method}", request_serializer=None,
                                  response_deserializer=RESPONSE_TYPES[method].FromString)
        return [raw(request, timeout=20)]
    ingestion, matching = ingestion_pb2_grpc.IngestionStub(channel), matching_pb2_grpc.MatchingStub(channel)
    stub: Any = ingestion if service.endswith("Ingestion") else matching
    if method in ("IngestStream", "MatchStream"):
        reply = getattr(stub, method)(iter(request), timeout=20)
        return list(reply) if method == "MatchStream" else [reply]
    return [getattr(stub, method)(request, timeout=20)]


@pytest.fixture(scope="module")
def channels(stack: LocalStack) -> Iterator[dict[tuple[str, bool], grpc.Channel]]:
    signed = stack.credentials((FUZZER,))
    anonymous = replace(signed, token="")
    opened = {(service, authed): (signed if authed else anonymous).channel(stack.grpc_target(service))
              for service in ("ingestion", "matching") for authed in (True, False)}
    yield opened
    for channel in opened.values():
        channel.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=CALLS, authed=st.booleans())
def test_fuzzing_every_method_with_and_without_a_token_gives_no_unknown_and_no_leak(
        channels: dict[tuple[str, bool], grpc.Channel], victim: str,
        call: tuple[str, Any], authed: bool) -> None:
    method, request = call
    for message in request if isinstance(request, list) else [request]:
        if isinstance(message, ingestion_pb2.IngestRequest) and message.item.tenant == "VICTIM":
            message.item.tenant = victim
        elif not isinstance(message, (bytes, ingestion_pb2.IngestRequest)) and message.tenant == "VICTIM":
            message.tenant = victim
    channel = channels[("ingestion" if method.startswith("Ingest") else "matching", authed)]
    typed = not isinstance(request, bytes)
    tenants_asked = _tenants_of(request) if typed else []
    try:
        replies = _invoke(channel, method, request)
    except grpc.RpcError as error:
        assert error.code() not in FORBIDDEN, (method, error.code(), error.details())
        if typed and not authed:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (method, error.details())
        elif typed and tenants_asked and tenants_asked[0] != FUZZER:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (method, error.details())
        return
    # An answer: only for the fuzzer's own token and tenant, and nothing of the victim in it.
    assert authed, f"{method} answered OK without a token"
    if not typed:
        tenants_asked = _tenants_of(REQUEST_TYPES[method].FromString(request))
    assert all(t == FUZZER for t in tenants_asked), f"{method} answered OK for {tenants_asked}"
    for reply in replies:
        assert victim not in str(reply) and VICTIM_TEXT.encode() not in reply.SerializeToString()


def test_after_the_fuzz_the_victim_has_exactly_its_own_two_items(stack: LocalStack,
                                                                 victim: str) -> None:
    reader = TopicReader(stack.settings(), stack.settings().topics.accepted)
    ids: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for record in reader.poll(300):
                accepted = items_pb2.AcceptedItem.FromString(record.value)
                if accepted.item.tenant == victim:
                    ids.append(accepted.item.item_id)
            if reader.at_end():
                break
    finally:
        reader.close()
    assert sorted(ids) == ["secret-1", "secret-2"]
    _untouched(stack, victim)


def test_health_answers_probes_without_a_token(stack: LocalStack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    anonymous = replace(stack.credentials(), token="")
    for service in ("ingestion", "embedding", "indexing", "matching"):
        with anonymous.channel(stack.grpc_target(service)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_client_without_credentials_uses_tls_with_system_roots_and_is_refused(
        stack: LocalStack) -> None:
    with TwinstreamClient(stack.grpc_target("ingestion"), stack.grpc_target("matching"),
                          timeout_s=10, retry_budget_s=0) as client:
        assert _code(lambda: client.get(FUZZER, "x")) == grpc.StatusCode.UNAVAILABLE


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket in LISTEN that one of ``pids`` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((inodes[fields[9]], fields[1].split(":")[0]))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _group_pids(leaders: set[int]) -> set[int]:
    """The processes of the given process groups (each stack process leads its own)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) in leaders or int(stat.parent.name) in leaders:  # fields[2]: pgid
            pids.add(int(stat.parent.name))
    return pids


def _stack_sockets(stack: LocalStack, names: set[str] | None = None) -> list[tuple[int, str]]:
    leaders = {p.popen.pid for n, p in stack.processes.items()
               if p.popen is not None and (names is None or n in names)}
    if names is None and stack.triton is not None and stack.triton.process is not None \
            and stack.triton.process.popen is not None:
        leaders.add(stack.triton.process.popen.pid)
    return _listening(_group_pids(leaders))


def test_every_process_of_the_local_stack_but_milvus_listens_on_loopback_only(
        stack: LocalStack) -> None:
    milvus = {pid for pid, _ in _stack_sockets(stack, {"milvus"})}
    sockets = [s for s in _stack_sockets(stack) if s[0] not in milvus]
    assert len(sockets) >= 8, sockets  # 4 services x (gRPC + metrics) at least
    assert [s for s in sockets if s[1] not in LOOPBACK] == []


@pytest.mark.xfail(strict=True, reason="Milvus 2.3.5 binds its proxy and component gRPC ports on "
                   "all interfaces whatever `ip: 127.0.0.1` says (docs/security.md)")
def test_the_milvus_server_listens_on_loopback_only(stack: LocalStack) -> None:
    if stack.milvus_server is None:
        pytest.skip("Milvus Lite")
    sockets = _stack_sockets(stack, {"milvus"})
    assert sockets and [s for s in sockets if s[1] not in LOOPBACK] == []
