"""TLS handshakes and bearer tokens against in-process servers on real sockets: the interceptor
stack of ``common/runtime.py`` (status mapping outside, authentication inside) in front of a
servicer that records what reached it, so "nothing of B was returned or changed" is observable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from twinstream.client import TwinstreamClient, text_item
from twinstream.common.config import Settings
from twinstream.common.metrics import Metrics
from twinstream.common.runtime import StatusInterceptor
from twinstream.common.security import (
    POLICIES,
    SCOPES,
    AuthInterceptor,
    AuthMetrics,
    ClientCredentials,
    SecurityConfigError,
    add_server_port,
    issue_token,
    read_key,
    server_interceptors,
    verify_token,
)
from twinstream.common.status import Unauthenticated
from twinstream.devcerts import DevSecurity
from twinstream.v1 import (
    ingestion_pb2,
    ingestion_pb2_grpc,
    matching_pb2,
    matching_pb2_grpc,
)


@dataclass
class Recorder(ingestion_pb2_grpc.IngestionServicer, matching_pb2_grpc.MatchingServicer):
    """Answers every call and records the tenants that reached it."""

    tenants: list[str] = field(default_factory=list)

    def Ingest(self, request: Any, context: Any) -> ingestion_pb2.IngestResponse:
        self.tenants.append(request.item.tenant)
        return ingestion_pb2.IngestResponse(item_id=request.item.item_id)

    def IngestStream(self, requests: Any, context: Any) -> ingestion_pb2.IngestSummary:
        summary = ingestion_pb2.IngestSummary()
        for request in requests:
            self.tenants.append(request.item.tenant)
            summary.item_ids.append(request.item.item_id)
        return summary

    def Match(self, request: Any, context: Any) -> matching_pb2.MatchResponse:
        self.tenants.append(request.tenant)
        return matching_pb2.MatchResponse()

    def MatchStream(self, requests: Any, context: Any) -> Iterator[matching_pb2.MatchResponse]:
        for request in requests:
            self.tenants.append(request.tenant)
            yield matching_pb2.MatchResponse()

    def Get(self, request: Any, context: Any) -> matching_pb2.StoredItem:
        self.tenants.append(request.tenant)
        return matching_pb2.StoredItem(tenant=request.tenant, item_id=request.item_id)

    def Delete(self, request: Any, context: Any) -> matching_pb2.DeleteResponse:
        self.tenants.append(request.tenant)
        return matching_pb2.DeleteResponse(deleted=len(request.item_ids))

    def GetCluster(self, request: Any, context: Any) -> matching_pb2.Cluster:
        self.tenants.append(request.tenant)
        return matching_pb2.Cluster()


@dataclass
class Served:
    port: int
    material: DevSecurity
    recorder: Recorder
    registry: CollectorRegistry

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, tenants: tuple[str, ...] = ("a",), scopes: tuple[str, ...] = SCOPES,
              ttl_s: float = 600) -> str:
        return self.material.token(tenants, scopes, ttl_s, subject="test")

    def client(self, token: str = "", **creds: Any) -> TwinstreamClient:
        credentials = replace(self.material.client_credentials(token), **creds)
        return TwinstreamClient(self.target, self.target, timeout_s=5, retry_budget_s=0,
                                credentials=credentials)

    def count(self, outcome: str, reason: str) -> float:
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "twinstream_auth_decisions_total" and \
                        sample.labels["outcome"] == outcome and sample.labels["reason"] == reason:
                    total += sample.value
        return total


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> DevSecurity:
    return DevSecurity.create(tmp_path_factory.mktemp("security"))


def _serve(material: DevSecurity, mutual: bool = False) -> Iterator[Served]:
    settings = Settings(tls={"cert_file": str(material.server_cert_file),
                             "key_file": str(material.server_key_file),
                             "ca_file": str(material.ca_file), "client_auth": mutual},
                        auth={"token_key_file": str(material.token_key_file)})
    registry = CollectorRegistry()
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[
        StatusInterceptor(Metrics.create(CollectorRegistry())),
        AuthInterceptor(read_key(material.token_key_file), AuthMetrics.create(registry))])
    ingestion_pb2_grpc.add_IngestionServicer_to_server(recorder, server)
    matching_pb2_grpc.add_MatchingServicer_to_server(recorder, server)
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = add_server_port(server, "127.0.0.1:0", settings)
    server.start()
    try:
        yield Served(port, material, recorder, registry)
    finally:
        server.stop(0).wait()


@pytest.fixture
def served(material: DevSecurity) -> Iterator[Served]:
    yield from _serve(material)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def test_a_call_with_a_valid_token_over_tls_reaches_the_handler(served: Served) -> None:
    with served.client(served.token()) as client:
        assert client.get("a", "x").item_id == "x"
    assert served.recorder.tenants == ["a"]
    assert served.count("ok", "") == 1


def test_a_call_without_a_token_is_unauthenticated(served: Served) -> None:
    with served.client() as client:
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert served.recorder.tenants == []
    assert served.count("unauthenticated", "missing_token") == 1


def test_an_expired_token_is_unauthenticated(served: Served) -> None:
    key = read_key(served.material.token_key_file)
    expired = issue_token(key, "test", ["a"], ["match"], ttl_s=60, now=time.time() - 3600)
    with served.client(expired) as client:
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert served.count("unauthenticated", "expired_token") == 1


def test_a_token_signed_with_another_key_is_unauthenticated(served: Served) -> None:
    forged = issue_token(b"k" * 64, "test", ["*"], list(SCOPES), ttl_s=600)
    with served.client(forged) as client:
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert served.count("unauthenticated", "invalid_token") == 1


def test_an_unsigned_token_is_unauthenticated(served: Served) -> None:
    unsigned = jwt.encode({"iss": "twinstream", "sub": "x", "exp": time.time() + 600,
                           "tenants": ["*"], "scopes": list(SCOPES)}, "", algorithm="none")
    with served.client(unsigned) as client:
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert served.recorder.tenants == []


@pytest.mark.parametrize("method", ["ingest", "ingest_many", "match", "get", "delete", "cluster"])
def test_tenant_a_token_on_tenant_b_is_permission_denied_and_reaches_nothing(
        served: Served, method: str) -> None:
    with served.client(served.token(("a",))) as client:
        calls = {
            "ingest": lambda: client.ingest(text_item("1", "x", "b")),
            "ingest_many": lambda: client.ingest_many([text_item("1", "x", "b")]),
            "match": lambda: client.match("b", item_id="1"),
            "get": lambda: client.get("b", "1"),
            "delete": lambda: client.delete("b", ["1"]),
            "cluster": lambda: client.cluster("b", "1"),
        }
        assert _code(calls[method]) == grpc.StatusCode.PERMISSION_DENIED
    assert served.recorder.tenants == []
    assert served.count("permission_denied", "tenant_not_allowed") == 1


def test_a_stream_is_refused_at_the_first_message_of_another_tenant(served: Served) -> None:
    items = [text_item("1", "x", "a"), text_item("2", "x", "b"), text_item("3", "x", "a")]
    with served.client(served.token(("a",))) as client:
        assert _code(lambda: client.ingest_many(items)) == grpc.StatusCode.PERMISSION_DENIED
        requests = [matching_pb2.MatchRequest(tenant=t, item_id="1") for t in ("a", "b")]
        assert _code(lambda: list(client.match_stream(requests))) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert "b" not in served.recorder.tenants


def test_a_token_without_the_scope_is_permission_denied(served: Served) -> None:
    with served.client(served.token(("a",), ("ingest", "match"))) as client:
        assert _code(lambda: client.delete("a", ["1"])) == grpc.StatusCode.PERMISSION_DENIED
    assert served.count("permission_denied", "missing_scope") == 1
    assert served.recorder.tenants == []


def test_an_all_tenant_token_reaches_every_tenant(served: Served) -> None:
    with served.client(served.token(("*",))) as client:
        client.get("a", "1")
        client.get("b", "1")
    assert served.recorder.tenants == ["a", "b"]


def test_health_answers_without_a_token(served: Served) -> None:
    with served.material.client_credentials().channel(served.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plain_text_client_against_the_tls_server_fails_unavailable_without_hanging(
        served: Served) -> None:
    started = time.monotonic()
    with served.client(served.token(), tls=False) as client:
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5, "the call returned before its deadline"


def test_a_client_that_does_not_trust_the_ca_fails_unavailable(served: Served,
                                                                 tmp_path: Path) -> None:
    other = DevSecurity.create(tmp_path / "other")
    with served.client(served.token(), ca_file=str(other.ca_file)) as client:
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAVAILABLE
    assert served.recorder.tenants == []


def test_mutual_tls_refuses_a_client_without_a_certificate(material: DevSecurity) -> None:
    for served in _serve(material, mutual=True):
        with served.client(served.token()) as client:
            assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAVAILABLE
        with served.client(served.token(), cert_file=str(material.client_cert_file),
                           key_file=str(material.client_key_file)) as client:
            assert client.get("a", "x").item_id == "x"
        assert served.recorder.tenants == ["a"]


def test_every_rpc_of_the_api_has_a_policy() -> None:
    methods = {f"/{service.full_name}/{method.name}"
               for module in (ingestion_pb2, matching_pb2)
               for service in module.DESCRIPTOR.services_by_name.values()
               for method in service.methods}
    assert methods == set(POLICIES)


def test_a_method_without_a_policy_is_refused(material: DevSecurity) -> None:
    interceptor = AuthInterceptor(read_key(material.token_key_file),
                                  AuthMetrics.create(CollectorRegistry()), policies={})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[StatusInterceptor(Metrics.create(CollectorRegistry())), interceptor])
    matching_pb2_grpc.add_MatchingServicer_to_server(Recorder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        credentials = ClientCredentials.plaintext(material.token(("*",)))
        with TwinstreamClient(f"127.0.0.1:{port}", f"127.0.0.1:{port}", timeout_s=5,
                              credentials=credentials) as client:
            assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(0).wait()


def test_a_server_without_certificates_or_key_refuses_to_start_unless_asked() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(SecurityConfigError, match="TLS_CERT_FILE"):
        add_server_port(server, "127.0.0.1:0", Settings())
    with pytest.raises(SecurityConfigError, match="AUTH_TOKEN_KEY_FILE"):
        server_interceptors(Settings(), CollectorRegistry())
    assert add_server_port(server, "127.0.0.1:0", Settings(tls={"plaintext": True})) > 0
    assert server_interceptors(Settings(auth={"disabled": True}), CollectorRegistry()) == []


def test_a_short_token_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("short")
    with pytest.raises(SecurityConfigError, match="at least 32"):
        read_key(tmp_path / "key")


def test_a_token_carries_subject_tenants_and_scopes(material: DevSecurity) -> None:
    key = read_key(material.token_key_file)
    principal = verify_token(key, issue_token(key, "svc", ["t1", "t2"], ["match"], ttl_s=60))
    assert (principal.subject, principal.tenants, principal.scopes) == \
        ("svc", frozenset({"t1", "t2"}), frozenset({"match"}))
    with pytest.raises(Unauthenticated):
        verify_token(key, "not-a-jwt")
    with pytest.raises(ValueError, match="scopes"):
        issue_token(key, "svc", ["t1"], ["root"], ttl_s=60)


def test_secrets_and_tokens_never_show_in_a_repr() -> None:
    settings = Settings(milvus={"token": "root:s3cr3t", "password": "hunter2"},
                        kafka={"sasl_password": "pw-kafka"})
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "s3cr3t" not in shown and "hunter2" not in shown and "pw-kafka" not in shown
    assert "abc.def" not in repr(ClientCredentials(token="abc.def"))



# -- backend client settings (tansu 0.6 cannot serve TLS or SCRAM here: docs/security.md) -------
def test_kafka_sasl_ssl_options_are_ones_every_kafka_python_client_takes() -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    from twinstream.common.security import kafka_client_options

    options = kafka_client_options(Settings(kafka={
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "svc", "sasl_password": "pw", "ssl_ca_file": "/ca.pem"}))
    assert options["security_protocol"] == "SASL_SSL" and options["ssl_cafile"] == "/ca.pem"
    assert (options["sasl_mechanism"], options["sasl_plain_username"],
            options["sasl_plain_password"]) == ("SCRAM-SHA-512", "svc", "pw")
    assert type(options["sasl_plain_password"]) is str
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(options) <= set(client.DEFAULT_CONFIG), client.__name__
    assert kafka_client_options(Settings()) == {"security_protocol": "PLAINTEXT"}


def test_an_unknown_kafka_security_protocol_is_refused_when_settings_load() -> None:
    with pytest.raises(ValidationError, match="security_protocol"):
        Settings(kafka={"security_protocol": "TLS"})


@pytest.mark.parametrize("settings, message", [
    (Settings(kafka={"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p"}),
     "SASL_MECHANISM"),
    (Settings(kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}), "USERNAME"),
    (Settings(kafka={"sasl_mechanism": "PLAIN"}), "needs a SASL_"),
], ids=["no-mechanism", "no-credentials", "mechanism-without-sasl"])
def test_contradictory_kafka_security_settings_fail_at_start(settings: Settings,
                                                              message: str) -> None:
    from twinstream.common.security import kafka_client_options

    with pytest.raises(SecurityConfigError, match=message):
        kafka_client_options(settings)


def test_milvus_options_carry_credentials_and_the_ca_for_https() -> None:
    from twinstream.common.security import milvus_client_options

    assert milvus_client_options(Settings()) == {}
    assert milvus_client_options(Settings(milvus={"token": "root:Milvus"})) == {"token": "root:Milvus"}
    options = milvus_client_options(Settings(milvus={
        "uri": "https://m:19530", "user": "svc", "password": "pw",
        "ca_file": "/ca.pem", "server_name": "milvus.local"}))
    assert options == {"user": "svc", "password": "pw", "server_pem_path": "/ca.pem",
                       "server_name": "milvus.local"}
    with pytest.raises(SecurityConfigError, match="https"):
        milvus_client_options(Settings(milvus={"uri": "http://m:19530", "ca_file": "/ca.pem"}))


def test_a_stream_is_audited_once_per_tenant(served: Served,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="twinstream.audit")
    items = [text_item(str(i), "x", "a") for i in range(50)]
    with served.client(served.token(("a",))) as client:
        assert len(client.ingest_many(items).item_ids) == 50
    lines = [r for r in caplog.records if r.name == "twinstream.audit"]
    assert len(lines) == 1 and lines[0].__dict__["tenant"] == "a"
    assert lines[0].__dict__["subject"] == "test" and "x" not in lines[0].getMessage()
    assert served.count("ok", "") == 1


def test_a_cached_token_is_refused_once_it_expires(served: Served) -> None:
    issued = time.time()
    token = issue_token(read_key(served.material.token_key_file), "test", ["a"], ["match"],
                        ttl_s=5, now=issued)
    with served.client(token) as client:
        client.get("a", "x")
        client.get("a", "x")  # answered from the cache of verified tokens
        time.sleep(max(0.0, int(issued) + 6.1 - time.time()))  # wait past its expiry
        assert _code(lambda: client.get("a", "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert served.recorder.tenants == ["a", "a"]
    assert served.count("unauthenticated", "expired_token") == 1
