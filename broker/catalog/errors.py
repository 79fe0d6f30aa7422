"""Errors raised by the catalog: one for bad configuration, one for bad records."""

from __future__ import annotations

from collections.abc import Mapping


class CatalogError(Exception):
    """A schema or policy file the broker must not start with.

    The message always starts with the file and then says what is wrong, so an operator can fix
    the file without reading code, e.g.
    ``policies/minimisation.yaml: rules.shelter.safety_planning: unknown field 'bedstatus'``.
    """


class RecordInvalid(ValueError):
    """A holding agency sent a record that does not fit its category's schema.

    Only field names (which come from our own schema, never from the record) and problem kinds
    (JSON Schema keywords such as ``type`` or ``format``) go into the message: the values are a
    survivor's personal data and must never reach logs or error responses.
    """

    def __init__(self, problems: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.problems: Mapping[str, tuple[str, ...]] = dict(problems or {})
        if self.problems:
            parts = [f"{name} ({', '.join(kinds)})" for name, kinds in self.problems.items()]
            message = "record rejected: invalid fields: " + "; ".join(parts)
        else:
            message = "record rejected: not a JSON object"
        super().__init__(message)

    @property
    def fields(self) -> frozenset[str]:
        """Names of the fields that failed validation (empty when the record was not an object)."""
        return frozenset(self.problems)
