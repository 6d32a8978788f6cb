"""``python -m proxy``: the data plane (see proxy/app.py; settings in proxy/config.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource

from proxy.app import serve
from proxy.config import Config
from serving.core import logs


def _raise_open_file_limit() -> None:
    """Each proxied stream holds two sockets: 5,000 streams need more than the usual 1,024."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> None:
    logs.configure(os.environ.get("PROXY_LOG_LEVEL", "WARNING"), "proxy")  # LOG_FORMAT=json: JSON lines
    config = Config.from_env()
    if config.access_log:
        logging.getLogger("proxy.access").setLevel(logging.INFO)
    _raise_open_file_limit()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency; odd platforms still work
            asyncio.run(serve(config))
        else:
            uvloop.run(serve(config))


if __name__ == "__main__":
    main()
