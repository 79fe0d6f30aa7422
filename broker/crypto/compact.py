"""Compact JWS (ES256) and JWE (ECDH-ES+A256KW with A256GCM) writers over ``cryptography``.

Every disclosure is signed and then encrypted, and joserfc spent about 200 µs on
that, half of it outside OpenSSL (registries, header checks, exporting the
ephemeral key it had just made). These two writers compose the same primitives
in the order RFC 7515, 7516 and 7518 give, for the one pair of algorithms the
broker writes. Everything the broker *reads* still goes through joserfc, and the
tests check that joserfc and jwcrypto both open what these write.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["RecipientKey", "b64url", "concat_kdf", "ecdh_es_a256kw", "es256"]

#: Any public key type is accepted and checked: only X25519 and P-256 pass.
RecipientKey = PublicKeyTypes

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_P256_COORDINATE = 32
_KEY_WRAP_BITS = 256  # A256KW: the derived key-encryption key is 256 bits
_CEK_BYTES = 32  # A256GCM
_IV_BYTES = 12  # 96-bit GCM nonce, RFC 7518 §5.3


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def es256(header: Mapping[str, Any], payload: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    """A compact JWS: ECDSA P-256 / SHA-256, signature as the 64-byte R || S (RFC 7518 §3.4)."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("ES256 needs a P-256 key")
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(payload)}"
    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), _ECDSA_SHA256))
    signature = r.to_bytes(_P256_COORDINATE, "big") + s.to_bytes(_P256_COORDINATE, "big")
    return f"{signing_input}.{b64url(signature)}"


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def concat_kdf(
    shared_secret: bytes, algorithm: str, key_bits: int, apu: bytes = b"", apv: bytes = b""
) -> bytes:
    """The Concat KDF of NIST SP 800-56A as RFC 7518 §4.6.2 uses it, with SHA-256.

    Only one hash round is needed for keys up to 256 bits, which is all JOSE asks for.
    """
    if not 0 < key_bits <= 256 or key_bits % 8:
        raise ValueError("Concat KDF here derives 8..256-bit keys")
    other_info = (
        _length_prefixed(algorithm.encode("ascii"))
        + _length_prefixed(apu)
        + _length_prefixed(apv)
        + key_bits.to_bytes(4, "big")
    )
    digest = hashlib.sha256(b"\x00\x00\x00\x01" + shared_secret + other_info).digest()
    return digest[: key_bits // 8]


def _ephemeral_agreement(recipient: RecipientKey) -> tuple[dict[str, str], bytes]:
    """A fresh ephemeral key on the recipient's curve: its public JWK and the shared secret."""
    if isinstance(recipient, x25519.X25519PublicKey):
        okp = x25519.X25519PrivateKey.generate()
        x = okp.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "X25519", "x": b64url(x)}, okp.exchange(recipient)
    if isinstance(recipient, ec.EllipticCurvePublicKey) and isinstance(
        recipient.curve, ec.SECP256R1
    ):
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        x, y = point[1 : 1 + _P256_COORDINATE], point[1 + _P256_COORDINATE :]
        epk = {"kty": "EC", "crv": "P-256", "x": b64url(x), "y": b64url(y)}
        return epk, ephemeral.exchange(ec.ECDH(), recipient)
    raise TypeError("ECDH-ES recipients here are X25519 or P-256 public keys")


def ecdh_es_a256kw(header: Mapping[str, Any], plaintext: bytes, recipient: RecipientKey) -> str:
    """A compact JWE: ECDH-ES+A256KW key agreement, A256GCM content encryption.

    ``header`` must already say ``alg`` ECDH-ES+A256KW and ``enc`` A256GCM; the
    ephemeral public key is added as ``epk``. No ``apu``/``apv`` are sent, so the
    KDF's party infos are empty, as RFC 7518 §4.6.2 specifies for that case.
    """
    if header.get("alg") != "ECDH-ES+A256KW" or header.get("enc") != "A256GCM":
        raise ValueError("this writer only does ECDH-ES+A256KW with A256GCM")
    if "epk" in header or "apu" in header or "apv" in header or "zip" in header:
        raise ValueError("epk, apu, apv and zip are not the caller's to set")
    epk, shared_secret = _ephemeral_agreement(recipient)
    protected = b64url(orjson.dumps({**header, "epk": epk}))
    kek = concat_kdf(shared_secret, "ECDH-ES+A256KW", _KEY_WRAP_BITS)
    # One read from the OS for both (each read is a system call); never buffered.
    key_and_iv = os.urandom(_CEK_BYTES + _IV_BYTES)
    cek, iv = key_and_iv[:_CEK_BYTES], key_and_iv[_CEK_BYTES:]
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    ciphertext, tag = sealed[:-16], sealed[-16:]
    encrypted_key = aes_key_wrap(kek, cek)
    return ".".join((protected, b64url(encrypted_key), b64url(iv), b64url(ciphertext), b64url(tag)))
