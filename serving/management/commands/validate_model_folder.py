from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from serving.definitions import validate_model_folder
from serving.runtimes import RUNTIMES


class Command(BaseCommand):
    help = (
        "Check a model folder on disk the way the platform will: prints every problem (file, field path, "
        "line) and exits 1, or prints the resolved definition and exits 0."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="the model folder")
        parser.add_argument("--runtime", default="custom", choices=sorted(RUNTIMES))
        parser.add_argument("--definition-path", default=None, help="model definition file inside the folder")

    def handle(self, *args: Any, **options: Any) -> None:
        result = validate_model_folder(Path(options["path"]), options["runtime"], options["definition_path"])
        if not result.ok:
            for problem in result.problems:
                self.stderr.write(str(problem))
            self.stderr.write(f"{len(result.problems)} problem(s) found.")
            sys.exit(1)
        resolved = {
            "runtime": options["runtime"],
            "model_definition": asdict(result.model_definition) if result.model_definition else None,
            "launcher_defaults": asdict(result.defaults) if result.defaults else None,
        }
        self.stdout.write(json.dumps(resolved, indent=2, default=list))
        self.stdout.write("OK: the folder is valid.")
