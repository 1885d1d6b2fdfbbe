"""Transport security and caller authorisation for the gRPC APIs (docs/security.md).

TLS credentials come from certificate files named in settings; callers present a bearer token
(a JWT signed HS256 with a key read from a file) naming the tenants and scopes it grants. One
server interceptor checks it against the method's scope and the tenant IN THE REQUEST (every
message of a stream), so a handler never sees a call its caller may not make.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import jwt
from prometheus_client import CollectorRegistry, Counter

from twinstream.common.config import Settings
from twinstream.common.handlers import wrap_behaviour
from twinstream.common.status import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)
audit = logging.getLogger("twinstream.audit")

SCOPES = ("ingest", "match", "delete", "admin")
ALL_TENANTS = "*"
TOKEN_ALGORITHM = "HS256"
TOKEN_ISSUER = "twinstream"
# HS256 keys shorter than the hash (32 bytes) weaken the MAC; refuse them rather than warn.
MIN_KEY_BYTES = 32
MAX_CACHED_TOKENS = 10_000
# Probes (Kubernetes gRPC health, grpcurl) reach these without a token.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


class SecurityConfigError(ValueError):
    """Settings that would serve without the protection asked for (a missing certificate...)."""


# -- tokens -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who called: the token's subject, the tenants it may act on ("*": all) and its scopes."""

    subject: str
    tenants: frozenset[str]
    scopes: frozenset[str]
    expires_at: float = float("inf")

    def allows_tenant(self, tenant: str) -> bool:
        return ALL_TENANTS in self.tenants or tenant in self.tenants


def read_key(path: str | Path) -> bytes:
    """The token signing key from its file (whitespace around it ignored)."""
    key = Path(path).read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise SecurityConfigError(f"the token key in {path} has {len(key)} bytes; "
                                  f"use at least {MIN_KEY_BYTES} random bytes")
    return key


def new_key() -> bytes:
    """A fresh random signing key, as text that fits a file or a Kubernetes Secret."""
    return secrets.token_hex(32).encode()


def issue_token(key: bytes, subject: str, tenants: Sequence[str], scopes: Sequence[str],
                ttl_s: float, now: float | None = None) -> str:
    """A signed token for ``subject``; ``tenants`` may be ``["*"]`` (every tenant)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {list(scopes)}")
    if not tenants or any(not t for t in tenants):
        raise ValueError("a token needs at least one non-empty tenant (or '*')")
    if ttl_s <= 0:
        raise ValueError("a token needs a positive lifetime")
    issued = int(time.time() if now is None else now)
    claims = {"iss": TOKEN_ISSUER, "sub": subject, "iat": issued, "exp": issued + int(ttl_s),
              "tenants": sorted(set(tenants)), "scopes": sorted(set(scopes))}
    return jwt.encode(claims, key, algorithm=TOKEN_ALGORITHM)


def verify_token(key: bytes, token: str) -> Principal:
    """The caller a token names; ``Unauthenticated`` when it is forged, expired or malformed."""
    try:
        claims = jwt.decode(token, key, algorithms=[TOKEN_ALGORITHM], issuer=TOKEN_ISSUER,
                            options={"require": ["exp", "sub", "iss"]})
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the token has expired; issue a new one", "expired_token") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated("the token's signature does not verify", "invalid_token") from None
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the token is not valid: {exc}", "invalid_token") from None
    tenants, scopes = _strings(claims.get("tenants")), _strings(claims.get("scopes"))
    if tenants is None or scopes is None or not isinstance(claims["sub"], str):
        raise Unauthenticated("the token lacks string lists 'tenants' and 'scopes'", "invalid_token")
    return Principal(claims["sub"], frozenset(tenants), frozenset(scopes), float(claims["exp"]))


def _strings(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


# -- which scope and tenant each method needs ----------------------------------------------------
@dataclass(frozen=True)
class MethodPolicy:
    """A method needs ``scope`` on the tenant ``tenant_of(request)`` names."""

    scope: str
    tenant_of: Callable[[Any], str]


def _item_tenant(request: Any) -> str:
    return str(request.item.tenant)


def _tenant(request: Any) -> str:
    return str(request.tenant)


# Every RPC of the API (tests/unit/common/test_security.py checks none is missing): a method
# without a policy is refused, never let through.
POLICIES: dict[str, MethodPolicy] = {
    "/twinstream.v1.Ingestion/Ingest": MethodPolicy("ingest", _item_tenant),
    "/twinstream.v1.Ingestion/IngestStream": MethodPolicy("ingest", _item_tenant),
    "/twinstream.v1.Matching/Match": MethodPolicy("match", _tenant),
    "/twinstream.v1.Matching/MatchStream": MethodPolicy("match", _tenant),
    "/twinstream.v1.Matching/Get": MethodPolicy("match", _tenant),
    "/twinstream.v1.Matching/GetCluster": MethodPolicy("match", _tenant),
    "/twinstream.v1.Matching/Delete": MethodPolicy("delete", _tenant),
}


@dataclass(frozen=True)
class AuthMetrics:
    """Authentication/authorisation outcomes by method (never by subject or tenant: unbounded)."""

    decisions: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AuthMetrics:
        return cls(Counter("twinstream_auth_decisions", "Calls by authentication outcome "
                           "(ok, unauthenticated, permission_denied) and reason",
                           ["grpc_method", "outcome", "reason"], registry=registry))


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates the bearer token and authorises scope and tenant of every request.

    Raises ``Unauthenticated``/``PermissionDenied`` from inside the handler, so the status
    interceptor outside it (``common/runtime.py``) answers and counts them like any other error.
    Each decision is one audit line: who, method, tenant, outcome; never the content.
    """

    def __init__(self, key: bytes, metrics: AuthMetrics,
                 policies: dict[str, MethodPolicy] | None = None) -> None:
        self.key = key
        self.metrics = metrics
        self.policies = POLICIES if policies is None else policies
        # Verified tokens until they expire: a client sends the same token on every call, and
        # verifying it each time costs more than the rest of the check.
        self._verified: dict[str, Principal] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or full.lstrip("/").rsplit("/", 1)[0] in OPEN_SERVICES:
            return handler
        policy = self.policies.get(full)
        return wrap_behaviour(handler, lambda inner, kind: self._wrap(inner, full, policy, kind.startswith("stream")))

    def _wrap(self, inner: Callable[..., Any], method: str, policy: MethodPolicy | None,
              streaming_in: bool) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            principal = self._authenticate(method, context)
            if policy is None:
                self._deny(principal, method, "", "no_policy", "this method is not open to callers")
            if policy.scope not in principal.scopes:
                self._deny(principal, method, "", "missing_scope",
                           f"the token lacks the {policy.scope!r} scope")
            if streaming_in:
                return inner(self._checked(request, principal, method, policy), context)
            self._authorise(principal, method, policy, request)
            return inner(request, context)
        return call

    def _checked(self, requests: Iterator[Any], principal: Principal, method: str,
                 policy: MethodPolicy) -> Iterator[Any]:
        """Every message's tenant is checked; each tenant is counted and audited once per call
        (a 10k-item stream is one line, not 10k)."""
        allowed: set[str] = set()
        for request in requests:
            if policy.tenant_of(request) not in allowed:
                self._authorise(principal, method, policy, request)
                allowed.add(policy.tenant_of(request))
            yield request

    def _authenticate(self, method: str, context: grpc.ServicerContext) -> Principal:
        token = bearer_token(context.invocation_metadata() or ())
        try:
            if token is None:
                raise Unauthenticated("send 'authorization: Bearer <token>' "
                                      "(twinstream token issue)", "missing_token")
            known = self._verified.get(token)
            if known is not None and known.expires_at > time.time():
                return known
            principal = verify_token(self.key, token)  # raises expired_token once it has expired
            if len(self._verified) >= MAX_CACHED_TOKENS:
                self._verified.clear()
            self._verified[token] = principal
            return principal
        except Unauthenticated as exc:
            self.metrics.decisions.labels(_short(method), "unauthenticated", exc.reason).inc()
            audit.warning("auth", extra={"subject": "", "method": method, "tenant": "",
                                         "outcome": "unauthenticated", "reason": exc.reason,
                                         "peer": context.peer()})
            raise

    def _authorise(self, principal: Principal, method: str, policy: MethodPolicy,
                   request: Any) -> None:
        tenant = policy.tenant_of(request)
        if not principal.allows_tenant(tenant):
            self._deny(principal, method, tenant, "tenant_not_allowed",
                       f"the token does not grant tenant {tenant!r}")
        self.metrics.decisions.labels(_short(method), "ok", "").inc()
        audit.info("auth", extra={"subject": principal.subject, "method": method,
                                  "tenant": tenant, "outcome": "ok"})

    def _deny(self, principal: Principal, method: str, tenant: str, reason: str,
              detail: str) -> NoReturn:
        self.metrics.decisions.labels(_short(method), "permission_denied", reason).inc()
        audit.warning("auth", extra={"subject": principal.subject, "method": method,
                                     "tenant": tenant, "outcome": "permission_denied",
                                     "reason": reason})
        raise PermissionDenied(detail, reason)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


# -- backends -------------------------------------------------------------------------------
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments for TLS and SASL, shared by every producer, consumer and
    admin client (``common/kafka.py``); a contradictory combination fails at start."""
    protocol = settings.kafka.security_protocol
    if protocol not in KAFKA_PROTOCOLS:
        raise SecurityConfigError(f"TWINSTREAM_KAFKA_SECURITY_PROTOCOL={protocol!r}: use one of "
                                  f"{', '.join(KAFKA_PROTOCOLS)}")
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.endswith("SSL"):
        options.update(ssl_check_hostname=True, ssl_cafile=settings.kafka.ssl_ca_file or None,
                       ssl_certfile=settings.kafka.ssl_cert_file or None,
                       ssl_keyfile=settings.kafka.ssl_key_file or None)
    if protocol.startswith("SASL"):
        mechanism = settings.kafka.sasl_mechanism
        if mechanism not in KAFKA_SASL_MECHANISMS:
            raise SecurityConfigError(f"{protocol} needs TWINSTREAM_KAFKA_SASL_MECHANISM, one of "
                                      f"{', '.join(KAFKA_SASL_MECHANISMS)}")
        if not (settings.kafka.sasl_username and settings.kafka.sasl_password.get_secret_value()):
            raise SecurityConfigError(f"{protocol} needs TWINSTREAM_KAFKA_SASL_USERNAME and "
                                      "TWINSTREAM_KAFKA_SASL_PASSWORD")
        options.update(sasl_mechanism=mechanism,
                       sasl_plain_username=settings.kafka.sasl_username,
                       sasl_plain_password=settings.kafka.sasl_password.get_secret_value())
    elif settings.kafka.sasl_mechanism:
        raise SecurityConfigError(f"TWINSTREAM_KAFKA_SASL_MECHANISM needs a SASL_* protocol, not "
                                  f"{protocol}")
    return options


def milvus_client_options(settings: Settings) -> dict[str, Any]:
    """pymilvus ``MilvusClient`` keyword arguments: the credentials and, for an https:// uri,
    the CA (``server_pem_path``) and the name its certificate carries."""
    options: dict[str, Any] = {}
    if settings.milvus.user:
        options.update(user=settings.milvus.user, password=settings.milvus.password.get_secret_value())
    elif settings.milvus.token.get_secret_value():
        options["token"] = settings.milvus.token.get_secret_value()
    if settings.milvus.ca_file:
        if not settings.milvus.uri.startswith("https://"):
            raise SecurityConfigError("TWINSTREAM_MILVUS_CA_FILE needs an https:// TWINSTREAM_MILVUS_URI")
        options["server_pem_path"] = settings.milvus.ca_file
        if settings.milvus.server_name:
            options["server_name"] = settings.milvus.server_name
    return options


# -- servers ----------------------------------------------------------------------------------
def server_interceptors(settings: Settings, registry: CollectorRegistry) -> list[grpc.ServerInterceptor]:
    """The authentication interceptor, or none when the settings turn auth off explicitly."""
    if settings.auth.disabled:
        log.warning("authentication is off (TWINSTREAM_AUTH_DISABLED): any caller may use any tenant")
        return []
    if not settings.auth.token_key_file:
        raise SecurityConfigError("set TWINSTREAM_AUTH_TOKEN_KEY_FILE (the token signing key), "
                                  "or TWINSTREAM_AUTH_DISABLED=true to serve without auth")
    return [AuthInterceptor(read_key(settings.auth.token_key_file), AuthMetrics.create(registry))]


def add_server_port(server: grpc.Server, address: str, settings: Settings) -> int:
    """Bind ``address`` with TLS from the settings' certificate files (client certificates
    required when ``tls_client_auth``), or in plain text only when ``grpc_plaintext`` says so."""
    if settings.tls.plaintext:
        log.warning("gRPC serves plain text (TWINSTREAM_GRPC_PLAINTEXT)")
        return server.add_insecure_port(address)
    if not (settings.tls.cert_file and settings.tls.key_file):
        raise SecurityConfigError("set TWINSTREAM_TLS_CERT_FILE and TWINSTREAM_TLS_KEY_FILE, "
                                  "or TWINSTREAM_GRPC_PLAINTEXT=true to serve plain text")
    if settings.tls.client_auth and not settings.tls.ca_file:
        raise SecurityConfigError("TWINSTREAM_TLS_CLIENT_AUTH needs TWINSTREAM_TLS_CA_FILE")
    credentials = grpc.ssl_server_credentials(
        [(Path(settings.tls.key_file).read_bytes(), Path(settings.tls.cert_file).read_bytes())],
        root_certificates=Path(settings.tls.ca_file).read_bytes() if settings.tls.ca_file else None,
        require_client_auth=settings.tls.client_auth,
    )
    return server.add_secure_port(address, credentials)



# -- clients ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientCredentials:
    """How a client reaches a server: TLS (the CA file, or the system's roots when empty), an
    optional client certificate (mutual TLS), and the bearer token it sends."""

    tls: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token: str = ""
    # The name the server certificate must carry, when the target is an address it lacks.
    server_name: str = ""

    @classmethod
    def plaintext(cls, token: str = "") -> ClientCredentials:
        return cls(tls=False, token=token)

    @classmethod
    def from_settings(cls, settings: Settings, token: str = "") -> ClientCredentials:
        """What a service uses for its own outgoing gRPC (and a client given settings)."""
        return cls(tls=not settings.tls.plaintext, ca_file=settings.tls.ca_file,
                   cert_file=settings.tls.client_cert_file,
                   key_file=settings.tls.client_key_file, token=token)

    def __repr__(self) -> str:  # the token never reaches a log line
        return (f"ClientCredentials(tls={self.tls}, ca_file={self.ca_file!r}, "
                f"cert_file={self.cert_file!r}, token={'***' if self.token else ''!r})")

    def channel(self, target: str,
                options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``target`` that sends the token with every call."""
        opts = [*options]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca_file), private_key=_read(self.key_file),
                certificate_chain=_read(self.cert_file))
            channel = grpc.secure_channel(target, credentials, options=opts)
        else:
            channel = grpc.insecure_channel(target, options=opts)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerToken(self.token))
        return channel


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (TLS or not, unlike call creds)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            (*(details.metadata or ()), self._header), details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None
