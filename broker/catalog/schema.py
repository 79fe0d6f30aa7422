"""Data-category schemas: loaded and checked once, then used to clean every incoming record."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

from broker.catalog._files import NAME_RE, decode_utf8, kind_of, read_bounded
from broker.catalog.errors import CatalogError, RecordInvalid

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
SENSITIVITIES = frozenset(
    {"identifier", "location", "contact", "clinical", "legal", "service", "safety"}
)
FILE_RE = re.compile(r"([a-z][a-z0-9_]{0,63})\.schema\.json", re.ASCII)

# Records are cleaned field by field, so keywords that constrain the record as a whole would be
# silently ignored; only these (plus ``x-`` annotations) may appear at the top level.
_TOP_LEVEL_KEYS = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "title",
        "description",
        "type",
        "properties",
        "additionalProperties",
    }
)
_REF_KEYS = frozenset({"$ref", "$dynamicRef", "$recursiveRef"})

# ``[0-9]`` not ``\d``: Python's ``\d`` also matches non-ASCII digits.
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_DATE_TIME_RE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)


def _is_date(value: object) -> bool:
    """RFC 3339 full-date; non-strings pass because ``type`` reports them."""
    if not isinstance(value, str):
        return True
    if _DATE_RE.fullmatch(value) is None:
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_date_time(value: object) -> bool:
    """RFC 3339 date-time with a mandatory offset (leap seconds refused: no record needs one)."""
    if not isinstance(value, str):
        return True
    match = _DATE_TIME_RE.fullmatch(value)
    if match is None or not _is_date(match[1]):
        return False
    hour, minute, second = int(match[2]), int(match[3]), int(match[4])
    if hour > 23 or minute > 59 or second > 59:
        return False
    return match[5] is None or (int(match[5]) <= 23 and int(match[6]) <= 59)


def _format_checker() -> Any:
    """Our own checkers: jsonschema's default ``date-time`` needs an optional package and
    silently accepts anything without it."""
    checker = FormatChecker(formats=())
    checker.checks("date")(_is_date)
    checker.checks("date-time")(_is_date_time)
    return checker


FORMAT_CHECKER = _format_checker()
SUPPORTED_FORMATS = frozenset({"date", "date-time"})


@dataclass(frozen=True)
class CategorySchema:
    """One data category (shelter, legal_aid, medical) with a compiled validator per field.

    Build it with :meth:`from_schema` (or through ``load_catalog``), which checks the schema and
    compiles the validators that :meth:`clean_record` relies on.
    """

    name: str
    fields: frozenset[str]
    sensitivity: Mapping[str, str]
    validators: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _checks: Mapping[str, Callable[[Any], bool]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if set(self.validators) != self.fields or set(self.sensitivity) != self.fields:
            raise ValueError(
                f"category {self.name!r}: fields, sensitivity and validators must name the same "
                "fields; build it with CategorySchema.from_schema"
            )
        # Bound ``is_valid`` methods: the cheapest per-field call on the hot path.
        checks = {name: v.is_valid for name, v in self.validators.items()}
        object.__setattr__(self, "_checks", checks)

    @classmethod
    def from_schema(cls, name: str, schema: object, source: str = "<schema>") -> CategorySchema:
        """Check a parsed schema document and compile it; ``source`` prefixes every error."""
        where = f"{source}: "
        if not isinstance(schema, dict):
            raise CatalogError(f"{where}schema must be a JSON object, got {kind_of(schema)}")
        _check_top_level(where, name, schema)
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            path = "/".join(str(p) for p in exc.absolute_path) or "<root>"
            raise CatalogError(
                f"{where}{path}: not a valid draft 2020-12 schema: {exc.message}"
            ) from None
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise CatalogError(f"{where}properties: must be a non-empty object")
        sensitivity: dict[str, str] = {}
        validators: dict[str, Any] = {}
        for prop, prop_schema in properties.items():
            sensitivity[prop] = _check_property(f"{where}properties.{prop}: ", prop, prop_schema)
            validators[prop] = Draft202012Validator(prop_schema, format_checker=FORMAT_CHECKER)
        return cls(
            name=name,
            fields=frozenset(properties),
            sensitivity=MappingProxyType(sensitivity),
            validators=MappingProxyType(validators),
        )

    def clean_record(self, record: object) -> tuple[dict[str, Any], int]:
        """Validate a record from a holding agency and drop the fields we do not know.

        Unknown fields are dropped (and counted, so the broker can report agencies that send
        more than they should) rather than refused, because agencies' systems add fields over
        time. Known fields must match their property schema. Returns (clean record, dropped).
        """
        if not isinstance(record, dict):
            raise RecordInvalid()
        checks = self._checks
        clean: dict[str, Any] = {}
        dropped = 0
        failed: list[str] | None = None
        for key, value in record.items():
            check = checks.get(key)
            if check is None:
                if not isinstance(key, str):
                    raise RecordInvalid()
                dropped += 1
            elif check(value):
                clean[key] = value
            elif failed is None:
                failed = [key]
            else:
                failed.append(key)
        if failed is not None:
            raise RecordInvalid({name: self._problem_kinds(name, record[name]) for name in failed})
        return clean, dropped

    def _problem_kinds(self, name: str, value: Any) -> tuple[str, ...]:
        """The failing keywords only: jsonschema's own messages quote the value."""
        kinds = {str(error.validator) for error in self.validators[name].iter_errors(value)}
        return tuple(sorted(kinds)) or ("invalid",)


def _check_top_level(where: str, name: str, schema: dict[str, Any]) -> None:
    if schema.get("$schema") != DRAFT_2020_12:
        raise CatalogError(f"{where}$schema: must be {DRAFT_2020_12!r}")
    for key in schema:
        if key not in _TOP_LEVEL_KEYS and not (isinstance(key, str) and key.startswith("x-")):
            raise CatalogError(
                f"{where}unsupported top-level keyword {key!r}: records are validated field by "
                "field and may be partial, so record-level constraints are not allowed"
            )
    if schema.get("x-category") != name:
        raise CatalogError(
            f"{where}x-category: must be {name!r} to match the file name {name}.schema.json"
        )
    if schema.get("type") != "object":
        raise CatalogError(f"{where}type: must be 'object'")
    if schema.get("additionalProperties") is not True:
        raise CatalogError(
            f"{where}additionalProperties: must be true (the broker drops and counts unknown "
            "fields itself)"
        )


def _check_property(where: str, prop: str, prop_schema: object) -> str:
    """Check one property's schema; return its sensitivity."""
    if NAME_RE.fullmatch(prop) is None:
        raise CatalogError(f"{where}field name must be snake_case ([a-z][a-z0-9_]*, max 64)")
    if not isinstance(prop_schema, dict):
        raise CatalogError(f"{where}must be an object schema, got {kind_of(prop_schema)}")
    sensitivity = prop_schema.get("x-sensitivity")
    if sensitivity is None:
        raise CatalogError(f"{where}missing x-sensitivity")
    if sensitivity not in SENSITIVITIES:
        raise CatalogError(
            f"{where}unknown x-sensitivity {sensitivity!r} "
            f"(expected one of {', '.join(sorted(SENSITIVITIES))})"
        )
    description = prop_schema.get("description")
    if not isinstance(description, str) or not description.strip():
        raise CatalogError(f"{where}missing description")
    json_type = prop_schema.get("type")
    if json_type is None:
        raise CatalogError(f"{where}missing type")
    # Unbounded values would let one agency push arbitrarily large data through the hot path.
    if (
        json_type == "string"
        and "maxLength" not in prop_schema
        and not ("enum" in prop_schema or "const" in prop_schema)
    ):
        raise CatalogError(f"{where}string field needs maxLength")
    if json_type == "array" and ("maxItems" not in prop_schema or "items" not in prop_schema):
        raise CatalogError(f"{where}array field needs items and maxItems")
    for key, value in _walk(prop_schema):
        if key in _REF_KEYS:
            raise CatalogError(f"{where}{key} is not supported: fields are validated on their own")
        if key == "format" and isinstance(value, str) and value not in SUPPORTED_FORMATS:
            raise CatalogError(
                f"{where}format {value!r} is not checked by the broker "
                f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})"
            )
    return str(sensitivity)


def _walk(node: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair in a nested JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON with a repeated key is ambiguous (the last one silently wins): refuse it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def load_schema_file(path: Path) -> CategorySchema:
    """Load ``<category>.schema.json``; the category is taken from the file name."""
    match = FILE_RE.fullmatch(path.name)
    if match is None:
        raise CatalogError(
            f"{path}: file name must be <category>.schema.json with a snake_case category"
        )
    text = decode_utf8(path, read_bounded(path))
    try:
        document = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise CatalogError(f"{path}: invalid JSON: {exc}") from None
    return CategorySchema.from_schema(match[1], document, source=str(path))
