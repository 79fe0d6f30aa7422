"""The shipped catalog says what the stories need, and the loader refuses every doubtful file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.catalog import (
    Catalog,
    CatalogError,
    CategorySchema,
    Policy,
    RecordInvalid,
    load_catalog,
)

ROOT = Path(__file__).parents[2]
SCHEMA_DIR = ROOT / "schemas"
POLICY_FILE = ROOT / "policies" / "minimisation.yaml"

STORY_FIELDS = {
    "shelter": {
        "intake_date",
        "bed_status",
        "shelter_location",
        "exit_date",
        "program_type",
        "children_in_residence",
        "pets_accommodated",
        "safety_plan_on_file",
        "advocate_assigned",
        "next_check_in",
        "accessibility_needs",
        "language_preference",
        "confidential_contact_number",
        "lethality_screen_level",
    },
    "legal_aid": {
        "case_type",
        "protective_order_status",
        "hearing_date",
        "court_jurisdiction",
        "attorney_assigned",
        "petition_filed_date",
        "acp_participant",
        "acp_substitute_address",
        "actual_residential_address",
        "immigration_relief_sought",
        "custody_matter",
        "next_court_action",
    },
    "medical": {
        "visit_date",
        "injury_documentation",
        "forensic_exam_done",
        "clinical_notes",
        "diagnosis_codes",
        "photographs_taken",
        "strangulation_assessment",
        "follow_up_date",
        "treating_facility",
        "medications_prescribed",
        "pregnancy_status",
        "mental_health_referral",
    },
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(SCHEMA_DIR, POLICY_FILE)


@pytest.fixture(scope="module")
def shelter(catalog: Catalog) -> CategorySchema:
    return catalog.schemas["shelter"]


# --- the shipped files -----------------------------------------------------------------------


def test_categories(catalog: Catalog) -> None:
    assert catalog.categories == {"shelter", "legal_aid", "medical"}
    assert set(catalog.schemas) == catalog.categories
    assert all(s.name == name for name, s in catalog.schemas.items())


@pytest.mark.parametrize("category", sorted(STORY_FIELDS))
def test_story_fields_exist(catalog: Catalog, category: str) -> None:
    schema = catalog.schemas[category]
    assert STORY_FIELDS[category] <= schema.fields
    assert 12 <= len(schema.fields) <= 18
    assert set(schema.sensitivity) == schema.fields


@pytest.mark.parametrize(
    ("category", "name", "sensitivity"),
    [
        ("shelter", "shelter_location", "location"),
        ("shelter", "confidential_contact_number", "contact"),
        ("legal_aid", "actual_residential_address", "location"),
        ("legal_aid", "acp_substitute_address", "contact"),
        ("medical", "clinical_notes", "clinical"),
        ("medical", "diagnosis_codes", "clinical"),
        ("medical", "medications_prescribed", "clinical"),
        ("medical", "pregnancy_status", "clinical"),
    ],
)
def test_sensitivities(catalog: Catalog, category: str, name: str, sensitivity: str) -> None:
    assert catalog.schemas[category].sensitivity[name] == sensitivity


@pytest.mark.parametrize("category", sorted(STORY_FIELDS))
def test_schema_file_shape(category: str) -> None:
    doc = json.loads((SCHEMA_DIR / f"{category}.schema.json").read_text())
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["type"] == "object"
    assert doc["additionalProperties"] is True
    assert "required" not in doc
    for name, prop in doc["properties"].items():
        assert prop["description"], name
        if prop["type"] == "string" and "enum" not in prop:
            assert isinstance(prop["maxLength"], int), name
        if prop["type"] == "array":
            assert prop["items"]["type"] == "string", name


def test_story_field_types() -> None:
    def props(category: str) -> dict[str, Any]:
        doc = json.loads((SCHEMA_DIR / f"{category}.schema.json").read_text())
        return dict(doc["properties"])

    shelter, legal, medical = props("shelter"), props("legal_aid"), props("medical")
    assert shelter["intake_date"]["format"] == "date"
    assert set(shelter["bed_status"]["enum"]) >= {"assigned", "waitlisted", "none"}
    assert shelter["children_in_residence"]["type"] == "integer"
    assert legal["acp_participant"]["type"] == "boolean"
    assert medical["forensic_exam_done"]["type"] == "boolean"
    assert medical["diagnosis_codes"]["type"] == "array"


def test_medical_protective_order_is_minimal(catalog: Catalog) -> None:
    permitted = catalog.policy.permitted_fields("medical", "protective_order")
    assert permitted == {
        "visit_date",
        "injury_documentation",
        "forensic_exam_done",
        "photographs_taken",
        "strangulation_assessment",
    }
    assert "clinical_notes" not in permitted
    assert "diagnosis_codes" not in permitted


def test_never_disclosable(catalog: Catalog) -> None:
    policy = catalog.policy
    assert policy.never_disclosable("shelter") == {"shelter_location"}
    assert policy.never_disclosable("legal_aid") == {"actual_residential_address"}
    assert policy.never_disclosable("medical") == frozenset()
    # Listed in a rule so that an explicit grant can release it, withheld otherwise.
    assert "shelter_location" in policy.permitted_fields("shelter", "safety_planning")


def test_purposes_and_missing_rules(catalog: Catalog) -> None:
    policy = catalog.policy
    assert {
        "safety_planning",
        "protective_order",
        "legal_representation",
        "medical_follow_up",
        "housing_placement",
        "victim_services_coordination",
        "investigation_support",
    } <= policy.purposes
    assert all(policy.descriptions[p] for p in policy.purposes)
    assert policy.permitted_fields("medical", "housing_placement") == frozenset()
    assert policy.permitted_fields("medical", "no_such_purpose") == frozenset()
    assert policy.permitted_fields("no_such_category", "safety_planning") == frozenset()
    assert policy.never_disclosable("no_such_category") == frozenset()
    for category, schema in catalog.schemas.items():
        for purpose in policy.purposes:
            assert policy.permitted_fields(category, purpose) <= schema.fields


def test_version_is_sha256_of_bytes(tmp_path: Path) -> None:
    data = POLICY_FILE.read_bytes()
    policy = load_catalog(SCHEMA_DIR, POLICY_FILE).policy
    assert policy.version == "sha256:" + hashlib.sha256(data).hexdigest()

    changed = tmp_path / "minimisation.yaml"
    changed.write_bytes(data.replace(b"# Data-minimisation", b"# Data minimisation", 1))
    assert changed.read_bytes() != data
    other = load_catalog(SCHEMA_DIR, changed).policy
    assert other.version == "sha256:" + hashlib.sha256(changed.read_bytes()).hexdigest()
    assert other.version != policy.version
    assert other.rules == policy.rules  # same meaning, different text, different version


# --- refusals --------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    schema_dir = tmp_path / "schemas"
    schema_dir.mkdir()
    for src in SCHEMA_DIR.glob("*.schema.json"):
        (schema_dir / src.name).write_bytes(src.read_bytes())
    policy = tmp_path / "minimisation.yaml"
    policy.write_bytes(POLICY_FILE.read_bytes())
    return schema_dir, policy


def refused(schema_dir: Path, policy: Path, file: Path, *fragments: str) -> str:
    with pytest.raises(CatalogError) as info:
        load_catalog(schema_dir, policy)
    message = str(info.value)
    assert message.startswith(f"{file}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def edit_schema(schema_dir: Path, category: str, mutate: Callable[[dict[str, Any]], None]) -> Path:
    path = schema_dir / f"{category}.schema.json"
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return path


def edit_policy(policy: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = yaml.safe_load(policy.read_text())
    mutate(doc)
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_shipped_tree_copy_loads(tree: tuple[Path, Path]) -> None:
    assert load_catalog(*tree).categories == {"shelter", "legal_aid", "medical"}


def test_unreadable_policy(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    missing = policy.with_name("absent.yaml")
    refused(schema_dir, missing, missing, "cannot read file")
    refused(schema_dir, schema_dir, schema_dir, "cannot read file")  # a directory


def test_unreadable_schema_dir(tree: tuple[Path, Path]) -> None:
    _, policy = tree
    missing = policy.parent / "nowhere"
    refused(missing, policy, missing, "cannot read schema directory")


def test_empty_schema_dir(tmp_path: Path) -> None:
    refused(tmp_path, POLICY_FILE, tmp_path, "no <category>.schema.json files")


def test_invalid_json(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    path = schema_dir / "medical.schema.json"
    path.write_text(path.read_text()[:-10])
    refused(schema_dir, policy, path, "invalid JSON")


def test_duplicate_json_key(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    path = schema_dir / "medical.schema.json"
    path.write_text(path.read_text().replace('"type": "object",', '"type": "object", "type": 1,'))
    refused(schema_dir, policy, path, "duplicate key 'type'")


def test_not_utf8(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    policy.write_bytes(policy.read_bytes() + b"# \xff\n")
    refused(schema_dir, policy, policy, "not valid UTF-8")


def test_invalid_yaml(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    policy.write_text("format: 1\npurposes: [unclosed\n")
    refused(schema_dir, policy, policy, "invalid YAML", "line")


def test_empty_policy(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    policy.write_text("")
    refused(schema_dir, policy, policy, "file is empty")


def test_policy_over_one_mib(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    with policy.open("a") as handle:
        handle.write(("# padding" + " " * 90 + "\n") * 11_000)
    refused(schema_dir, policy, policy, "larger than 1 MiB")


def test_yaml_duplicate_keys(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    text = policy.read_text()
    policy.write_text(text + "  shelter:\n    safety_planning: [intake_date]\n")
    refused(schema_dir, policy, policy, "duplicate key 'shelter'")
    policy.write_text(
        text.replace(
            "    protective_order:\n      - intake_date\n",
            "    safety_planning: [intake_date]\n    protective_order:\n      - intake_date\n",
            1,
        )
    )
    refused(schema_dir, policy, policy, "duplicate key 'safety_planning'")


PolicyEdit = Callable[[dict[str, Any]], None]


def _set(*path: str, value: Any) -> PolicyEdit:
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _append(*path: str, value: Any) -> PolicyEdit:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path:
            node = node[key]
        node.append(value)

    return mutate


def _delete(*path: str) -> PolicyEdit:
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


SP = ("rules", "shelter", "safety_planning")

POLICY_REFUSALS: list[tuple[str, PolicyEdit, str]] = [
    ("format-2", _set("format", value=2), "format: unsupported format 2"),
    ("format-str", _set("format", value="1"), "format: unsupported format '1'"),
    ("format-bool", _set("format", value=True), "format: unsupported format True"),
    ("format-missing", _delete("format"), "format: missing"),
    ("top-unknown", _set("extra", value={}), "extra: unknown top-level key"),
    ("rules-missing", _delete("rules"), "rules: missing"),
    ("unknown-category", _set("rules", "housing", value={}), "rules: unknown category 'housing'"),
    (
        "unknown-purpose",
        _set("rules", "shelter", "marketing", value=[]),
        "rules.shelter: unknown purpose 'marketing'",
    ),
    (
        "unknown-field",
        _append(*SP, value="bedstatus"),
        "rules.shelter.safety_planning: unknown field 'bedstatus'",
    ),
    (
        "field-other-category",
        _append(*SP, value="clinical_notes"),
        "rules.shelter.safety_planning: unknown field 'clinical_notes'",
    ),
    ("wildcard-star", _set(*SP, value=["*"]), "rules.shelter.safety_planning: wildcard '*'"),
    ("wildcard-all", _set(*SP, value=["all"]), "rules.shelter.safety_planning: wildcard 'all'"),
    ("wildcard-ALL", _set(*SP, value=["ALL"]), "rules.shelter.safety_planning: wildcard 'ALL'"),
    (
        "wildcard-glob",
        _set(*SP, value=["intake_*"]),
        "rules.shelter.safety_planning: wildcard 'intake_*'",
    ),
    (
        "wildcard-purpose",
        _set("rules", "shelter", "*", value=["intake_date"]),
        "rules.shelter: wildcard '*'",
    ),
    ("wildcard-category", _set("rules", "*", value={}), "rules: wildcard '*'"),
    (
        "wildcard-never",
        _set("never_disclosable", "shelter", value=["*"]),
        "never_disclosable.shelter: wildcard '*'",
    ),
    (
        "duplicate-field",
        _set(*SP, value=["intake_date", "bed_status", "intake_date"]),
        "rules.shelter.safety_planning: duplicate field 'intake_date'",
    ),
    (
        "rule-not-list",
        _set(*SP, value="intake_date"),
        "rules.shelter.safety_planning: must be a list of field names, got string",
    ),
    (
        "rule-null",
        _set(*SP, value=None),
        "rules.shelter.safety_planning: must be a list of field names, got null",
    ),
    (
        "rule-item-not-str",
        _set(*SP, value=["intake_date", 3]),
        "rules.shelter.safety_planning[1]: must be a field name, got integer",
    ),
    (
        "category-not-mapping",
        _set("rules", "shelter", value=["intake_date"]),
        "rules.shelter: must be a mapping, got list",
    ),
    (
        "never-unknown-field",
        _set("never_disclosable", "shelter", value=["shelter_address"]),
        "never_disclosable.shelter: unknown field 'shelter_address'",
    ),
    (
        "never-not-list",
        _set("never_disclosable", "shelter", value="shelter_location"),
        "never_disclosable.shelter: must be a list of field names, got string",
    ),
    (
        "never-unknown-category",
        _set("never_disclosable", "housing", value=[]),
        "never_disclosable: unknown category 'housing'",
    ),
    (
        "never-missing-category",
        _delete("never_disclosable", "medical"),
        "never_disclosable: missing category 'medical'",
    ),
    (
        "purpose-no-description",
        _set("purposes", "safety_planning", value=""),
        "purposes.safety_planning: needs a one-line description",
    ),
    (
        "purpose-bad-name",
        _set("purposes", "Safety Planning", value="x"),
        "purposes: purpose 'Safety Planning' must be snake_case",
    ),
    ("purposes-empty", _set("purposes", value={}), "purposes: must list at least one purpose"),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [(m, f) for _, m, f in POLICY_REFUSALS],
    ids=[i for i, _, _ in POLICY_REFUSALS],
)
def test_policy_refusals(tree: tuple[Path, Path], mutate: PolicyEdit, fragment: str) -> None:
    schema_dir, policy = tree
    edit_policy(policy, mutate)
    refused(schema_dir, policy, policy, fragment)


def test_yaml_non_string_key(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    policy.write_text(policy.read_text().replace("  safety_planning: Build", "  yes: Build", 1))
    refused(schema_dir, policy, policy, "purposes: key True must be a string")


def _prop(category: str, name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        if value is None:
            del doc["properties"][name][key]
        else:
            doc["properties"][name][key] = value

    return mutate


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        if value is None:
            del doc[key]
        else:
            doc[key] = value

    return mutate


SCHEMA_REFUSALS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "metaschema-maxLength",
        _prop("shelter", "shelter_location", "maxLength", -1),
        "properties/shelter_location/maxLength: not a valid draft 2020-12 schema",
    ),
    (
        "metaschema-type",
        _prop("shelter", "bed_status", "type", "strng"),
        "not a valid draft 2020-12 schema",
    ),
    (
        "no-sensitivity",
        _prop("shelter", "bed_status", "x-sensitivity", None),
        "properties.bed_status: missing x-sensitivity",
    ),
    (
        "unknown-sensitivity",
        _prop("shelter", "bed_status", "x-sensitivity", "secret"),
        "properties.bed_status: unknown x-sensitivity 'secret'",
    ),
    (
        "no-description",
        _prop("shelter", "bed_status", "description", None),
        "properties.bed_status: missing description",
    ),
    (
        "no-maxLength",
        _prop("shelter", "shelter_location", "maxLength", None),
        "properties.shelter_location: string field needs maxLength",
    ),
    (
        "unchecked-format",
        _prop("shelter", "advocate_assigned", "format", "email"),
        "properties.advocate_assigned: format 'email' is not checked",
    ),
    (
        "ref",
        _prop("shelter", "advocate_assigned", "$ref", "#/$defs/x"),
        "properties.advocate_assigned: $ref is not supported",
    ),
    ("required", _top("required", ["intake_date"]), "unsupported top-level keyword 'required'"),
    ("closed", _top("additionalProperties", False), "additionalProperties: must be true"),
    ("not-object", _top("type", "array"), "type: must be 'object'"),
    ("no-draft", _top("$schema", None), "$schema: must be"),
    ("old-draft", _top("$schema", "http://json-schema.org/draft-07/schema#"), "$schema: must be"),
    (
        "category-mismatch",
        _top("x-category", "shelters"),
        "x-category: must be 'shelter' to match the file name",
    ),
    ("no-properties", _top("properties", {}), "properties: must be a non-empty object"),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [(m, f) for _, m, f in SCHEMA_REFUSALS],
    ids=[i for i, _, _ in SCHEMA_REFUSALS],
)
def test_schema_refusals(
    tree: tuple[Path, Path], mutate: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    schema_dir, policy = tree
    path = edit_schema(schema_dir, "shelter", mutate)
    refused(schema_dir, policy, path, fragment)


def test_bad_field_name(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree

    def mutate(doc: dict[str, Any]) -> None:
        doc["properties"]["*"] = dict(doc["properties"]["bed_status"])

    path = edit_schema(schema_dir, "shelter", mutate)
    refused(schema_dir, policy, path, "properties.*: field name must be snake_case")


@pytest.mark.parametrize("name", ["Shelter.schema.json", "shelter-v2.schema.json", "shelter.json"])
def test_file_name_pattern(tree: tuple[Path, Path], name: str) -> None:
    schema_dir, policy = tree
    bad = schema_dir / name
    (schema_dir / "shelter.schema.json").rename(bad)
    refused(schema_dir, policy, bad, "file name must be <category>.schema.json")


def test_non_json_files_ignored(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    (schema_dir / "README.md").write_text("notes")
    assert load_catalog(schema_dir, policy).categories == {"shelter", "legal_aid", "medical"}


def test_removed_category_breaks_policy(tree: tuple[Path, Path]) -> None:
    schema_dir, policy = tree
    (schema_dir / "medical.schema.json").unlink()
    refused(schema_dir, policy, policy, "unknown category 'medical'")


# --- clean_record ----------------------------------------------------------------------------

GOOD_SHELTER: dict[str, Any] = {
    "intake_date": "2024-03-01",
    "bed_status": "assigned",
    "children_in_residence": 2,
    "pets_accommodated": False,
    "next_check_in": "2024-03-05T10:00:00+01:00",
    "accessibility_needs": ["step_free_access"],
    "shelter_location": "placeholder",
}


def test_clean_record_keeps_known_fields(shelter: CategorySchema) -> None:
    assert shelter.clean_record(GOOD_SHELTER) == (GOOD_SHELTER, 0)
    assert shelter.clean_record({}) == ({}, 0)


def test_clean_record_drops_and_counts_unknown(shelter: CategorySchema) -> None:
    record = {**GOOD_SHELTER, "favourite_colour": "x", "ssn": "y", "Intake_Date": "2024-01-01"}
    clean, dropped = shelter.clean_record(record)
    assert clean == GOOD_SHELTER
    assert dropped == 3


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [
        ("children_in_residence", "two", "type"),
        ("children_in_residence", True, "type"),
        ("children_in_residence", -1, "minimum"),
        ("pets_accommodated", "yes", "type"),
        ("bed_status", "evicted", "enum"),
        ("intake_date", "2024-02-30", "format"),
        ("intake_date", "2024-3-1", "format"),
        ("intake_date", "01/03/2024", "format"),
        ("intake_date", "２０２４-03-01", "format"),
        ("intake_date", 20240301, "type"),
        ("next_check_in", "2024-03-05T10:00:00", "format"),
        ("next_check_in", "2024-03-05T24:00:00Z", "format"),
        ("next_check_in", "2024-03-05", "format"),
        ("shelter_location", "x" * 201, "maxLength"),
        ("accessibility_needs", "step_free_access", "type"),
        ("accessibility_needs", ["x" * 101], "maxLength"),
        ("accessibility_needs", [1], "type"),
        ("accessibility_needs", [f"need_{i}" for i in range(11)], "maxItems"),
        ("accessibility_needs", ["a", "a"], "uniqueItems"),
    ],
)
def test_clean_record_rejects(shelter: CategorySchema, name: str, value: Any, kind: str) -> None:
    with pytest.raises(RecordInvalid) as info:
        shelter.clean_record({**GOOD_SHELTER, name: value})
    assert info.value.fields == {name}
    assert kind in info.value.problems[name]
    assert str(info.value) == f"record rejected: invalid fields: {name} ({kind})"
    assert info.value.__context__ is None and info.value.__cause__ is None


@pytest.mark.parametrize("value", ["2024-03-05T10:00:00Z", "2024-03-05t10:00:00.123456-05:30"])
def test_clean_record_accepts_date_times(shelter: CategorySchema, value: str) -> None:
    assert shelter.clean_record({"next_check_in": value}) == ({"next_check_in": value}, 0)


@pytest.mark.parametrize("record", [[], "text", None, 5, [("intake_date", "2024-01-01")]])
def test_clean_record_rejects_non_objects(shelter: CategorySchema, record: object) -> None:
    with pytest.raises(RecordInvalid, match="not a JSON object"):
        shelter.clean_record(record)


def test_clean_record_rejects_non_string_keys(shelter: CategorySchema) -> None:
    with pytest.raises(RecordInvalid, match="not a JSON object"):
        shelter.clean_record({1: "x"})


def test_clean_record_reports_all_bad_fields_not_unknown_names(shelter: CategorySchema) -> None:
    record = {"intake_date": "yesterday", "bed_status": 3, "Placeholder Person": "x" * 300}
    with pytest.raises(RecordInvalid) as info:
        shelter.clean_record(record)
    message = str(info.value)
    assert info.value.fields == {"intake_date", "bed_status"}
    assert "Placeholder Person" not in message and "yesterday" not in message


def _not_a_date(text: str) -> bool:
    try:
        return len(text) != 10 or text[4] != "-" or not text[:4].isascii()
    except IndexError:
        return True


@settings(max_examples=60, deadline=None)
@given(value=st.text(min_size=1, max_size=10).filter(_not_a_date))
def test_values_never_in_message_bad_date(shelter: CategorySchema, value: str) -> None:
    with pytest.raises(RecordInvalid) as info:
        shelter.clean_record({"intake_date": value, "confidential_contact_number": value * 40})
    message = str(info.value)
    # The message is fixed by field names and kinds alone, so no value can be in it.
    assert message == (
        "record rejected: invalid fields: intake_date (format); "
        "confidential_contact_number (maxLength)"
    )
    # (No "value not in message" check: a short value can be part of a field name, as
    # "numb" is of confidential_contact_number; the exact message above already says it.)


@settings(max_examples=60, deadline=None)
@given(
    value=st.text(min_size=1, max_size=60),
    field=st.sampled_from(
        [
            "shelter_location",
            "advocate_assigned",
            "language_preference",
            "confidential_contact_number",
        ]
    ),
)
def test_values_never_in_message_too_long(shelter: CategorySchema, value: str, field: str) -> None:
    long_value = (value * 300)[:300]
    with pytest.raises(RecordInvalid) as info:
        shelter.clean_record({field: long_value, "children_in_residence": value})
    message = str(info.value)
    assert long_value not in message
    assert set(info.value.fields) == {field, "children_in_residence"}
    assert info.value.problems == {field: ("maxLength",), "children_in_residence": ("type",)}


@settings(max_examples=60, deadline=None)
@given(
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=False),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    )
)
def test_wrong_types_report_type(catalog: Catalog, value: object) -> None:
    schema = catalog.schemas["legal_aid"]
    with pytest.raises(RecordInvalid) as info:
        schema.clean_record({"hearing_date": value, "acp_participant": value})
    assert info.value.problems == {"hearing_date": ("type",), "acp_participant": ("type",)}


# --- construction ----------------------------------------------------------------------------


def test_from_schema_in_memory() -> None:
    schema = CategorySchema.from_schema(
        "demo",
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "x-category": "demo",
            "type": "object",
            "additionalProperties": True,
            "properties": {
                "seen_on": {
                    "type": "string",
                    "format": "date",
                    "maxLength": 10,
                    "description": "d",
                    "x-sensitivity": "service",
                },
            },
        },
        source="demo.schema.json",
    )
    assert schema.fields == {"seen_on"}
    assert schema.clean_record({"seen_on": "2024-01-01", "x": 1}) == ({"seen_on": "2024-01-01"}, 1)
    with pytest.raises(CatalogError, match=r"^demo\.schema\.json: "):
        CategorySchema.from_schema("other", {}, source="demo.schema.json")


def test_schema_needs_validators() -> None:
    with pytest.raises(ValueError, match="from_schema"):
        CategorySchema("x", frozenset({"a"}), {"a": "service"})


def test_policy_is_precompiled(catalog: Catalog) -> None:
    policy = catalog.policy
    assert isinstance(policy, Policy)
    permitted = policy.permitted_fields("shelter", "housing_placement")
    assert isinstance(permitted, frozenset)
    assert permitted is policy.permitted_fields("shelter", "housing_placement")
