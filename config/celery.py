"""The Celery app: control-plane queue ``control`` plus one queue ``node.<name>`` per node."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("modelserve")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _beat_schedule(sender: Celery, **_: object) -> None:
    from django.conf import settings

    # Each entry expires after about its period: a backlog of stale ticks is useless (docs/architecture.md).
    sender.conf.beat_schedule = {
        "reconcile-all": {
            "task": "serving.tasks.reconcile_all",
            "schedule": settings.RECONCILE_INTERVAL,
            "options": {"expires": settings.RECONCILE_INTERVAL},
        },
        "autoscale": {
            "task": "serving.tasks.autoscale",
            "schedule": settings.AUTOSCALE_INTERVAL,
            "options": {"expires": settings.AUTOSCALE_INTERVAL},
        },
        "collect-proxy-metrics": {
            "task": "serving.tasks.collect_proxy_metrics",
            "schedule": settings.METRICS_INTERVAL,
            "options": {"expires": settings.METRICS_INTERVAL},
        },
        "sleep-tick": {
            "task": "serving.tasks.sleep_tick",
            "schedule": settings.SLEEP_INTERVAL,
            "options": {"expires": settings.SLEEP_INTERVAL},
        },
        "record-token-usage": {
            "task": "serving.tasks.record_token_usage",
            "schedule": settings.TOKEN_USAGE_INTERVAL,
            "options": {"expires": settings.TOKEN_USAGE_INTERVAL},
        },
        "fold-gateway-usage": {
            "task": "serving.tasks.fold_gateway_usage",
            "schedule": settings.GATEWAY_USAGE_INTERVAL,
            "options": {"expires": settings.GATEWAY_USAGE_INTERVAL},
        },
        "detect-lost-nodes": {
            "task": "serving.tasks.detect_lost_nodes",
            "schedule": settings.NODE_HEARTBEAT_INTERVAL,
            "options": {"expires": settings.NODE_HEARTBEAT_INTERVAL},
        },
    }
