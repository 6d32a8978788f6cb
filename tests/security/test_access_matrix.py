"""The access matrix (issue 9, Security 1): every URL of the URL conf and every operation of the
OpenAPI schema, requested by every persona, against the rules of tests/security/rules.py.

The URL list is generated (django.urls.get_resolver, /api/schema/), never hand-written: a URL or an
API operation without a rule fails ``test_every_url_has_an_access_rule`` /
``test_every_api_operation_has_an_access_rule`` with "add an access rule for <pattern>".
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve, reverse

from accounts.actions import do_issue_api_key
from accounts.models import ApiKey
from serving.models import AutoScalingRule, Endpoint, EndpointToken
from storage.models import Folder
from tests.security import rules as r
from tests.security.world import World, build_world

pytestmark = pytest.mark.django_db

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
LOGIN_PATH = "/accounts/login/"
ADMIN_LOGIN_PATH = "/admin/login/"


# --- the URL conf, walked ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    key: str  # "namespace:name", or "namespace:route:<route>" for an unnamed pattern
    route: str  # the whole pattern, as written in the URL conf
    name: str | None  # what reverse() takes
    params: tuple[str, ...]  # keyword arguments of the pattern


def _params(pattern: Any) -> tuple[str, ...]:
    converters = getattr(pattern, "converters", None)
    if converters:
        return tuple(converters)
    regex = getattr(pattern, "regex", None)
    return tuple(regex.groupindex) if regex is not None else ()


def walk(
    patterns: list[Any] | None = None, prefix: str = "", namespace: str = "", params: tuple[str, ...] = ()
) -> Iterator[Url]:
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        found = params + _params(pattern.pattern)
        if isinstance(pattern, URLResolver):
            inner = (
                f"{namespace}:{pattern.namespace}"
                if namespace and pattern.namespace
                else (pattern.namespace or namespace)
            )
            yield from walk(pattern.url_patterns, route, inner or "", found)
        elif isinstance(pattern, URLPattern):
            name = f"{namespace}:{pattern.name}" if namespace and pattern.name else pattern.name
            key = name or (f"{namespace}:route:{route}" if namespace else f"route:{route}")
            yield Url(key=key, route=route, name=name, params=found)


URLS = {url.key: url for url in walk()}


def _admin_model(route: str) -> type[Any] | None:
    for model in admin.site._registry:
        if route.startswith(f"admin/{model._meta.app_label}/{model._meta.model_name}/"):
            return model
    return None


def build_path(url: Url, world: World) -> str:
    """A concrete path of ``url`` whose every argument names an object of ``world``."""
    values = world.kwargs()
    kwargs: dict[str, Any] = {}
    model = _admin_model(url.route)
    for param in url.params:
        if param == "object_id" or (param == "id" and model is not None):
            model = model or Endpoint  # admin:view_on_site: content type and object of a service
            kwargs[param] = str(model._default_manager.order_by("pk").values_list("pk", flat=True).first())
        elif param == "app_label":
            kwargs[param] = "serving"
        elif param == "content_type_id":
            kwargs[param] = ContentType.objects.get_for_model(Endpoint).pk
        elif param == "url":
            kwargs[param] = "no-such-page/"
        else:
            kwargs[param] = values[param]
    if url.name:
        return reverse(url.name, kwargs=kwargs)
    path = "/" + url.route
    for key, value in kwargs.items():
        path = re.sub(rf"<(\w+:)?{key}>|\(\?P<{key}>[^)]*\)", str(value), path)
    return path.replace("^", "").replace("$", "")


# --- requests and verdicts ------------------------------------------------------------------------


def client_for(persona: str, personas: dict[str, Any], csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    if persona != "anonymous":
        client.force_login(personas[persona])
    return client


def send(client: Client, rule: r.Rule, method: str, path: str, world: World) -> Any:
    query = world.format(rule.query)
    data = {k: world.format(v) if isinstance(v, str) else v for k, v in rule.data.items()}
    url = path + query
    if rule.kind == r.METRICS:  # from another host than the web app's (loopback is let in)
        client.defaults["REMOTE_ADDR"] = "192.0.2.1"
    if method == "GET":
        return client.get(url, HTTP_ACCEPT="text/html,application/json")
    if method == "PUT":
        return client.put(url, b"uploaded by the matrix\n", content_type="application/octet-stream")
    if rule.kind in (r.API,) or method in ("PATCH", "DELETE"):
        return client.generic(method, url, json.dumps(data), content_type="application/json")
    return client.post(url, data)


def body_of(response: Any) -> bytes:
    if getattr(response, "streaming", False):
        if getattr(response, "is_async", False):
            response.close()
            return b""
        return b"".join(response.streaming_content)
    return bytes(response.content)


def _location(response: Any) -> str:
    return str(response.get("Location", ""))


def expected_for(rule: r.Rule, method: str, persona: str) -> str:
    if persona == "anonymous":
        return {r.PAGE: "login", r.API: "401", r.ADMIN: r.ADMIN_LOGIN, r.PUBLIC: r.OK, r.METRICS: "403"}[rule.kind]
    return rule.methods[method][persona]


def verdict(rule: r.Rule, expected: str, response: Any) -> str | None:
    """None when ``response`` is what ``expected`` says, else what is wrong."""
    status = response.status_code
    location = _location(response)
    if expected == r.OK:
        if status in rule.also_ok:
            return None
        if status >= 500 or status in (401, 403, 404, 405):
            return f"expected to be served, got {status}"
        if 300 <= status < 400 and rule.kind != r.PUBLIC and (LOGIN_PATH in location or ADMIN_LOGIN_PATH in location):
            return f"expected to be served, was sent to log in ({location})"
        return None
    if expected == "login":
        return (
            None
            if status == 302 and location.startswith(LOGIN_PATH)
            else f"expected a redirect to {LOGIN_PATH}, got {status} {location}"
        )
    if expected == r.ADMIN_LOGIN:
        return (
            None
            if status == 302 and location.startswith(ADMIN_LOGIN_PATH)
            else f"expected the admin's login, got {status} {location}"
        )
    return None if str(status) == expected else f"expected {expected}, got {status}"


def fingerprint(world: World) -> tuple[Any, ...]:
    """What a refused request must not change: the world's rows and files."""
    service = (
        Endpoint.objects.filter(pk=world.service.pk)
        .values_list("name", "lifecycle", "desired_replicas", "spec_version")
        .first()
    )
    folder = Folder.objects.filter(pk=world.folder.pk).values_list("name", "usage_mode").first()
    token = EndpointToken.objects.filter(pk=world.token.pk).values_list("revoked_at", flat=True).first()
    rule = AutoScalingRule.objects.filter(pk=world.rule.pk).values_list("metric", "enabled", "threshold").first()
    tokens = EndpointToken.objects.filter(endpoint=world.service).count()
    from pathlib import Path

    files = sorted(str(p.relative_to(world.folder.host_path)) for p in Path(world.folder.host_path).rglob("*"))
    return (
        service,
        folder,
        token,
        rule,
        tokens,
        files,
        ApiKey.objects.filter(pk=world.api_key.pk, revoked_at__isnull=True).exists(),
    )


def run_case(
    url: Url,
    rule: r.Rule,
    method: str,
    persona: str,
    personas: dict[str, Any],
    *,
    csrf: bool = False,
    key: bool = False,
) -> list[str]:
    """One request in a world of its own (rolled back after): the problems found. ``key``: sent with
    an API key of the persona (``Authorization: Token``) and no session, CSRF checks on."""
    problems: list[str] = []
    with transaction.atomic():
        world = build_world(personas["owner"], personas["project"])
        path = build_path(url, world)
        before = fingerprint(world)
        if key:
            client = Client(enforce_csrf_checks=True)
            if persona != "anonymous":
                client.defaults["HTTP_AUTHORIZATION"] = "Token " + do_issue_api_key(personas[persona])[1]
        else:
            client = client_for(persona, personas, csrf=csrf)
        response = send(client, rule, method, path, world)
        where = f"{method} {path} ({url.key}) as {persona}"
        if csrf:
            if response.status_code != 403:
                problems.append(f"{where} without a CSRF token: expected 403, got {response.status_code}")
            expected = "403"
        else:
            expected = expected_for(rule, method, persona)
            problem = verdict(rule, expected, response)
            if problem:
                problems.append(f"{where}: {problem}")
        refused = expected != r.OK
        if refused or persona in ("stranger", "anonymous"):
            leaked = world.leaked(body_of(response), asked=path + world.format(rule.query))
            if leaked:
                problems.append(f"{where}: the answer holds another user's data: {leaked}")
        else:
            body_of(response)
        if refused and method in UNSAFE and fingerprint(world) != before:
            problems.append(f"{where}: refused, yet it changed the world")
        transaction.set_rollback(True)
    return problems


# --- coverage: the rules against the URL conf and the schema --------------------------------------------


def test_every_url_has_an_access_rule() -> None:
    missing = [
        f"add an access rule for {url.route!r} (name {url.key!r}) in tests/security/rules.py"
        for url in URLS.values()
        if r.rule_for(url.key) is None
    ]
    assert not missing, "\n".join(missing)
    stale = sorted(set(r.RULES) - set(URLS))
    assert not stale, f"rules for URLs that no longer exist (remove them from tests/security/rules.py): {stale}"


def test_every_websocket_route_has_an_access_rule() -> None:
    from serving.web.consumers import websocket_urlpatterns

    routes = {str(p.pattern) for p in websocket_urlpatterns}
    missing = [
        f"add an access rule for websocket {route!r} in WS_RULES (tests/security/rules.py)"
        for route in sorted(routes - set(r.WS_RULES))
    ]
    assert not missing, "\n".join(missing)
    assert not set(r.WS_RULES) - routes, "websocket rules for routes that no longer exist"


def _sample(parameter: dict[str, Any]) -> str:
    schema = parameter.get("schema", {})
    if schema.get("format") == "uuid" or "0-9a-fA-F" in schema.get("pattern", "") or parameter["name"] == "id":
        return str(uuid.uuid4())
    if schema.get("type") == "integer":
        return "1"
    if parameter["name"] == "schema":  # /api/v1/schemas/<schema>: a definition file's JSON Schema
        return "model-definition.json"
    return "some/file.txt"


def test_every_api_operation_has_an_access_rule(personas: dict[str, Any]) -> None:
    response = client_for("owner", personas).get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    problems = []
    seen: dict[str, set[str]] = {}
    for template, operations in schema["paths"].items():
        path = template
        for parameter in [p for op in operations.values() if isinstance(op, dict) for p in op.get("parameters", [])]:
            if parameter.get("in") == "path":
                path = path.replace("{" + parameter["name"] + "}", _sample(parameter))
        match = resolve(path)
        key = match.view_name
        rule = r.rule_for(key)
        methods = {m.upper() for m in operations if m.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE"}}
        seen.setdefault(key, set()).update(methods)
        if rule is None:
            problems.append(f"add an access rule for {template!r} (name {key!r}) in tests/security/rules.py")
            continue
        for method in sorted(methods - set(rule.methods)):
            problems.append(f"add an access rule for {method} {template!r} (name {key!r}) in tests/security/rules.py")
    for key, rule in r.RULES.items():
        url = URLS.get(key)
        if url is None or not url.route.startswith("api/v1/") or rule.kind != r.API:
            continue
        if key not in seen:
            problems.append(f"{url.route!r} ({key}) is not in the OpenAPI schema")
        else:
            for method in sorted(set(rule.methods) - seen[key] - {"HEAD", "OPTIONS"}):
                problems.append(f"the rule of {key} has {method}, which the schema does not list")
    assert not problems, "\n".join(problems)


# --- the matrix itself ----------------------------------------------------------------------------------


def _cases() -> list[Any]:
    cases = []
    for key in URLS:
        rule = r.rule_for(key)
        if rule is None or rule.kind == r.ADMIN:
            continue  # missing: reported by the coverage test; the admin: below, all in one world
        cases.append(pytest.param(key, id=key))
    return cases


@pytest.mark.parametrize("key", _cases())
def test_access(key: str, personas: dict[str, Any], stranger_world: World) -> None:
    url = URLS[key]
    rule = r.rule_for(key)
    assert rule is not None
    problems: list[str] = []
    for method in rule.methods:
        for persona in r.PERSONAS:
            problems += run_case(url, rule, method, persona, personas)
    assert not problems, "\n".join(problems)


def test_admin_is_for_operators_only(personas: dict[str, Any], stranger_world: World) -> None:
    """Every page of the Django admin, for every persona: only operators get in; nothing leaks."""
    world = build_world(personas["owner"], personas["project"])
    clients = {persona: client_for(persona, personas) for persona in r.PERSONAS}
    problems: list[str] = []
    count = 0
    for key, url in URLS.items():
        rule = r.rule_for(key)
        if rule is None or not key.startswith("admin:"):
            continue
        path = build_path(url, world)
        for method in rule.methods:
            for persona in r.PERSONAS:
                if method != "GET":
                    continue  # logout: a POST that ends the session; checked in test_access style below
                response = send(clients[persona], rule, method, path, world)
                count += 1
                expected = expected_for(rule, method, persona)
                if persona == "admin" and expected == r.OK:
                    # Inside, the admin may still say no (models without "add" or "delete", the
                    # catch-all's 404, view_on_site without an absolute URL): only a crash or being
                    # sent to log in is wrong for an operator.
                    status = response.status_code
                    if status >= 500 or ADMIN_LOGIN_PATH in _location(response):
                        problems.append(f"GET {path} ({key}) as admin: got {status} {_location(response)}")
                    continue
                problem = verdict(rule, expected, response)
                if problem:
                    problems.append(f"GET {path} ({key}) as {persona}: {problem}")
                if expected != r.OK:
                    leaked = world.leaked(body_of(response), asked=path)
                    if leaked:
                        problems.append(f"GET {path} as {persona} leaks {leaked}")
    assert count > 50
    assert not problems, "\n".join(problems)


# --- listings: a stranger's view does not depend on other users' rows -----------------------------------

_VOLATILE = re.compile(rb'(csrfmiddlewaretoken" value="|csrf-token" content="|"csrfToken": ")[^"]*')


@pytest.mark.parametrize("key", [k for k, rule in r.RULES.items() if rule.collection])
def test_listings_do_not_depend_on_other_users(key: str, personas: dict[str, Any], stranger_world: World) -> None:
    """The stranger's answer with the owner's world present equals the answer without it: no row,
    count or total of someone else's slips into a list."""
    url = URLS[key]
    rule = r.RULES[key]
    client = client_for("stranger", personas)

    def listing() -> bytes:
        response = client.get(
            "/" + url.route.replace("^", "").replace("$", ""), HTTP_ACCEPT="text/html,application/json"
        )
        assert response.status_code == 200, response.status_code
        return _VOLATILE.sub(rb"\1", body_of(response))

    before = listing()
    world = build_world(personas["owner"], personas["project"])
    build_world(personas["teammate"], personas["project"])
    after = listing()
    assert not world.leaked(after), key
    assert before == after, f"{key}: the stranger's listing changed when other users added rows"
    assert rule.methods["GET"]["stranger"] == r.OK


# --- CSRF: every unsafe request made with a session needs the token -------------------------------------


def _unsafe_cases() -> list[Any]:
    cases = []
    for key in URLS:
        rule = r.rule_for(key)
        if rule is None or rule.kind not in (r.PAGE, r.API):
            continue
        for method, access in rule.methods.items():
            if method in UNSAFE and access.get("owner") == r.OK:
                cases.append(pytest.param(key, method, id=f"{method} {key}"))
    return cases


@pytest.mark.parametrize(("key", "method"), _unsafe_cases())
def test_session_requests_that_change_things_need_the_csrf_token(
    key: str, method: str, personas: dict[str, Any]
) -> None:
    url = URLS[key]
    rule = r.rule_for(key)
    assert rule is not None
    problems = run_case(url, rule, method, "owner", personas, csrf=True)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "key", [k for k, rule in r.RULES.items() if rule.kind == r.API and URLS[k].route.startswith("api/v1/")]
)
def test_access_with_api_keys(key: str, personas: dict[str, Any], stranger_world: World) -> None:
    """The REST API again, authenticated by each persona's API key (no session, so no CSRF token)."""
    url = URLS[key]
    rule = r.RULES[key]
    problems: list[str] = []
    for method in rule.methods:
        for persona in r.PERSONAS:
            problems += run_case(url, rule, method, persona, personas, key=True)
    assert not problems, "\n".join(problems)
