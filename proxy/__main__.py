"""``python -m proxy``: the data plane (see proxy/app.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from proxy.app import serve
from proxy.config import Config


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("PROXY_LOG_LEVEL", "WARNING"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = Config.from_env()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency; odd platforms still work
            asyncio.run(serve(config))
        else:
            uvloop.run(serve(config))


if __name__ == "__main__":
    main()
