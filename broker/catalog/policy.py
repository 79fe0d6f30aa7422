"""The data-minimisation policy: which fields may leave an agency for which purpose."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from broker.catalog._files import NAME_RE, decode_utf8, kind_of, read_bounded
from broker.catalog.errors import CatalogError

POLICY_FORMAT = 1
_TOP_LEVEL_KEYS = ("format", "purposes", "never_disclosable", "rules")
_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Policy:
    """A loaded policy, precompiled to frozensets so lookups cost one dict access.

    ``version`` is ``sha256:<hex>`` of the file's exact bytes, so every consent grant and
    disclosure can record precisely which policy text was in force.
    """

    version: str
    purposes: frozenset[str]
    descriptions: Mapping[str, str] = field(default_factory=dict, repr=False)
    rules: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict, repr=False)
    withheld: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False)

    def permitted_fields(self, category: str, purpose: str) -> frozenset[str]:
        """Fields that may go out for this purpose; empty (nothing) when there is no rule."""
        return self.rules.get((category, purpose), _EMPTY)

    def never_disclosable(self, category: str) -> frozenset[str]:
        """Fields released only when a grant names them explicitly, whatever the rules say."""
        return self.withheld.get(category, _EMPTY)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML keeps the last one silently, so a second
    ``shelter:`` block would quietly replace the first one's rules."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let PyYAML report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path, data: bytes) -> object:
    text = decode_utf8(path, data)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CatalogError(f"{path}: invalid YAML{where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: invalid YAML: {exc}") from None


def load_policy(path: Path, fields_by_category: Mapping[str, frozenset[str]]) -> Policy:
    """Load and check the policy against the categories' fields; refuse anything ambiguous."""
    data = read_bounded(path)
    document = _parse_yaml(path, data)
    checker = _PolicyChecker(str(path), fields_by_category)
    return checker.check(document, version="sha256:" + hashlib.sha256(data).hexdigest())


class _PolicyChecker:
    """Walks the parsed policy; every error names the file and the dotted path."""

    def __init__(self, source: str, fields_by_category: Mapping[str, frozenset[str]]) -> None:
        self.source = source
        self.fields = fields_by_category

    def fail(self, where: str, problem: str) -> CatalogError:
        return CatalogError(
            f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}"
        )

    def mapping(self, value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {kind_of(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"key {key!r} must be a string, got {kind_of(key)}")
        return value

    def check(self, document: object, version: str) -> Policy:
        if document is None:
            raise self.fail("", "file is empty")
        top = self.mapping(document, "<top level>")
        for key in top:
            if key not in _TOP_LEVEL_KEYS:
                raise self.fail(key, "unknown top-level key")
        for key in _TOP_LEVEL_KEYS:
            if key not in top:
                raise self.fail(key, "missing")
        fmt = top["format"]
        if type(fmt) is not int or fmt != POLICY_FORMAT:
            raise self.fail("format", f"unsupported format {fmt!r} (expected {POLICY_FORMAT})")
        descriptions = self.purposes(top["purposes"])
        withheld = self.never_disclosable(top["never_disclosable"])
        rules = self.rules(top["rules"], frozenset(descriptions))
        return Policy(
            version=version,
            purposes=frozenset(descriptions),
            descriptions=MappingProxyType(descriptions),
            rules=MappingProxyType(rules),
            withheld=MappingProxyType(withheld),
        )

    def name(self, key: str, where: str, what: str) -> None:
        if _is_wildcard(key):
            raise self.fail(where, f"wildcard {key!r} is not allowed; name each {what}")
        if NAME_RE.fullmatch(key) is None:
            raise self.fail(where, f"{what} {key!r} must be snake_case ([a-z][a-z0-9_]*)")

    def purposes(self, value: object) -> dict[str, str]:
        purposes = self.mapping(value, "purposes")
        if not purposes:
            raise self.fail("purposes", "must list at least one purpose")
        for code, description in purposes.items():
            self.name(code, "purposes", "purpose")
            if not isinstance(description, str) or not description.strip():
                raise self.fail(f"purposes.{code}", "needs a one-line description")
        return dict(purposes)

    def never_disclosable(self, value: object) -> dict[str, frozenset[str]]:
        section = self.mapping(value, "never_disclosable")
        out: dict[str, frozenset[str]] = {}
        for category, names in section.items():
            self.category(category, "never_disclosable")
            out[category] = self.field_list(names, category, f"never_disclosable.{category}")
        # Listing every category, even as [], makes adding a category a deliberate decision here.
        for category in sorted(self.fields):
            if category not in out:
                raise self.fail("never_disclosable", f"missing category {category!r} (use [])")
        return out

    def rules(
        self, value: object, purposes: frozenset[str]
    ) -> dict[tuple[str, str], frozenset[str]]:
        section = self.mapping(value, "rules")
        out: dict[tuple[str, str], frozenset[str]] = {}
        for category, by_purpose in section.items():
            self.category(category, "rules")
            for purpose, names in self.mapping(by_purpose, f"rules.{category}").items():
                where = f"rules.{category}"
                if _is_wildcard(purpose):
                    raise self.fail(where, f"wildcard {purpose!r} is not allowed; name purposes")
                if purpose not in purposes:
                    raise self.fail(where, f"unknown purpose {purpose!r}")
                out[category, purpose] = self.field_list(names, category, f"{where}.{purpose}")
        return out

    def category(self, category: str, where: str) -> None:
        if _is_wildcard(category):
            raise self.fail(where, f"wildcard {category!r} is not allowed; name each category")
        if category not in self.fields:
            raise self.fail(where, f"unknown category {category!r}")

    def field_list(self, names: object, category: str, where: str) -> frozenset[str]:
        if not isinstance(names, list):
            raise self.fail(where, f"must be a list of field names, got {kind_of(names)}")
        known = self.fields[category]
        seen: set[str] = set()
        for index, name in enumerate(names):
            if not isinstance(name, str):
                raise self.fail(f"{where}[{index}]", f"must be a field name, got {kind_of(name)}")
            if _is_wildcard(name):
                raise self.fail(where, f"wildcard {name!r} is not allowed; list fields explicitly")
            if name not in known:
                raise self.fail(where, f"unknown field {name!r}")
            if name in seen:
                raise self.fail(where, f"duplicate field {name!r}")
            seen.add(name)
        return frozenset(seen)


def _is_wildcard(name: str) -> bool:
    return "*" in name or name.strip().lower() in {"all", "any", "everything"}
