"""A local CA, server and client certificates and a token key for the dev stack, the demo and
the tests, so they run with TLS and bearer tokens by default (docs/security.md)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twinstream.common.security import SCOPES, ClientCredentials, issue_token, new_key, read_key

# Names the server certificate carries: the stack's services listen on 127.0.0.1 only.
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class DevSecurity:
    """The files of one stack's security material, under ``root``."""

    root: Path

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert_file(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key_file(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def client_cert_file(self) -> Path:
        return self.root / "client.pem"

    @property
    def client_key_file(self) -> Path:
        return self.root / "client-key.pem"

    @property
    def token_key_file(self) -> Path:
        return self.root / "token.key"

    @classmethod
    def create(cls, root: Path, valid_days: int = 30) -> DevSecurity:
        """Write a fresh CA, a server and a client certificate and a token key into ``root``."""
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        material = cls(root)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twinstream dev CA")])
        now = datetime.datetime.now(datetime.UTC)
        ca = (_builder(ca_name, ca_name, ca_key.public_key(), now, valid_days)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        _write(material.ca_file, ca.public_bytes(serialization.Encoding.PEM))
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
        _leaf(ca, ca_key, "twinstream", alt_names, ExtendedKeyUsageOID.SERVER_AUTH, now,
              valid_days, material.server_cert_file, material.server_key_file)
        _leaf(ca, ca_key, "twinstream-client", [x509.DNSName("twinstream-client")],
              ExtendedKeyUsageOID.CLIENT_AUTH, now, valid_days, material.client_cert_file,
              material.client_key_file)
        _write(material.token_key_file, new_key())
        return material

    def service_env(self, mutual: bool = False) -> dict[str, str]:
        """The ``TWINSTREAM_*`` variables a service of the stack serves TLS and checks tokens with."""
        env = {"TWINSTREAM_TLS_CERT_FILE": str(self.server_cert_file),
               "TWINSTREAM_TLS_KEY_FILE": str(self.server_key_file),
               "TWINSTREAM_TLS_CA_FILE": str(self.ca_file),
               "TWINSTREAM_AUTH_TOKEN_KEY_FILE": str(self.token_key_file)}
        if mutual:
            env.update({"TWINSTREAM_TLS_CLIENT_AUTH": "true",
                        "TWINSTREAM_TLS_CLIENT_CERT_FILE": str(self.client_cert_file),
                        "TWINSTREAM_TLS_CLIENT_KEY_FILE": str(self.client_key_file)})
        return env

    def token(self, tenants: tuple[str, ...] = ("*",), scopes: tuple[str, ...] = SCOPES,
              ttl_s: float = 24 * 3600, subject: str = "dev") -> str:
        return issue_token(read_key(self.token_key_file), subject, tenants, scopes, ttl_s)

    def client_credentials(self, token: str = "", mutual: bool = False) -> ClientCredentials:
        return ClientCredentials(
            ca_file=str(self.ca_file), token=token,
            cert_file=str(self.client_cert_file) if mutual else "",
            key_file=str(self.client_key_file) if mutual else "")


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey,
             now: datetime.datetime, valid_days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days)))


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str,
          alt_names: list[x509.GeneralName], usage: x509.ObjectIdentifier,
          now: datetime.datetime, valid_days: int, cert_file: Path, key_file: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, ca.subject, key.public_key(), now, valid_days)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    _write(key_file, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)
