"""A pytest plugin loaded with ``-p`` (pyproject addopts), so it runs before Django's settings load.

Every test session gets its own Redis key prefix, so the suite never touches a running
installation's keys, and two suites on one machine (SQLite and PostgreSQL, or a developer's beside
CI) never take each other's Celery tasks; and a proxy address nobody answers on (below). Setting
them from conftest.py was too late: pytest-django had already read the settings.
"""

from __future__ import annotations

import os
import socket
import uuid

_run = uuid.uuid4().hex[:8]
os.environ["REDIS_PREFIX"] = f"mstest-{_run}"
os.environ["TEST_DB_SUFFIX"] = _run

# Services' URLs point at a port where nothing listens, unless a test starts a proxy and says where:
# with the default (127.0.0.1:8080), a `make run` beside the suite answered the chat relay's calls
# and the access matrix saw that installation's answers instead of its own.
# The port stays bound (not listening) for the whole session: connecting is refused, and no test
# server binding port 0 can be given it meanwhile.
_nobody = socket.socket()
_nobody.bind(("127.0.0.1", 0))
os.environ["SERVING_PROXY_URL"] = f"http://127.0.0.1:{_nobody.getsockname()[1]}"
