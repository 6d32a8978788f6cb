from __future__ import annotations

import contextlib
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from serving.node.engines.base import Engine, EngineError
from serving.node.engines.local.engine import LocalEngine


class Command(BaseCommand):
    help = (
        "Stop every replica of this installation on this machine, on the local engine and on Docker "
        "(make run calls it on Ctrl-C). The services stay; the next make run starts their replicas again. "
        "Replicas outlive a worker restart on purpose; this is for stopping the whole product."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        engines: list[Engine] = [LocalEngine(state_dir=d) for d in sorted(settings.ENGINE_STATE_DIR.glob("local-*"))]
        with contextlib.suppress(ImportError):  # docker-py may be missing on a local-engine-only host
            from serving.node.engines.docker.engine import DockerEngine

            docker_engine = DockerEngine(
                state_dir=settings.ENGINE_STATE_DIR / "docker", installation=settings.REDIS_PREFIX
            )
            if docker_engine.available():
                engines.append(docker_engine)
        stopped: dict[str, int] = {}
        for engine in engines:
            try:
                replicas = engine.list()
            except EngineError as exc:
                self.stderr.write(f"{engine.name}: could not list replicas: {exc}")
                continue
            for info in replicas:
                try:
                    engine.stop(info.replica_id, grace=settings.REPLICA_STOP_GRACE)
                    stopped[engine.name] = stopped.get(engine.name, 0) + 1
                except EngineError as exc:
                    self.stderr.write(f"{engine.name}: could not stop {info.replica_id}: {exc}")
            if isinstance(engine, LocalEngine):
                engine.cleanup_orphans()
        counts = ", ".join(f"{n} on {name}" for name, n in sorted(stopped.items())) or "none running"
        self.stdout.write(f"Stopped replicas: {counts}.")
