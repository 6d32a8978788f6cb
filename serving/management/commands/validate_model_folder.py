"""``python manage.py validate_model_folder PATH [--runtime R]``: check a model folder on disk.

Thin: the checks live in ``serving.folders.validate_model_folder``; this only formats them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandParser

from serving.core.definitions import DEFAULT_MODEL_DEFINITION_PATH
from serving.core.runtimes import RUNTIMES
from serving.folders import validate_model_folder


class Command(BaseCommand):
    help = (
        "Check a model folder on disk the way the platform will: prints every problem (file, field path, "
        "line) and exits 1, or prints the resolved definition and exits 0."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="the model folder")
        parser.add_argument(
            "--runtime",
            default=None,
            help=f"the inference runtime variant: {', '.join(RUNTIMES)} (default: the first runtime the folder's "
            "service-definition.toml has a section for, else custom)",
        )
        parser.add_argument(
            "--definition-path",
            default=None,
            help=f"the model definition file inside the folder (default {DEFAULT_MODEL_DEFINITION_PATH}, "
            "then model-definition.yml)",
        )
        parser.add_argument(
            "--model-mount", default="/models", help="where the folder is mounted in a replica (default /models)"
        )
        parser.add_argument("--json", action="store_true", help="print the resolved definition as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        result = validate_model_folder(
            Path(options["path"]),
            options["runtime"],
            options["definition_path"],
            model_mount=options["model_mount"],
        )
        # Unknown keys are ignored, as Backend.AI does, but said: a typo (inital_delay) must be loud.
        for warning in result.warnings:
            self.stderr.write(f"warning: {warning}")
        if not result.ok:
            for problem in result.problems:
                self.stderr.write(str(problem))
            self.stderr.write(f"{len(result.problems)} problem(s) found.")
            sys.exit(1)
        resolved = result.to_dict()
        del resolved["problems"], resolved["ok"], resolved["warnings"]
        if options["json"]:
            self.stdout.write(json.dumps(resolved, indent=2, ensure_ascii=False, default=str))
        else:
            self.stdout.write(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=100).rstrip("\n"))
        count = len(result.warnings)
        self.stdout.write(
            f"OK: the folder is valid for the {result.runtime} runtime"
            + (f" ({count} warning{'' if count == 1 else 's'}, above)." if count else ".")
        )
