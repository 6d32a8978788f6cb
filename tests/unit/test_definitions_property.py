"""Any input gives a definition or our DefinitionError: never another exception, never slow."""

from __future__ import annotations

import contextlib
import time

import tomli_w  # type: ignore[import-not-found]
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.definitions import DefinitionError, parse_model_definition, parse_service_definition

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
keys = st.sampled_from(
    [
        "models",
        "name",
        "model_path",
        "service",
        "start_command",
        "port",
        "health_check",
        "path",
        "interval",
        "max_retries",
        "pre_start_actions",
        "action",
        "args",
        "command",
        "body",
        "filename",
        "mode",
        "x",
    ]
)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
toml_values = st.recursive(
    st.one_of(st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(max_size=10)),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
SETTINGS = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def _check(parse, data) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    with contextlib.suppress(DefinitionError):
        parse(data)
    assert time.monotonic() - start < 1.0


@SETTINGS
@given(st.text(max_size=2000))
def test_model_definition_any_text(text: str) -> None:
    _check(parse_model_definition, text)


@SETTINGS
@given(st.binary(max_size=2000))
def test_model_definition_any_bytes(data: bytes) -> None:
    _check(parse_model_definition, data)


@SETTINGS
@given(trees)
def test_model_definition_any_structure(tree: object) -> None:
    _check(parse_model_definition, yaml.safe_dump({"models": [tree]} if not isinstance(tree, dict) else tree))


@SETTINGS
@given(st.text(max_size=2000))
def test_service_definition_any_text(text: str) -> None:
    _check(parse_service_definition, text)


@SETTINGS
@given(st.dictionaries(st.text(min_size=1, max_size=8), toml_values, max_size=4))
def test_service_definition_any_structure(tree: dict[str, object]) -> None:
    _check(parse_service_definition, tomli_w.dumps(tree))
