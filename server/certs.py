"""TLS certificates and SuperNode authentication keys for a fedrank deployment.

``python -m fedrank.server.certs --out DIR [--host NAME|IP ...] [--nodes N]`` writes:

- ``ca.crt`` / ``ca.key``: a local certificate authority (ECDSA P-384, self-signed).
- ``server.pem`` / ``server.key``: the SuperLink certificate signed by that CA. Its subject
  alternative names hold ``localhost``, the loopback addresses ``127.0.0.1`` and ``::1``, and
  every ``--host`` given (the names or addresses SuperNodes and the ``flwr`` CLI dial).
- ``node-<i>`` (OpenSSH private key) and ``node-<i>.pub`` (OpenSSH public key): one ECDSA
  P-384 key pair per SuperNode, for ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register``.
- ``student-signing.key`` / ``student-signing.pub`` (PEM): the server's ECDSA P-384 key pair
  that signs student exports (``fedrank export --sign-key``); devices verify with the public
  key (``fedrank score --verify-key``).

Only the ``cryptography`` package is needed (Flower already depends on it). Private keys are
created with mode 0600 (the file never exists with wider permissions). Every file is written
atomically; existing files are kept unless ``--force`` is given, so re-running never silently
replaces a CA that nodes already trust. The command ends by printing the hardened commands
that use these files (docs/deployment.md explains them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrank.common.atomic_io import atomic_write_bytes
from fedrank.common.errors import ConfigError, FedrankError
from fedrank.server.deploy_commands import hardened_commands

__all__ = [
    "CertPaths",
    "make_ca",
    "make_server_cert",
    "make_node_keys",
    "make_signing_key",
    "make_all",
    "main",
]

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass
class CertPaths:
    """Where :func:`make_all` wrote each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_private_keys: list[Path] = field(default_factory=list)
    node_public_keys: list[Path] = field(default_factory=list)
    signing_key: Path | None = None
    signing_public_key: Path | None = None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # the mode is set when the file is created, before any key byte is in it
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: not a PEM private key without password ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: expected an EC private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise ConfigError(f"{path}: not a PEM certificate ({err})") from err


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*_LOOPBACK, *hosts]:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c in host for c in " /:@"):
                raise ConfigError(
                    f"--host {host!r} is neither an IP address nor a DNS name"
                ) from None
            names.append(x509.DNSName(host))
    return names


def make_ca(out_dir: Path, days: int = 365, force: bool = False) -> tuple[Path, Path]:
    """Create (or keep) the CA key and self-signed certificate; returns their paths."""
    cert_path, key_path = out_dir / "ca.crt", out_dir / "ca.key"
    if cert_path.exists() and key_path.exists() and not force:
        _load_cert(cert_path), _load_key(key_path)  # fail early on a damaged file
        return cert_path, key_path
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrank local CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_server_cert(
    out_dir: Path, hosts: Sequence[str] = (), days: int = 365, force: bool = False
) -> tuple[Path, Path]:
    """Create (or keep) the SuperLink key and CA-signed certificate; returns their paths.

    The certificate's SAN always includes ``localhost``, ``127.0.0.1`` and ``::1``.
    """
    cert_path, key_path = out_dir / "server.pem", out_dir / "server.key"
    if cert_path.exists() and key_path.exists() and not force:
        _load_cert(cert_path), _load_key(key_path)
        return cert_path, key_path
    ca_cert = _load_cert(out_dir / "ca.crt")
    ca_key = _load_key(out_dir / "ca.key")
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    first = next((h for h in hosts if h), "localhost")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_node_keys(
    out_dir: Path, count: int, prefix: str = "node", force: bool = False
) -> tuple[list[Path], list[Path]]:
    """Create (or keep) ``count`` ECDSA P-384 key pairs in OpenSSH format.

    Returns the private key paths (``<prefix>-<i>``) and public key paths (``.pub``), i = 1..N.
    """
    if count < 0:
        raise ConfigError(f"--nodes must be >= 0, got {count}")
    private_paths, public_paths = [], []
    for i in range(1, count + 1):
        priv, pub = out_dir / f"{prefix}-{i}", out_dir / f"{prefix}-{i}.pub"
        if not (priv.exists() and pub.exists()) or force:
            key = _new_key()
            _write(
                priv,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                ),
                private=True,
            )
            _write(
                pub,
                key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                )
                + f" {prefix}-{i}\n".encode(),
            )
        private_paths.append(priv)
        public_paths.append(pub)
    return private_paths, public_paths


def make_signing_key(out_dir: Path, force: bool = False) -> tuple[Path, Path]:
    """Create (or keep) the ECDSA P-384 key pair that signs student exports (PEM)."""
    priv, pub = out_dir / "student-signing.key", out_dir / "student-signing.pub"
    if priv.exists() and pub.exists() and not force:
        _load_key(priv)
        return priv, pub
    key = _new_key()
    _write(priv, _pem_key(key), private=True)
    _write(
        pub,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return priv, pub


def make_all(
    out_dir: str | os.PathLike[str],
    hosts: Sequence[str] = (),
    nodes: int = 2,
    days: int = 365,
    force: bool = False,
) -> CertPaths:
    """CA, SuperLink certificate and ``nodes`` SuperNode key pairs in ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    ca_cert, ca_key = make_ca(out, days=days, force=force)
    server_cert, server_key = make_server_cert(out, hosts, days=days, force=force)
    privs, pubs = make_node_keys(out, nodes, force=force)
    signing_key, signing_pub = make_signing_key(out, force=force)
    return CertPaths(
        ca_cert, ca_key, server_cert, server_key, privs, pubs, signing_key, signing_pub
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrank certs",
        description="Create a local CA, the SuperLink TLS certificate and SuperNode auth keys.",
    )
    parser.add_argument("--out", required=True, help="directory for the files (created)")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP address for the SuperLink certificate (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs (default 2)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    paths = make_all(args.out, args.host, args.nodes, args.days, args.force)
    print(f"CA certificate      {paths.ca_cert}")
    print(f"SuperLink cert/key  {paths.server_cert} {paths.server_key}")
    for priv, pub in zip(paths.node_private_keys, paths.node_public_keys, strict=True):
        print(f"SuperNode key pair  {priv} {pub}")
    print(f"export signing pair {paths.signing_key} {paths.signing_public_key}")
    print()
    print(hardened_commands(str(args.out), args.host[0] if args.host else "127.0.0.1"))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except FedrankError as err:
        print(f"certs: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
