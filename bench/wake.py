"""Scale to zero's figure: what waking a sleeping service adds to the replica's own start.

    .venv/bin/python bench/wake.py [--rounds 5]

Against a throw-away database and a private Redis prefix, on the local engine, with the
``examples/llm-echo`` example (its server unchanged; the health check probes every 0.1 s instead of
the example's 2 s, as a latency-minded service would: the platform can not see a replica healthy
sooner than its check says so):

* **alone**: the local engine starts the replica directly (no platform around it) and the time to
  its first ``200`` on ``/health``, polled every 5 ms, is measured; the median of the rounds;
* **wake**: real Celery workers (control with its wake listener, one node, beat) and the real proxy
  as processes; a service with an idle timeout sleeps at 0 replicas, then one POST
  /v1/chat/completions is sent through the proxy and the time to its whole answer is measured (the
  proxy holds it, asks for the wake, forwards it once the first replica is in its routing table);
  the median of the rounds, each from a fresh sleep.

The difference (wake minus alone) is the platform's share: the wake request through Redis, the
reconcile and placement, the node's start task, the health probe and the routing update. Target:
at most 0.5 s. The last line reads ``wake s: W; replica start alone s: A; difference s: D (target 0.5)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from runtime import make_owner, setup_django  # noqa: E402

TARGET = 0.5
ECHO = REPO / "examples" / "llm-echo"
DEFINITION = """\
models:
  - name: "llm-echo"
    model_path: "/models"
    service:
      start_command: ["python3", "{model_path}/server.py", "--host", "0.0.0.0", "--port", "8000"]
      port: 8000
      health_check:
        path: /health
        interval: 0.1
        max_retries: 3
        max_wait_time: 1.0
        expected_status_code: 200
        initial_delay: 0.0
"""
CHAT = json.dumps({"model": "llm-echo", "messages": [{"role": "user", "content": "wake up"}]}).encode()


def make_echo_folder(owner: Any) -> Any:
    from storage.models import Folder

    folder = Folder.objects.create(owner=owner, name="wake-bench", usage_mode=Folder.UsageMode.MODEL)
    root = Path(folder.host_path)
    root.mkdir(parents=True, exist_ok=True)
    for path in ECHO.iterdir():
        if path.is_file():
            (root / path.name).write_bytes(path.read_bytes())
    (root / "model-definition.yaml").write_text(DEFINITION)
    return folder


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def bench_alone(folder: Any, rounds: int, workdir: Path) -> list[float]:
    """The replica's own start: the local engine starts it; time to its first healthy answer."""
    from serving.node.engines.base import Mount, ReplicaSpec
    from serving.node.engines.local.engine import LocalEngine

    engine = LocalEngine(state_dir=workdir / "engine" / "alone")
    times: list[float] = []
    for i in range(rounds):
        spec = ReplicaSpec(
            name=f"wake-alone-{i}",
            image="local",
            command=("python3", "/models/server.py", "--host", "0.0.0.0", "--port", "8000"),
            port=8000,
            mounts=(Mount(str(folder.host_path), "/models"),),
            cpu=1.0,
            mem_bytes=1 << 30,
        )
        started = time.perf_counter()
        info = engine.start(spec)
        url = f"http://{info.host}:{info.port}/health"
        while not healthy(url):
            if time.perf_counter() - started > 60:
                raise SystemExit("the replica started alone was not healthy within 60 s")
            time.sleep(0.005)
        times.append(time.perf_counter() - started)
        engine.stop(info.replica_id, grace=1)
    return times


def bench_wake(folder: Any, owner: Any, rounds: int, workdir: Path) -> list[float]:
    from serving.actions import services
    from serving.models import Endpoint, Node, Route
    from tests.live import LiveSystem, _answers, free_port, wait_for

    log_dir = workdir / "logs"
    log_dir.mkdir()
    system = LiveSystem(
        log_dir,
        SERVING_ENGINE="local",
        RECONCILE_INTERVAL="1",
        SLEEP_INTERVAL="0.5",
        NODE_HEARTBEAT_INTERVAL="1",
        NODE_LOST_AFTER="10",
        REPLICA_STOP_GRACE="1",
    )
    times: list[float] = []
    try:
        system.start_control()
        system.start_node("bench-wake")
        system.start_beat()
        port, admin = free_port(), free_port()
        system._spawn(
            "proxy",
            [sys.executable, "-m", "proxy"],
            PROXY_PORT=str(port),
            PROXY_ADMIN_PORT=str(admin),
            PROXY_STATS_INTERVAL="0.5",
        )
        wait_for(lambda: _answers(f"http://127.0.0.1:{admin}/healthz"), timeout=60, what="the proxy")
        wait_for(lambda: Node.objects.filter(name="bench-wake").exists(), timeout=60, what="the node to register")
        endpoint = services.do_create_service(
            acting_user=owner, name="wake-bench", folder=folder, replicas=1, open_to_public=True, idle_timeout=1
        )
        url = f"http://127.0.0.1:{port}/e/{endpoint.slug}/v1/chat/completions"
        for _ in range(rounds):
            wait_for(
                lambda: (
                    Endpoint.objects.get(pk=endpoint.pk).slept_at is not None
                    and not Route.objects.filter(endpoint=endpoint).exists()
                ),
                timeout=60,
                what="the service to sleep",
            )
            time.sleep(0.5)  # the proxies' routing tables have the service with no route
            request = urllib.request.Request(url, data=CHAT, headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as answer:
                body = answer.read()
            times.append(time.perf_counter() - started)
            assert json.loads(body)["choices"][0]["message"]["content"] == "wake up", body
            print(f"  wake round: answered in {times[-1]:.3f} s", flush=True)
    finally:
        system.stop_all()
        from serving.node.engines.local.engine import LocalEngine

        for state_dir in (workdir / "engine").glob("*"):
            engine = LocalEngine(state_dir=state_dir)
            for info in engine.list():
                engine.stop(info.replica_id, grace=1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ms-wake-") as tmp:
        workdir = Path(tmp)
        setup_django(workdir)
        owner = make_owner()
        folder = make_echo_folder(owner)
        alone = bench_alone(folder, args.rounds, workdir)
        print("replica start alone (local engine, to its first healthy /health):", [f"{t:.3f}" for t in alone])
        wake = bench_wake(folder, owner, args.rounds, workdir)
        print("first held request to its answer (sleeping service):", [f"{t:.3f}" for t in wake])
        a, w = statistics.median(alone), statistics.median(wake)
        print(f"wake s: {w:.3f}; replica start alone s: {a:.3f}; difference s: {w - a:.3f} (target {TARGET})")


if __name__ == "__main__":
    main()
