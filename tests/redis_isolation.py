"""A pytest plugin loaded with ``-p`` (pyproject addopts), so it runs before Django's settings load.

Every test session gets its own Redis key prefix: the suite never touches a running installation's
keys, and two suites on one machine (SQLite and PostgreSQL, or a developer's beside CI) never take
each other's Celery tasks. Setting it from conftest.py was too late: pytest-django had already read
the settings, and every run shared the default prefix.
"""

from __future__ import annotations

import os
import uuid

_run = uuid.uuid4().hex[:8]
os.environ["REDIS_PREFIX"] = f"mstest-{_run}"
os.environ["TEST_DB_SUFFIX"] = _run
