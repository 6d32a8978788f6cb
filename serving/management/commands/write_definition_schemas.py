"""``python manage.py write_definition_schemas [DIR]``: write the definition files' JSON Schemas.

The repository keeps them in ``docs/schemas/`` (a test checks they match the parser); editors may point
at those files or at ``/api/v1/schemas/<name>`` of a running installation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from serving.core import schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


class Command(BaseCommand):
    help = "Write the JSON Schemas of model-definition.yaml and service-definition.toml (default: docs/schemas/)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("directory", nargs="?", default=str(Path(settings.BASE_DIR) / "docs" / "schemas"))

    def handle(self, *args: Any, directory: str, **options: Any) -> None:
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        for name, make in schemas.SCHEMAS.items():
            (target / name).write_text(render(make()))
            self.stdout.write(f"wrote {target / name}")
