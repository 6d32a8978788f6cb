"""Print the node key of a node on another host: set it there as NODE_KEY (serving/node/snapshots.py)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from serving.core import snapshots


class Command(BaseCommand):
    help = (
        "Print the key node NAME uses to copy model folders from the web app (its NODE_KEY). "
        "It is derived from SECRET_KEY: changing SECRET_KEY revokes every node key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the node's NODE_NAME")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        key = snapshots.node_key(settings.SECRET_KEY, name)
        if snapshots.check_node_authorization(snapshots.node_authorization(name, key), settings.SECRET_KEY) != name:
            raise CommandError(f"{name!r} is not a node name: use letters, digits, '.', '_' and '-' (at most 100).")
        self.stdout.write(key)
