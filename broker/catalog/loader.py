"""Load the catalog (category schemas + minimisation policy) once, at start-up.

The broker refuses to start on any doubt about these files: a silently misread policy would
disclose a survivor's data beyond what they consented to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from broker.catalog.errors import CatalogError
from broker.catalog.policy import Policy, load_policy
from broker.catalog.schema import CategorySchema, load_schema_file


@dataclass(frozen=True)
class Catalog:
    """Every category's schema and the policy that was checked against them."""

    schemas: Mapping[str, CategorySchema]
    policy: Policy

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(self.schemas)


def load_catalog(schema_dir: Path, policy_file: Path) -> Catalog:
    """Load every ``<category>.schema.json`` in ``schema_dir`` and the policy; raise
    ``CatalogError`` naming the file and the problem on anything doubtful."""
    schema_dir, policy_file = Path(schema_dir), Path(policy_file)
    try:
        candidates = sorted(p for p in schema_dir.iterdir() if p.name.endswith(".json"))
    except OSError as exc:
        raise CatalogError(
            f"{schema_dir}: cannot read schema directory: {exc.strerror or type(exc).__name__}"
        ) from None
    if not candidates:
        raise CatalogError(f"{schema_dir}: no <category>.schema.json files")
    schemas: dict[str, CategorySchema] = {}
    for path in candidates:
        schema = load_schema_file(path)
        schemas[schema.name] = schema
    policy = load_policy(policy_file, {name: s.fields for name, s in schemas.items()})
    return Catalog(schemas=MappingProxyType(schemas), policy=policy)
