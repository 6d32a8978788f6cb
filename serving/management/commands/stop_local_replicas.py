from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from serving.engines.local import LocalEngine


class Command(BaseCommand):
    help = (
        "Stop every replica the local engine runs on this machine (make run calls it on Ctrl-C). "
        "The services stay; their replicas are started again by the next make run."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        stopped = 0
        for state_dir in sorted(settings.ENGINE_STATE_DIR.glob("local-*")):
            engine = LocalEngine(state_dir=state_dir)
            for info in engine.list():
                engine.stop(info.replica_id, grace=settings.REPLICA_STOP_GRACE)
                stopped += 1
            engine.cleanup_orphans()
        self.stdout.write(f"Stopped {stopped} local replica(s).")
