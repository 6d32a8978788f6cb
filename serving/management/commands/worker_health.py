"""``manage.py worker_health``: the health check of a Celery worker or the beat (exit 0 when its
heartbeat is fresh, 1 with a sentence when not); the check itself is serving/management/health.py,
which an orchestrator runs as ``python -m serving.management.health`` (no app loading)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from serving.management import health


class Command(BaseCommand):
    help = (
        "Exit 0 when the heartbeat of this host's control worker, node worker or beat is fresh; "
        "else print why and exit 1 (for an orchestrator's health check)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        health.add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            healthy, sentence = health.check(options["role"], options["name"], options["host"], options["max_age"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if not healthy:
            raise CommandError(sentence)  # exit status 1, the sentence on stderr
        self.stdout.write(sentence)
