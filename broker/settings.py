"""Broker settings, read from the environment (prefix ``BROKER_``) or passed explicitly.

Nothing reads settings at import time: ``create_app(settings)`` receives them, so
tests and several processes can run differently configured brokers side by side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the broker; unknown ``BROKER_*`` variables are an error."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="forbid")

    environment: Literal["dev", "production"] = Field(
        default="production",
        description="'dev' generates missing broker keys on start; 'production' refuses to start "
        "without them.",
    )
    database_url: str = "sqlite+aiosqlite:///./var/broker.db"
    db_pool_size: int = Field(
        default=20,
        ge=1,
        le=200,
        description="PostgreSQL: connections each of a process's two pools keeps open once "
        "opened (transactions; reads and single-statement writes in autocommit).",
    )
    db_max_overflow: int = Field(
        default=0,
        ge=0,
        le=200,
        description="PostgreSQL: extra connections each pool may open under load, closed again "
        "as soon as they are returned to a full pool (a reconnect each time the load "
        "dips and rises). A process may hold 2 x (db_pool_size + db_max_overflow).",
    )
    key_dir: Path = Path("./var/keys")
    schema_dir: Path = REPO_ROOT / "schemas"
    policy_file: Path = REPO_ROOT / "policies" / "minimisation.yaml"
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="External base URL; the token endpoint URL derived from it is the required "
        "'aud' of client assertions and the issuer of access tokens.",
    )
    ledger_origin: str = "consent-broker.local/ledger"

    max_consent_days: int = Field(default=365, ge=1, le=3650)
    token_lifetime_seconds: int = Field(default=300, ge=30, le=900)
    assertion_max_lifetime_seconds: int = Field(default=300, ge=30, le=300)
    clock_skew_seconds: int = Field(default=30, ge=0, le=120)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=10 * 1024 * 1024)

    records_connect_timeout: float = Field(default=2.0, gt=0, le=30)
    records_read_timeout: float = Field(default=5.0, gt=0, le=60)
    records_max_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    records_max_connections: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="Records-endpoint connections per process, across all agencies; a "
        "fetch beyond them waits for one at most records_read_timeout.",
    )
    unsafe_allow_plain_http_endpoints: bool = Field(
        default=True,
        description="Allow http:// records endpoints and webhooks (loopback demos, tests). "
        "Set false in production so only https:// endpoints can be registered.",
    )

    denial_quantum_ms: float = Field(
        default=25.0,
        ge=0,
        le=1000,
        description="A disclosure denial (or refused deposit) is answered at the first "
        "multiple of this many milliseconds after the request arrived, so its timing does "
        "not show whether the survivor is known (broker/disclosure/denial_timing.py); 0 "
        "answers at once.",
    )
    rate_limit_per_second: float = Field(
        default=50.0, ge=0, description="Sustained requests per second per client; 0 disables."
    )
    rate_limit_burst: int = Field(default=200, ge=1, le=100_000)
    sequencer_interval_seconds: float = Field(default=0.05, gt=0, le=10)
    sequencer_batch_size: int = Field(default=2000, ge=1, le=100_000)
    run_background_workers: bool = True
    webhook_max_attempts: int = Field(default=12, ge=1, le=100)

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_environment(cls, data: Any) -> Any:
        # pydantic-settings ignores unknown variables; a typo such as BROKER_DATABASE_ULR
        # would silently fall back to a default, so refuse it instead.
        known = {f"BROKER_{name.upper()}" for name in cls.model_fields}
        unknown = sorted(
            k for k in os.environ if k.upper().startswith("BROKER_") and k.upper() not in known
        )
        if unknown:
            raise ValueError(f"unknown setting(s) in the environment: {', '.join(unknown)}")
        return data

    @model_validator(mode="after")
    def _production_needs_https(self) -> Settings:
        if self.environment == "production" and self.public_url.startswith("http://"):
            host = self.public_url.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
            if host not in {"127.0.0.1", "localhost", "::1", "[::1]"}:
                raise ValueError("BROKER_PUBLIC_URL must be https:// outside dev mode")
        return self

    @property
    def token_endpoint(self) -> str:
        return f"{self.public_url}/oauth/token"

    @property
    def issuer(self) -> str:
        return self.public_url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
