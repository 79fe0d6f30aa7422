"""ORM tables. Import this package to register every table on ``Base.metadata``."""

from broker.models.agency import Agency, Client, UsedAssertion
from broker.models.base import Base
from broker.models.consent import ConsentGrant, ConsentVersion
from broker.models.disclosure import Disclosure, DisclosureHold, WebhookDelivery
from broker.models.ledger import (
    APPEND_ONLY_TABLES,
    LedgerCheckpoint,
    LedgerEntry,
    LedgerKeyRotation,
    LedgerNode,
    LedgerPending,
)
from broker.models.subject import HeldRecord, Subject, SubjectReference

__all__ = [
    "APPEND_ONLY_TABLES",
    "Agency",
    "Base",
    "Client",
    "ConsentGrant",
    "ConsentVersion",
    "Disclosure",
    "DisclosureHold",
    "HeldRecord",
    "LedgerCheckpoint",
    "LedgerEntry",
    "LedgerKeyRotation",
    "LedgerNode",
    "LedgerPending",
    "Subject",
    "SubjectReference",
    "UsedAssertion",
    "WebhookDelivery",
]
