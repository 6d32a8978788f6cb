"""The access matrix's rules: one entry per URL name (``namespace:name``) of the URL conf, one per
websocket route. A URL without an entry fails tests/security/test_access_matrix.py with "add an
access rule for <pattern>": whoever adds a URL decides, here, who may call it.

Each rule names the kind of URL (how an anonymous caller is turned away) and, per HTTP method, what
each persona must get:

* ``OK``: served (any status below 500 but 401, 403, 404 and 405; a page redirect that is not to the
  login page). A 400 counts: authorization passed, the empty body did not.
* ``NOT_FOUND``: 404, exactly what a missing object gives (strangers: never 403, never data).
* ``FORBIDDEN``: 403, for someone who can see the object but not change it (a teammate).
* anonymous: a redirect to the login page (pages), 401 (API), the admin's login (admin), served
  (public URLs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

OK = "ok"
NOT_FOUND = "404"
FORBIDDEN = "403"
ADMIN_LOGIN = "admin-login"
REFUSED = "refused"  # websocket: connect refused (closed before accept)

PERSONAS = ("anonymous", "stranger", "teammate", "owner", "admin")

PAGE = "page"  # HTML (or the page's JSON helpers): anonymous -> redirect to the login page
API = "api"  # JSON: anonymous -> 401
PUBLIC = "public"  # no login needed
ADMIN = "admin"  # the Django admin: staff only, others -> the admin's login page
WS = "ws"
# For Prometheus, not people: a loopback address or the METRICS_TOKEN, whoever is logged in. The
# matrix calls these from a non-loopback address (192.0.2.1) without the token: 403 for everyone.
METRICS = "metrics"

Access = Mapping[str, str]

# Who may read a service or folder of the team project: its owner, the project, operators.
READ: Access = {"owner": OK, "teammate": OK, "admin": OK, "stranger": NOT_FOUND}
# Who may change the service or manage the folder: owner, project managers, operators.
MANAGE: Access = {"owner": OK, "teammate": FORBIDDEN, "admin": OK, "stranger": NOT_FOUND}
# Revoking a token: whoever issued it (here the owner) or who may change the service.
REVOKE: Access = {"owner": OK, "teammate": NOT_FOUND, "admin": OK, "stranger": NOT_FOUND}
# Anyone logged in (collections: each sees only their own rows, checked for leaks).
ANY_USER: Access = {"owner": OK, "teammate": OK, "admin": OK, "stranger": OK}
# Only the object's own user (personal API keys): even operators get 404 through the API.
MINE: Access = {"owner": OK, "teammate": NOT_FOUND, "admin": NOT_FOUND, "stranger": NOT_FOUND}
# Validations are personal: the user who ran it and operators.
VALIDATION: Access = {"owner": OK, "teammate": REFUSED, "admin": OK, "stranger": REFUSED}
# A node's snapshot endpoints: only a node key opens them; no user's session or API key does.
NODES_ONLY: Access = {"owner": "401", "teammate": "401", "admin": "401", "stranger": "401"}
STAFF: Access = {"owner": ADMIN_LOGIN, "teammate": ADMIN_LOGIN, "admin": OK, "stranger": ADMIN_LOGIN}
NOBODY: Access = {"owner": FORBIDDEN, "teammate": FORBIDDEN, "admin": FORBIDDEN, "stranger": FORBIDDEN}
EVERYONE: Access = {"owner": OK, "teammate": OK, "admin": OK, "stranger": OK}


@dataclass(frozen=True)
class Rule:
    kind: str
    methods: Mapping[str, Access]
    query: str = ""  # appended to the URL, formatted with the world (``{folder}``, ``{file}`` …)
    data: Mapping[str, object] = field(default_factory=dict)  # body of unsafe methods (formatted)
    # Statuses that also mean "authorized" (the chat relay answers 502 when no proxy runs here).
    also_ok: frozenset[int] = frozenset()
    # Collections: a stranger's answer must be the same whether or not the owner's rows exist.
    collection: bool = False


RULES: dict[str, Rule] = {
    # --- accounts and site -----------------------------------------------------------------------
    "home": Rule(PAGE, {"GET": ANY_USER}),
    "login": Rule(PUBLIC, {"GET": EVERYONE}),
    "logout": Rule(PUBLIC, {"POST": EVERYONE}),
    "set_language": Rule(PUBLIC, {"POST": EVERYONE}, data={"language": "ja"}),
    "healthz": Rule(PUBLIC, {"GET": EVERYONE}),
    "metrics": Rule(METRICS, {"GET": NOBODY}),
    "metrics-sd": Rule(METRICS, {"GET": NOBODY}),
    "readyz": Rule(PUBLIC, {"GET": EVERYONE}),
    "favicon": Rule(PUBLIC, {"GET": EVERYONE}),
    "api-schema": Rule(PUBLIC, {"GET": EVERYONE}),
    "api-docs": Rule(PUBLIC, {"GET": EVERYONE}),
    "definition-schema": Rule(PUBLIC, {"GET": EVERYONE}),
    # --- folder pages (storage/urls.py) ----------------------------------------------------------
    "storage:list": Rule(PAGE, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    "storage:explorer": Rule(PAGE, {"GET": READ}),
    "storage:preview": Rule(PAGE, {"GET": READ}, query="?path={file}"),
    "storage:mkdir": Rule(PAGE, {"POST": READ}, data={"cwd": "", "name": "made-by-matrix"}),
    "storage:move": Rule(PAGE, {"POST": READ}, data={"src": "{file}", "dst": "moved.txt"}),
    "storage:delete-path": Rule(PAGE, {"POST": READ}, data={"path": "{file}"}),
    "storage:settings": Rule(PAGE, {"POST": MANAGE}),
    "storage:delete": Rule(PAGE, {"POST": MANAGE}),
    # --- service pages (serving/web/pages/*.py) ------------------------------------------------------
    "serving:list": Rule(PAGE, {"GET": ANY_USER}, collection=True),
    "serving:new": Rule(PAGE, {"GET": ANY_USER, "POST": ANY_USER}),
    "serving:validate": Rule(PAGE, {"POST": ANY_USER}),
    "serving:launcher-defaults": Rule(PAGE, {"GET": READ}, query="?folder={folder}&runtime=custom"),
    "serving:modify": Rule(PAGE, {"GET": MANAGE, "POST": MANAGE}),
    "serving:terminate": Rule(PAGE, {"GET": MANAGE, "POST": MANAGE}),
    "serving:detail": Rule(PAGE, {"GET": READ}),
    "serving:clear-errors": Rule(PAGE, {"POST": MANAGE}),
    "serving:token-create": Rule(PAGE, {"POST": READ}),
    "serving:token-revoke": Rule(PAGE, {"POST": REVOKE}),
    "serving:rule-create": Rule(PAGE, {"POST": MANAGE}),
    "serving:rule-update": Rule(PAGE, {"POST": MANAGE}),
    "serving:rule-toggle": Rule(PAGE, {"POST": MANAGE}),
    "serving:rule-delete": Rule(PAGE, {"POST": MANAGE}),
    "serving:revisions": Rule(PAGE, {"GET": READ}),
    "serving:revision-promote": Rule(PAGE, {"GET": MANAGE, "POST": MANAGE}),
    "serving:revision-rollback": Rule(PAGE, {"GET": MANAGE, "POST": MANAGE}),
    # Gateway keys (like the API's): the key's owner, its project's managers and operators; others 404.
    "serving:gateway-keys": Rule(PAGE, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    "serving:gateway-key": Rule(PAGE, {"GET": REVOKE}),
    "serving:gateway-key-revoke": Rule(PAGE, {"POST": REVOKE}),
    "serving:chat": Rule(PAGE, {"GET": READ}),
    "serving:chat-token": Rule(PAGE, {"POST": READ}),
    # A JSON relay for the chat page's script: anonymous gets a JSON 401, not a redirect.
    "serving:chat-relay": Rule(API, {"GET": READ}, also_ok=frozenset({502, 503, 504})),
    # --- REST API: accounts ----------------------------------------------------------------------
    "me": Rule(API, {"GET": ANY_USER}),
    "api-keys": Rule(API, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    "api-key-detail": Rule(API, {"DELETE": MINE}),
    # --- REST API: services ----------------------------------------------------------------------
    "service-list": Rule(API, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    "service-validate": Rule(API, {"POST": ANY_USER}),
    "service-detail": Rule(API, {"GET": READ, "PATCH": MANAGE, "DELETE": MANAGE}),
    "service-clear-errors": Rule(API, {"POST": MANAGE}),
    "service-events": Rule(API, {"GET": READ}),
    "service-scaling-events": Rule(API, {"GET": READ}),
    "service-metrics": Rule(API, {"GET": READ}),
    # Its gateway usage (per day, per key: key names and prefixes): whoever reads the service.
    "service-usage": Rule(API, {"GET": READ}),
    "service-tokens": Rule(API, {"GET": READ, "POST": READ}),
    "service-token-detail": Rule(API, {"GET": READ, "DELETE": REVOKE}),
    "service-rules": Rule(API, {"GET": READ, "POST": MANAGE}),
    "service-rule-detail": Rule(API, {"GET": READ, "PATCH": MANAGE, "DELETE": MANAGE}),
    "service-route-logs": Rule(API, {"GET": READ}),
    "gateway-keys": Rule(API, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    # A personal key: its owner and operators; a key of the project: also its managers.
    "gateway-key-detail": Rule(API, {"GET": REVOKE, "DELETE": REVOKE}),
    "gateway-key-usage": Rule(API, {"GET": REVOKE}),
    # A project's alias: its members read it; its owner, the project's managers and operators change it.
    "model-aliases": Rule(API, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    "model-alias-detail": Rule(API, {"GET": READ, "PATCH": MANAGE, "DELETE": MANAGE}),
    "service-revisions": Rule(API, {"GET": READ}),
    "service-revision-detail": Rule(API, {"GET": READ}),
    "service-revision-promote": Rule(API, {"POST": MANAGE}),
    "service-revisions-rollback": Rule(API, {"POST": MANAGE}),
    "service-revisions-traffic": Rule(API, {"PATCH": MANAGE}, data={"1": 100}),
    "runtimes": Rule(API, {"GET": ANY_USER}),
    "nodes": Rule(API, {"GET": ANY_USER}, collection=True),
    "node-folder-manifest": Rule(API, {"GET": NODES_ONLY}),
    "node-folder-file": Rule(API, {"GET": NODES_ONLY}),
    "presets": Rule(API, {"GET": ANY_USER}, collection=True),
    # --- REST API: folders and files -------------------------------------------------------------
    "folders": Rule(API, {"GET": ANY_USER, "POST": ANY_USER}, collection=True),
    "folder-detail": Rule(API, {"GET": READ, "PATCH": MANAGE, "DELETE": MANAGE}),
    "folder-files": Rule(API, {"GET": READ}),
    "folder-file": Rule(API, {"GET": READ, "PUT": READ, "DELETE": READ}),
    "folder-mkdir": Rule(API, {"POST": READ}, data={"path": "made-by-matrix"}),
    "folder-move": Rule(API, {"POST": READ}, data={"src": "{file}", "dst": "moved.txt"}),
    "folder-preview": Rule(API, {"GET": READ}, query="?path={file}"),
    "folder-upload": Rule(API, {"POST": READ}),
    "folder-launcher": Rule(API, {"GET": READ}),
}

# The Django admin: every view it adds is wrapped by ``admin_site.admin_view`` (staff only); each is
# still requested by every persona. Its login page is the only public one.
ADMIN_RULES: dict[str, Rule] = {
    "admin:login": Rule(PUBLIC, {"GET": EVERYONE}),
    "admin:logout": Rule(PUBLIC, {"POST": EVERYONE}),
    "admin:*": Rule(ADMIN, {"GET": STAFF}),
}

# Websocket routes (serving/web/consumers.py), keyed by their pattern.
WS_RULES: dict[str, Access] = {
    "ws/services/": ANY_USER,
    "ws/services/<uuid:service_id>/": {**READ, "stranger": REFUSED},
    # A replica's live log: whoever may read the service (the matrix's route runs on no node, so
    # the socket answers with what its error kept and ends).
    "ws/services/<uuid:service_id>/routes/<uuid:route_id>/logs/": {**READ, "stranger": REFUSED},
    "ws/validations/<str:validation_id>/": VALIDATION,
}


def rule_for(name: str) -> Rule | None:
    if name in RULES:
        return RULES[name]
    if name.startswith("admin:"):
        return ADMIN_RULES.get(name, ADMIN_RULES["admin:*"])
    return None
