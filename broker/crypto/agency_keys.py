"""Key pairs for an agency (``broker keys generate``): an ES256 signing key for its
client assertions and an encryption key (X25519 or P-256) for the payloads it receives.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import orjson
from joserfc.jwk import ECKey, OKPKey, thumbprint

from broker.crypto.jwks import ENC_ALG
from broker.crypto.key_files import jwk_bytes, new_ec_signing_key, write_new_file

__all__ = [
    "EncCurve",
    "generate_agency_keys",
    "generate_p256_enc_keys",
]

_AGENCY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

EncCurve = Literal["X25519", "P-256"]


def generate_agency_keys(
    out_dir: Path, name: str, enc_curve: EncCurve = "X25519"
) -> tuple[Path, Path, Path, Path]:
    """Create an agency's key pairs for ``broker keys generate --out DIR``.

    Signing: P-256 / ES256 (private_key_jwt client assertions). Encryption:
    ``enc_curve`` (X25519 default, or P-256) with ECDH-ES+A256KW. Returns
    ``(sig_private, sig_jwks, enc_private, enc_jwks)`` paths; private files are 0600,
    and no existing file is ever overwritten.
    """
    if not _AGENCY_NAME.fullmatch(name):
        raise ValueError("name must be 1-64 characters of letters, digits, '.', '_' or '-'")
    out_dir = Path(out_dir)
    paths = (
        out_dir / f"{name}.sig.private.jwk.json",
        out_dir / f"{name}.sig.jwks.json",
        out_dir / f"{name}.enc.private.jwk.json",
        out_dir / f"{name}.enc.jwks.json",
    )
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing key files: {', '.join(existing)}")

    sig_key = new_ec_signing_key()
    enc_key: ECKey | OKPKey
    if enc_curve == "X25519":
        enc_key = OKPKey.generate_key("X25519")
    elif enc_curve == "P-256":
        enc_key = ECKey.generate_key("P-256")
    else:
        raise ValueError("enc_curve must be 'X25519' or 'P-256'")
    enc_key = _with_params(enc_key, use="enc", alg=ENC_ALG)

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    contents = (
        (jwk_bytes(sig_key, private=True), 0o600),
        (_jwks_bytes(sig_key), 0o644),
        (jwk_bytes(enc_key, private=True), 0o600),
        (_jwks_bytes(enc_key), 0o644),
    )
    for path, (data, mode) in zip(paths, contents, strict=True):
        if not write_new_file(path, data, mode):
            raise FileExistsError(f"refusing to overwrite existing key file: {path}")
    return paths


def generate_p256_enc_keys(out_dir: Path, name: str) -> tuple[Path, Path, Path, Path]:
    """``generate_agency_keys`` with a P-256 encryption key, for stacks without X25519."""
    return generate_agency_keys(out_dir, name, enc_curve="P-256")


def _with_params(key: ECKey | OKPKey, *, use: str, alg: str) -> ECKey | OKPKey:
    data = dict(key.as_dict(private=True))
    public: dict[str, Any] = {k: data[k] for k in ("kty", "crv", "x", "y") if k in data}
    data.update({"kid": thumbprint(public), "use": use, "alg": alg})
    if isinstance(key, ECKey):
        return ECKey.import_key(data)
    return OKPKey.import_key(data)


def _jwks_bytes(key: ECKey | OKPKey) -> bytes:
    jwks = {"keys": [dict(key.as_dict(private=False))]}
    return orjson.dumps(jwks, option=orjson.OPT_INDENT_2) + b"\n"
