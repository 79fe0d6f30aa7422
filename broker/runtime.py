"""Everything a running broker holds: settings, keys, catalog, database, workers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from broker.auth.ratelimit import RateLimiter
from broker.auth.tokens import AccessTokenVerifier
from broker.catalog import Catalog, load_catalog
from broker.crypto.datakeys import DataKeyUnavailable
from broker.crypto.keystore import BrokerKeys, RecordsKeyRotated
from broker.db import make_engine, make_sessionmaker
from broker.ledger.sequencer import SequencerState
from broker.settings import Settings
from broker.sources.connections import AgencyClient

log = logging.getLogger("broker")
T = TypeVar("T")
#: A token naming an unknown key makes a process read its key folder at most this often.
UNKNOWN_KID_RELOAD_SECONDS = 1.0


@dataclass
class Runtime:
    settings: Settings
    keys: BrokerKeys
    catalog: Catalog
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    #: PostgreSQL: a second pool whose connections run each statement as its own
    #: transaction, for reads and single-statement writes (see ``broker.db``). SQLite:
    #: the transactional engine and sessionmaker above, since it has no round trips.
    autocommit_engine: AsyncEngine
    autocommit_sessionmaker: async_sessionmaker[AsyncSession]
    #: PostgreSQL: the first-come-first-served line of ``PooledDriver``s for
    #: ``autocommit_engine``'s connections (``broker.hot_sql``). None on SQLite.
    driver_gate: asyncio.Semaphore | None
    token_verifier: AccessTokenVerifier
    http: AgencyClient  # records endpoints and webhooks
    limiter: RateLimiter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    sequencer: SequencerState = field(default_factory=SequencerState)
    #: Set when a commit queued revocation notices: this process's delivery loop goes
    #: at once instead of finishing its idle pause (up to 4 s).
    notices_due: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when a hold was placed or lifted (PostgreSQL ``NOTIFY``): read them now.
    holds_changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: When a token naming an unknown key last made this process read its key folder.
    unknown_kid_reload_at: float = float("-inf")
    #: Reasons disclosures are on hold (``broker.disclosure.holds``); None until read,
    #: which holds too.
    disclosure_holds: frozenset[str] | None = None

    def reload_secret_keys(self) -> bool:
        """Take the records and subject-commitment keys now in the key folder; True if
        they changed.

        Called every few seconds, and when a survivor's data key opens with none of the
        keys held or the records key file no longer holds the key loaded: a rotation
        then needs no restart. Keys are read, never written; a folder without the new
        key (another host's, not yet updated) changes nothing, and the caller answers 503.
        """
        fresh = self.keys.with_secret_keys_from_disk()
        if fresh is self.keys:
            return False
        self.keys = fresh
        log.info("records and subject-commitment keys reloaded from the key folder")
        return True

    def reload_signing_keys(self) -> bool:
        """Take the token and payload signing keys now in the key folder; True if they
        changed. After ``broker keys rotate token|payload`` this process signs with the
        new key and still accepts what the retired one signed, without a restart."""
        fresh = self.keys.with_signing_keys_from_disk()
        if fresh is self.keys:
            return False
        self.keys = fresh
        self.token_verifier.use_keys(fresh.token_signing, fresh.retired_token)
        log.info(
            "signing keys reloaded from the key folder: token kid %s, payload kid %s",
            fresh.token_signing.kid,
            fresh.payload_signing.kid,
        )
        return True

    def reload_keys(self) -> bool:
        """Every key this process takes from the folder while running (the checkpoint key
        has its own hand-over, ``broker.ledger.checkpoint_key``); True if any changed.

        A folder caught mid-copy or holding a bad file changes nothing: the keys held
        stay in use, with a warning, until the folder reads whole.
        """
        try:
            signing = self.reload_signing_keys()
            secret = self.reload_secret_keys()
        except (OSError, ValueError) as exc:  # KeyFileInsecure is an OSError
            log.warning("key folder not taken, keeping the keys held: %s", exc)
            return False
        return signing or secret

    def reload_for_unknown_kid(self) -> bool:
        """``reload_keys`` for a token naming a key this process does not hold, at most
        once a second: tokens with made-up kids cannot make it read the folder more."""
        now = time.monotonic()
        if now - self.unknown_kid_reload_at < UNKNOWN_KID_RELOAD_SECONDS:
            return False
        self.unknown_kid_reload_at = now
        return self.reload_keys()

    def with_records_keys(self, use: Callable[[tuple[bytes, ...]], T]) -> T:
        """``use(records keys)``, once more with the folder's keys if no key held opened
        the survivor's data key (``DataKeyUnavailable``) and the folder has others."""
        try:
            return use(self.keys.records_keks)
        except DataKeyUnavailable:
            if not self.reload_secret_keys():
                raise
            return use(self.keys.records_keks)

    def wrapping_kek(self) -> bytes:
        """The records key to wrap a new data key with, taking a rotated one from disk."""
        try:
            return self.keys.wrapping_kek()
        except RecordsKeyRotated:
            self.reload_secret_keys()
            return self.keys.wrapping_kek()

    async def aclose(self) -> None:
        """Close the records client and every database pool."""
        await self.http.aclose()
        await self.engine.dispose()
        if self.autocommit_engine is not self.engine:
            await self.autocommit_engine.dispose()


def load_keys(settings: Settings) -> BrokerKeys:
    if settings.environment == "dev":
        return BrokerKeys.load_or_generate(settings.key_dir)
    return BrokerKeys.load(settings.key_dir)


def build_runtime(settings: Settings) -> Runtime:
    """Load keys and catalog first: a bad file stops the start before anything serves."""
    keys = load_keys(settings)
    catalog = load_catalog(settings.schema_dir, settings.policy_file)
    pools: dict[str, Any] = {}
    if not settings.is_sqlite:
        pools = {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
    engine = make_engine(settings.database_url, **pools)
    sessionmaker = make_sessionmaker(engine)
    autocommit_engine, autocommit_sessionmaker = engine, sessionmaker
    driver_gate = None
    if engine.dialect.name == "postgresql":
        autocommit_engine = make_engine(settings.database_url, autocommit=True, **pools)
        autocommit_sessionmaker = make_sessionmaker(autocommit_engine)
        driver_gate = asyncio.Semaphore(settings.db_pool_size + settings.db_max_overflow)
    http = AgencyClient(
        max_connections=settings.records_max_connections,
        read_timeout=settings.records_read_timeout,
        connect_timeout=settings.records_connect_timeout,
    )
    rt = Runtime(
        settings=settings,
        keys=keys,
        catalog=catalog,
        engine=engine,
        sessionmaker=sessionmaker,
        autocommit_engine=autocommit_engine,
        autocommit_sessionmaker=autocommit_sessionmaker,
        driver_gate=driver_gate,
        token_verifier=AccessTokenVerifier(
            keys.token_signing, settings.issuer, retired=keys.retired_token
        ),
        http=http,
        limiter=RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
    )
    rt.token_verifier.on_unknown_kid = rt.reload_for_unknown_kid
    return rt


async def get_runtime(request: Request) -> Runtime:
    # async: a plain ``def`` dependency costs a thread-pool hop on every request
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
