"""Signatures over small texts (an exported student's metadata) with the server's ECDSA key.

The server signs with a private key (``fedrank certs`` writes ``student-signing.key``, PEM);
a device verifies with the public key (``student-signing.pub``, PEM, or an OpenSSH public key).
The signature is ECDSA with SHA-256 over a fixed context string plus the UTF-8 text, so a
signature made for something else never verifies here. What the text must cover (a digest of
the weights or of the ONNX graph) is the caller's business: it checks that digest against the
content before it trusts the text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrank.common.errors import ConfigError

__all__ = [
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "sign_text",
    "verify_text",
]

_CONTEXT = b"fedrank signed metadata v1\n"


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key from a PEM (PKCS#8 / SEC1) or OpenSSH file without password."""
    src = Path(path)
    try:
        data = src.read_bytes()
    except OSError as err:
        raise ConfigError(f"{src}: cannot read the signing key ({err.strerror})") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{src}: not a private key without password ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{src}: expected an ECDSA private key, got {type(key).__name__}")
    return key


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """An EC public key from a PEM (SubjectPublicKeyInfo) or OpenSSH file."""
    src = Path(path)
    try:
        data = src.read_bytes()
    except OSError as err:
        raise ConfigError(f"{src}: cannot read the public key ({err.strerror})") from None
    try:
        if data.lstrip().startswith(b"ecdsa-sha2-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, binascii.Error) as err:
        raise ConfigError(f"{src}: not a public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{src}: expected an ECDSA public key, got {type(key).__name__}")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """``sha256:<hex>`` of the public key's DER encoding (names a key in messages)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:32]


def sign_text(key: ec.EllipticCurvePrivateKey, text: str) -> str:
    """Base64 DER ECDSA-SHA256 signature of ``text`` (with this module's context)."""
    signature = key.sign(_CONTEXT + text.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def verify_text(key: ec.EllipticCurvePublicKey, text: str, signature: str) -> bool:
    """True when ``signature`` (from :func:`sign_text`) signs ``text`` with ``key``."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        key.verify(raw, _CONTEXT + text.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True
