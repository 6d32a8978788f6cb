"""End-to-end fixtures (docs/architecture.md): Playwright driving Debian's Chromium against a live server.

* ``web``: the web process (daphne: pages, REST API and websockets) as a subprocess on a free port,
  against the test database, the session's Redis prefix and storage root (tests/live.py).
* ``live``: ``web`` plus real workers (control, node ``local`` with the local engine, beat), for
  tests that start replicas; ``live.system.start_proxy()`` adds the data plane when needed.
* ``page_as("owner")``: a new browser page logged in as a persona (owner, teammate, stranger, admin),
  optionally ``language="ja"`` and ``width=390``; console errors fail the test unless it is marked
  ``allow_console_errors``.
* ``screenshot(page, "name")``: saves ``<E2E_ARTIFACTS or var/e2e>/<name>.png`` as a test artefact.

Every test here is skipped, with the reason printed, when /usr/bin/chromium (Debian package
``chromium``, installed by scripts/system-deps.sh as root) or the ``playwright`` package is missing.
No browser is ever downloaded by Playwright.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.live import ROOT, LiveSystem, deadline_ms, wait_for

# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are synchronous
# and safe (the server is another process), so Django's async guard must not refuse them.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("E2E_ARTIFACTS", str(ROOT / "var" / "e2e")))


def _why_not() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the python package 'playwright' is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; `make test` installs it as root)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not()
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"e2e skipped: {reason}"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_console_errors: the page may log errors to the browser console")


# --- the browser ---------------------------------------------------------------------------------


# Module scope, not session: Playwright's sync API runs an event loop in the test thread while it is
# open, and every later test that uses async_to_sync (Django's ASGI tests) would fail in that thread.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    # An assertion without its own timeout waits Playwright's 5 s, stretched like every deadline.
    expect.set_options(timeout=deadline_ms(5))
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # Containers have a small /dev/shm and often no user namespaces for Chromium's sandbox.
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        yield instance
        instance.close()


# --- the servers ---------------------------------------------------------------------------------


@dataclass
class Web:
    url: str
    system: LiveSystem
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, path: str) -> str:
        return self.url + path


def _engine_ready() -> str | None:
    from tests.integration.conftest import _engine_ready as ready

    return ready()


@pytest.fixture
def web(transactional_db: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Web]:
    """daphne against the test database (HTTP and websockets), no workers."""
    system = LiveSystem(tmp_path)
    try:
        url = system.start_web()
        yield Web(url=url, system=system)
    finally:
        system.stop_all()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(system.logs())


@pytest.fixture
def live(web: Web) -> Iterator[Web]:
    """``web`` plus control and node workers (local engine) and beat: services really run."""
    reason = _engine_ready()
    if reason:
        pytest.skip(reason)
    from django.conf import settings

    from serving.models import Node
    from serving.node.engines.local.engine import LocalEngine

    web.system.start_control()
    web.system.start_node("local")
    web.system.start_beat()
    try:
        wait_for(
            lambda: Node.objects.filter(name="local", heartbeat_at__isnull=False).exists(),
            timeout=30,
            what="node 'local' to register",
        )
        yield web
    finally:
        web.system.stop("beat")
        web.system.stop("control")
        web.system.stop("node-local")
        for state_dir in Path(settings.ENGINE_STATE_DIR).glob("local-*"):
            engine = LocalEngine(state_dir=state_dir)
            for info in engine.list():
                engine.stop(info.replica_id, grace=1)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


# --- logged-in pages -----------------------------------------------------------------------------


def session_cookie(user: Any) -> dict[str, str]:
    """A real session for ``user`` in the test database (what logging in creates)."""
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    return {"name": settings.SESSION_COOKIE_NAME, "value": client.cookies[settings.SESSION_COOKIE_NAME].value}


@pytest.fixture
def page_as(
    browser: Any, web: Web, personas: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Any]]:
    """``page_as("owner", language="en", width=1280)`` -> a Playwright page logged in as the persona
    (``None``: anonymous). ``page.console_errors`` collects what the browser console reported."""
    from django.conf import settings

    contexts: list[Any] = []
    pages: list[Any] = []

    def open_page(who: str | None = "owner", language: str = "en", width: int = 1280, height: int = 860) -> Any:
        context = browser.new_context(
            base_url=web.url,
            viewport={"width": width, "height": height},
            locale="ja-JP" if language == "ja" else "en-US",
            timezone_id="Asia/Tokyo" if language == "ja" else "Europe/Berlin",
        )
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web.url)
        contexts.append(context)
        cookies = [{"name": settings.LANGUAGE_COOKIE_NAME, "value": language, "url": web.url}]
        if who is not None:
            cookies.append({**session_cookie(personas[who]), "url": web.url})
        context.add_cookies(cookies)
        page = context.new_page()
        page.set_default_timeout(deadline_ms(15))
        page.console_errors = []  # type: ignore[attr-defined]
        page.on(
            "console",
            lambda message: page.console_errors.append(message.text) if message.type == "error" else None,  # type: ignore[attr-defined]
        )
        page.on("pageerror", lambda error: page.console_errors.append(str(error)))  # type: ignore[attr-defined]
        pages.append(page)
        return page

    yield open_page
    errors = [(p.url, e) for p in pages for e in p.console_errors]
    for context in contexts:
        context.close()
    if errors and request.node.get_closest_marker("allow_console_errors") is None:
        failed = getattr(request.node, "rep_call", None)
        if failed is None or not failed.failed:
            pytest.fail(f"the browser console reported errors: {errors}")


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[Any, str], Path]:
    """``screenshot(page, "services-list")`` -> the saved PNG (full page)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(page: Any, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


def off_loop(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` in another thread and return its result.

    Playwright's sync API keeps an event loop in the test's thread, where ``async_to_sync`` (the
    channel layer's group_send, which actions call on commit) refuses to run. Whatever in the test
    must reach open pages live (an action, ``notify_endpoint_changed``) goes through here.
    """
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def call() -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


# --- model folders from examples/ ----------------------------------------------------------------


@pytest.fixture
def example_folder(personas: dict[str, Any]) -> Callable[..., Any]:
    """``example_folder("simple-http-server", name="simple", owner="owner")``: a model folder holding
    a copy of ``examples/<example>`` (as uploading it would)."""
    from tests.factories import FolderFactory

    def make(example: str, name: str | None = None, owner: str = "owner", **fields: Any) -> Any:
        source = ROOT / "examples" / example
        files = {str(p.relative_to(source)): p.read_text() for p in source.rglob("*") if p.is_file()}
        return FolderFactory(owner=personas[owner], name=name or example, files=files, **fields)

    return make


def fast_health_checks(folder: Any) -> None:
    """Shorten the example's health check timing (tests wait seconds, not minutes, S5.2)."""
    path = Path(folder.host_path) / "model-definition.yaml"
    text = path.read_text()
    for key, value in (("interval", "0.5"), ("initial_delay", "0.0"), ("max_wait_time", "2.0")):
        text = re.sub(rf"(\n\s+{key}:)\s*[0-9.]+", rf"\1 {value}", text)
    path.write_text(text)
