"""The definition files' JSON Schemas (issue 18): generated from the parser's field tables, kept in
the repository, and in step with what the parser accepts."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serving.core import definitions, schemas
from serving.core.definitions import model
from serving.management.commands.write_definition_schemas import render

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = sorted([*ROOT.glob("examples/*/model-definition.yaml"), *ROOT.glob("tests/compat/files/*/*.yaml")])
SERVICE_FILES = sorted(ROOT.glob("examples/*/service-definition.toml"))


def validator(name: str) -> Any:
    schema = schemas.SCHEMAS[name]()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_repository_holds_the_generated_schemas() -> None:
    for name, make in schemas.SCHEMAS.items():
        kept = ROOT / "docs" / "schemas" / name
        assert kept.read_text() == render(make()), f"{kept} is stale: run python manage.py write_definition_schemas"


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_model_definition_we_ship_or_test_against_passes_the_schema(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    errors = [e.message for e in validator(schemas.MODEL_DEFINITION_ID).iter_errors(data)]
    # A key the parser only warns about (a Backend.AI extension we ignore) is what an editor marks.
    parsed = definitions.parse_model_definition(path.read_bytes(), str(path.name))
    assert len(errors) == 0 or parsed.warnings, errors


@pytest.mark.parametrize("path", SERVICE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_service_definition_we_ship_passes_the_schema(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    assert [e.message for e in validator(schemas.SERVICE_DEFINITION_ID).iter_errors(data)] == []
    definitions.parse_service_definition(path.read_bytes())


def test_the_examples_exist() -> None:
    assert len(MODEL_FILES) >= 3 and len(SERVICE_FILES) >= 1


def test_every_key_the_parser_reads_has_a_type() -> None:
    properties = json.dumps(schemas.model_definition_schema())
    for key in (*model.MODEL_KEYS, *model.SERVICE_KEYS, *model.HEALTH_KEYS, *model.METADATA_STRINGS):
        assert f'"{key}"' in properties and f'"{key.replace("_", "-")}"' in properties, key
    for required, optional in model.ACTION_ARGS.values():
        for key in (*required, *optional):
            assert f'"{key}"' in properties, key


def test_a_key_added_to_the_parser_without_a_type_fails_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "HEALTH_KEYS", (*model.HEALTH_KEYS, "grace_period"))
    with pytest.raises(KeyError, match="grace_period"):
        schemas.model_definition_schema()


SIMPLE = {"models": [{"name": "m", "model_path": "/models", "service": {"start_command": "serve", "port": 8000}}]}


def with_service(**fields: Any) -> dict[str, Any]:
    return {"models": [{**SIMPLE["models"][0], "service": {**SIMPLE["models"][0]["service"], **fields}}]}


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (with_service(port="eighty"), "is not of type 'integer'"),
        (with_service(port=70000), "is greater than the maximum"),
        (with_service(health_check={"path": "/health", "inital_delay": 5}), "'inital_delay' was unexpected"),
        (with_service(health_check={"interval": 5}), "'path' is a required property"),
        (with_service(pre_start_actions=[{"action": "write_file", "args": {"body": "x"}}]), "is not valid"),
        (with_service(pre_start_actions=[{"action": "format_disk", "args": {}}]), "is not valid"),
        ({"models": []}, "should be non-empty"),
    ],
)
def test_the_schema_refuses_what_the_parser_refuses_or_warns_about(document: dict[str, Any], problem: str) -> None:
    errors = " | ".join(e.message for e in validator(schemas.MODEL_DEFINITION_ID).iter_errors(document))
    assert problem in errors
    try:
        parsed = definitions.parse_model_definition(yaml.safe_dump(document))
    except definitions.DefinitionError:
        return
    assert parsed.warnings  # not refused by the parser: then it warned


def test_both_spellings_and_a_ref_pass() -> None:
    document = with_service(
        health_check={"path": "/health", "initial-delay": 5, "max_retries": 2},
        pre_start_actions=[
            {"action": "run_command", "args": {"command": ["date"], "check": True}, "ref": "when"},
            {"action": "log", "args": {"message": "started at {when}"}},
        ],
    )
    assert list(validator(schemas.MODEL_DEFINITION_ID).iter_errors(document)) == []
    assert definitions.parse_model_definition(yaml.safe_dump(document)).models[0].name == "m"
