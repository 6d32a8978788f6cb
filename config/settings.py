"""One settings module; every knob comes from the environment with a safe default (docs/architecture.md).

A fresh clone runs with no configuration at all: SQLite under var/, the local Redis, a secret key
generated on first start and kept in var/ (never in the repository).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from config.env import (
    ConfigError,
    database_from_url,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_ipv4,
    env_list,
    env_networks,
    env_origins,
    env_str,
    env_url_origin,
    loopback_variants,
    origin_of,
)

# Shared with the engines, which check it again (plain constants: no Django, no app loading).
from serving.core import logs
from serving.core.images import PULL_CHOICES, parse_registries
from serving.node.engines.firewall import EGRESS_CHOICES

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _persistent_secret(name: str) -> str:
    """A random secret created once per installation and kept in var/ (mode 600)."""
    path = VAR_DIR / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_urlsafe(50)
        # O_EXCL: when two processes start at once, exactly one writes and both read the same value.
        try:
            fd = path.open("x")
        except FileExistsError:
            return path.read_text().strip()
        with fd:
            path.chmod(0o600)
            fd.write(value)
        return value


SECRET_KEY = env_str("SECRET_KEY", "") or _persistent_secret("secret_key")
# Keys digests of endpoint tokens and API keys; the proxy reads the same value (proxy/config.py).
TOKEN_HMAC_KEY = env_str("TOKEN_HMAC_KEY", "") or _persistent_secret("token_hmac_key")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
# Where people open the web app. Procfile's daphne listens on WEB_PORT, so `WEB_PORT=9000 make run`
# needs nothing else; behind TLS or on another address, set SITE_URL=https://ms.example.com.
WEB_PORT = env_int("WEB_PORT", 8000, minimum=1)
SITE_URL = env_url_origin("SITE_URL", f"http://127.0.0.1:{WEB_PORT}")
# The exact origins (scheme://host[:port]) whose pages may open the web app's websockets and post
# its forms (config/asgi_guards.py, Django's CSRF check). Exact, port included: a replica's page
# served through the proxy has the web app's host name on another port, and browsers send the
# session cookie to every port of a host, so "same host name" would let it read a victim's secrets.
# Default: SITE_URL's origin (for a loopback SITE_URL, under every loopback name).
WEB_ORIGINS = env_origins("WEB_ORIGINS", loopback_variants(origin_of(SITE_URL)))
if (_site_origin := origin_of(SITE_URL)) not in WEB_ORIGINS:
    WEB_ORIGINS.insert(0, _site_origin)
if env_str("CSRF_TRUSTED_ORIGINS", ""):
    raise ConfigError(
        "CSRF_TRUSTED_ORIGINS is no longer read: set WEB_ORIGINS instead (exact origins, no wildcards); "
        "the same list guards the forms and the websockets."
    )
CSRF_TRUSTED_ORIGINS = list(WEB_ORIGINS)
# Peers whose X-Forwarded-For is believed (config/asgi_guards.py): the TLS terminators or load
# balancers in front of daphne. None by default: `make run` puts nothing in front of it, and from
# anyone else the header is the client's own claim (it would reset every per-address limit).
WEB_TRUSTED_PROXIES = env_networks("WEB_TRUSTED_PROXIES", [])
# /metrics and /metrics/sd answer to loopback addresses, and to "Authorization: Bearer <this>" when set.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "accounts",
    "storage",
    "serving",
]

MIDDLEWARE = [
    "config.requestid.RequestIdMiddleware",  # first: every log line of a request carries its id
    "serving.web.metrics.RequestMetricsMiddleware",  # next: it times the rest
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "config.csp.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

DATABASES = {"default": database_from_url(env_str("DATABASE_URL", ""), sqlite_default=str(VAR_DIR / "db.sqlite3"))}
# Set by the test suite (tests/redis_isolation.py): every run gets its own test database, so two
# suites on one machine (SQLite and PostgreSQL, or two developers' runs) never drop each other's.
if _test_db_suffix := env_str("TEST_DB_SUFFIX", ""):
    _default = DATABASES["default"]
    _test = dict(_default.get("TEST") or {})  # type: ignore[call-overload]
    if str(_default["ENGINE"]).endswith("sqlite3"):
        _test["NAME"] = str(_default["NAME"]).removesuffix(".sqlite3") + f"-test-{_test_db_suffix}.sqlite3"
    else:
        _test["NAME"] = f"test_{_default['NAME']}_{_test_db_suffix}"
    _default["TEST"] = _test
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = env_str("LANGUAGE_CODE", "en")
LANGUAGES = [("en", "English"), ("ja", "日本語")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = True

# File uploads are streamed to disk by storage/asgi.py; what reaches Django's own parsers is small.
DATA_UPLOAD_MAX_MEMORY_SIZE = 8 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2621440

# --- Redis: broker, channel layer, routing table, token digests, metrics -----------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# Every key the platform writes starts with this, so two installations (or the test suite) can
# share one Redis without seeing each other.
REDIS_PREFIX = env_str("REDIS_PREFIX", "ms")

# Django's cache: failed-login counters (accounts/ratelimit.py).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"{REDIS_PREFIX}:cache",
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_PREFIX}:asgi"},
    }
}

# --- Celery --------------------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": f"{REDIS_PREFIX}:celery:"}
RECONCILE_INTERVAL = env_float("RECONCILE_INTERVAL", 5.0, minimum=0.1)
NODE_HEARTBEAT_INTERVAL = env_float("NODE_HEARTBEAT_INTERVAL", 5.0, minimum=0.1)
NODE_LOST_AFTER = env_float("NODE_LOST_AFTER", 30.0, minimum=1.0)
AUTOSCALE_INTERVAL = env_float("AUTOSCALE_INTERVAL", 5.0, minimum=0.1)
# Metrics for autoscaling and charts (serving/bus/metrics.py): how often the nodes sample their replicas
# (engine stats, /metrics) and the beat collects the proxies' stats, how long points are kept, and the
# bounds of one node's sampling round (a hung replica costs one slot for at most the timeout).
METRICS_INTERVAL = env_float("METRICS_INTERVAL", 5.0, minimum=0.1)
METRICS_RETENTION = env_float("METRICS_RETENTION", 600.0, minimum=10.0)
METRICS_TIMEOUT = env_float("METRICS_TIMEOUT", 2.0, minimum=0.1)
METRICS_CONCURRENCY = env_int("METRICS_CONCURRENCY", 8, minimum=1)
# How often the proxies' batched token last-use times are written to the DB.
TOKEN_USAGE_INTERVAL = env_float("TOKEN_USAGE_INTERVAL", 10.0, minimum=0.1)
# How often the proxies' gateway usage counters (per key, service and day) are folded into the DB.
GATEWAY_USAGE_INTERVAL = env_float("GATEWAY_USAGE_INTERVAL", 60.0, minimum=0.1)
# Scale to zero (serving/control/sleep.py): how often idle services are put to sleep, wakes get their
# cold-start time and the proxies' re-sent request counts reach the event log.
SLEEP_INTERVAL = env_float("SLEEP_INTERVAL", 5.0, minimum=0.1)
# A canary is rolled back by itself when, over the last CANARY_WINDOW seconds and at least
# CANARY_MIN_REQUESTS of its answers, its 5xx rate exceeds the stable revision's by this fraction.
CANARY_MAX_5XX_MARGIN = env_float("CANARY_MAX_5XX_MARGIN", 0.05, minimum=0.0)
CANARY_MIN_REQUESTS = env_int("CANARY_MIN_REQUESTS", 20, minimum=1)
CANARY_WINDOW = env_float("CANARY_WINDOW", 300.0, minimum=60.0)

# --- Serving -------------------------------------------------------------------------------------
SERVING_ENGINE = env_choice("SERVING_ENGINE", "auto", {"auto", "docker", "local", "swarm"})
# SERVING_ENGINE=swarm (a Docker Swarm manager's API, DOCKER_HOST): how replicas' ports are
# published ("host": on the Swarm node the task runs on, reached at that node's address; "ingress":
# the routing mesh, reached at NODE_ADDRESS) and which Swarm node (host name) this node worker's
# replicas are pinned to ("" = the manager's own).
SWARM_PUBLISH_MODE = env_choice("SWARM_PUBLISH_MODE", "host", {"host", "ingress"})
SWARM_NODE = env_str("SWARM_NODE", "")
# The Swarm generic resource kind GPUs are advertised as on the Swarm nodes (daemon.json's
# node-generic-resources, nvidia-container-runtime's swarm-resource): a replica asking for N GPUs
# reserves N of it, and a Swarm node worker's GPUs are the ones its Swarm node advertises.
SWARM_GPU_RESOURCE = env_str("SWARM_GPU_RESOURCE", "NVIDIA-GPU")
# The address clients use to reach endpoints through the proxy; an endpoint's URL is
# f"{SERVING_PROXY_URL}/e/{slug}/" (or http://{slug}.{SERVING_DOMAIN}/ when a domain is set).
SERVING_PROXY_URL = env_str("SERVING_PROXY_URL", "http://127.0.0.1:8080").rstrip("/")
SERVING_DOMAIN = env_str("SERVING_DOMAIN", "")
NODE_NAME = env_str("NODE_NAME", "local")
# Where this node's replicas are reached (the proxy, other nodes' cluster members): the Docker
# engine publishes their ports on this address. 127.0.0.1 keeps them on this machine; with several
# hosts, the host's address on the network the proxies are on (and firewall it to them).
NODE_ADDRESS = env_ipv4(
    "NODE_ADDRESS", "127.0.0.1", hint="use an address of this host that the proxies can reach, e.g. 10.0.0.5"
)
NODE_RESOURCE_GROUP = env_str("NODE_RESOURCE_GROUP", "default")
# Capacity a node advertises; accelerators are modelled (there is no GPU here): "cuda.shares=4".
NODE_CPU = env_float("NODE_CPU", 0.0, minimum=0.0)  # 0 = the host's core count
NODE_MEM = env_str("NODE_MEM", "")  # "" = the host's memory
NODE_ACCELERATORS = env_str("NODE_ACCELERATORS", "")
REPLICA_STOP_GRACE = env_float("REPLICA_STOP_GRACE", 10.0, minimum=0.0)
MAX_START_FAILURES = env_int("MAX_START_FAILURES", 5, minimum=1)
DEFAULT_IMAGE = env_str("DEFAULT_IMAGE", "modelserve/python:3.11")
STORAGE_ROOT = Path(env_str("STORAGE_ROOT", str(VAR_DIR / "storage")))
# Model folders on nodes that do not see STORAGE_ROOT (serving/node/snapshots.py): such a node copies
# a folder into NODE_CACHE_ROOT as an immutable snapshot, fetched from the web app (NODE_WEB_URL, default
# SITE_URL) with its node key (NODE_KEY; unset, derived from SECRET_KEY: `manage.py node_key <name>`
# prints it). Unset NODE_CACHE_ROOT means the node runs in the web app's installation and reads
# STORAGE_ROOT directly (today's single host); NODE_SHARED_STORAGE=true says the same of a shared
# filesystem even with a cache root.
NODE_CACHE_ROOT = env_str("NODE_CACHE_ROOT", "")
NODE_SHARED_STORAGE = env_bool("NODE_SHARED_STORAGE", not NODE_CACHE_ROOT)
NODE_WEB_URL = env_str("NODE_WEB_URL", SITE_URL).rstrip("/")
NODE_KEY = env_str("NODE_KEY", "")
# How long an unused snapshot stays in the cache (a replica restarted soon after reuses it).
NODE_SNAPSHOT_KEEP = env_float("NODE_SNAPSHOT_KEEP", 600.0, minimum=0.0)
DEFAULT_FOLDER_QUOTA = env_int("DEFAULT_FOLDER_QUOTA", 50 * 1024**3, minimum=0)
# The most bytes one user's folders may hold in all (every folder they own, project folders too),
# uploads in progress included; a user's own storage_limit (admin) overrides it. 0: no such limit.
USER_STORAGE_LIMIT = env_int("USER_STORAGE_LIMIT", 200 * 1024**3, minimum=0)
# How long the bytes of an upload in progress stay held without news from it (storage/quota.py):
# a crashed upload's share of a quota comes back after this long.
UPLOAD_HOLD_SECONDS = env_float("UPLOAD_HOLD_SECONDS", 120.0, minimum=1.0)
ENGINE_STATE_DIR = Path(env_str("ENGINE_STATE_DIR", str(VAR_DIR / "engine")))
# Each service's persistent writable cache on a node (its /home/work/.cache, HF_HOME inside it):
# <root>/<node name>/<endpoint id>, kept across the service's replica restarts on that node, removed
# once the service is destroyed (serving/node/caches.py).
SERVICE_CACHE_ROOT = Path(env_str("SERVICE_CACHE_ROOT", str(ENGINE_STATE_DIR / "service-caches")))
# Bytes one service's cache may hold on a node before its event log warns (nothing is deleted); the
# caches also count against their owner's storage limit (USER_STORAGE_LIMIT).
SERVICE_CACHE_LIMIT = env_int("SERVICE_CACHE_LIMIT", 50 * 1024**3, minimum=0)
# Seconds between two measurements of one cache's size by its node (a walk of the directory).
SERVICE_CACHE_MEASURE_INTERVAL = env_float("SERVICE_CACHE_MEASURE_INTERVAL", 60.0, minimum=0.0)
# Who replicas of the local engine run as when it runs as root (nobody/nogroup by default; 0 and 0
# keep them root without capabilities). An engine not running as root runs them as its own user.
LOCAL_ENGINE_UID = env_int("LOCAL_ENGINE_UID", 65534, minimum=0)
LOCAL_ENGINE_GID = env_int("LOCAL_ENGINE_GID", 65534, minimum=0)
# Who Docker replicas run as, whatever the image says (nobody/nogroup by default): what they write
# on read-write mounts is not root's on the host. 0 and 0 keep them root without capabilities.
DOCKER_REPLICA_UID = env_int("DOCKER_REPLICA_UID", 65534, minimum=0)
DOCKER_REPLICA_GID = env_int("DOCKER_REPLICA_GID", 65534, minimum=0)
# What replicas may open connections to besides their own network: "allow" = whatever the host
# reaches on Docker (never another replica), the host only on the local engine; "deny" = nothing,
# not even the host (firewall rules: root and iptables).
SERVING_REPLICA_EGRESS = env_choice("SERVING_REPLICA_EGRESS", "allow", set(EGRESS_CHOICES))
# Images a node does not have (issue 15): "never" = a start fails saying how to load it; "missing" =
# the node pulls it, from the registries of SERVING_REGISTRIES only (comma-separated: ghcr.io,
# 10.0.0.5:5000, docker.io, or a registry with a path the image must be under, ghcr.io/acme), with
# the credentials of the node's Docker config (~/.docker/config.json, DOCKER_CONFIG).
SERVING_IMAGE_PULL = env_choice("SERVING_IMAGE_PULL", "never", set(PULL_CHOICES))
try:
    SERVING_REGISTRIES = parse_registries(env_list("SERVING_REGISTRIES", []))
except ValueError as exc:
    raise ConfigError(str(exc)) from None

# --- REST API --------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "config.api.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": None,
    "EXCEPTION_HANDLER": "config.api.exception_handler",
    "DEFAULT_THROTTLE_RATES": {"login": "10/min"},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "modelserve API",
    "DESCRIPTION": ("Model folders, model services (endpoints), replicas (routes), tokens and autoscaling rules."),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and ReDoc from the package's static files, not a CDN: nothing is fetched at run time.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Security (production values switch on with SECURE=true behind TLS) -------------------------
SECURE = env_bool("SECURE", False)
SESSION_COOKIE_SECURE = SECURE
CSRF_COOKIE_SECURE = SECURE
SECURE_SSL_REDIRECT = False  # TLS is terminated in front of us
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if SECURE else None
SECURE_HSTS_SECONDS = 31536000 if SECURE else 0
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
# config/csp.py. Scripts and styles from the site only (no inline code in templates); connect-src is
# open because the chat page may call an OpenAI-compatible server the user names (S8, CORS applies).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' http: https: ws: wss:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
CONTENT_SECURITY_POLICY_BY_VIEW = {
    # drf-spectacular's Swagger UI: bundle and styles from jsDelivr, bootstrapped by an inline script.
    "api-docs": (
        "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
        "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://cdn.jsdelivr.net; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}
# Failed logins per username and client address, and failed API keys per client address, in a window
# (accounts/ratelimit.py): past the limit, HTTP 429 until the window ends.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10, minimum=1)
LOGIN_FAILURE_WINDOW = env_int("LOGIN_FAILURE_WINDOW", 900, minimum=1)
# And per username from every address together, in the same window: guessing one user's password
# from many addresses (a botnet, or a client that could still pose as others) is capped too. Higher
# than the per-address limit, so one person's typos elsewhere do not lock the user out.
LOGIN_USERNAME_FAILURE_LIMIT = env_int("LOGIN_USERNAME_FAILURE_LIMIT", 30, minimum=1)
API_KEY_FAILURE_LIMIT = env_int("API_KEY_FAILURE_LIMIT", 100, minimum=1)
API_KEY_FAILURE_WINDOW = env_int("API_KEY_FAILURE_WINDOW", 900, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": logs.PLAIN}, "json": {"()": "serving.core.logs.JsonFormatter"}},
    # LOG_FORMAT=json: one JSON object a line, with the request id, service, route and node that apply.
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if logs.json_enabled() else "plain"}
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
