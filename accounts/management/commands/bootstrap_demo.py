from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.actions import do_add_member
from accounts.models import Membership, Project, User
from serving.models import ResourcePreset
from storage.models import Folder

PRESETS = [
    ("small", 1.0, 1 * 1024**3, {}),
    ("medium", 2.0, 4 * 1024**3, {}),
    ("gpu-half", 2.0, 8 * 1024**3, {"cuda.shares": 0.5}),
]


class Command(BaseCommand):
    help = "Create the demo operator, user, project, presets and example model folders (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        password = os.environ.get("DEMO_PASSWORD", "modelserve")
        with transaction.atomic():
            admin, created_admin = User.objects.get_or_create(
                username="admin", defaults={"is_superuser": True, "is_staff": True, "email": "admin@example.com"}
            )
            if created_admin:
                admin.set_password(password)
                admin.save()
            demo, created_demo = User.objects.get_or_create(username="demo", defaults={"email": "demo@example.com"})
            if created_demo:
                demo.set_password(password)
                demo.save()
            project, _ = Project.objects.get_or_create(name="demo", defaults={"description": "Demo project"})
            do_add_member(project, demo, Membership.Role.MANAGER)
            for name, cpu, mem, accelerators in PRESETS:
                ResourcePreset.objects.get_or_create(
                    name=name, defaults={"cpu": cpu, "mem": mem, "accelerators": accelerators}
                )
            examples = Path(settings.BASE_DIR) / "examples"
            for source in sorted(p for p in examples.iterdir() if p.is_dir()) if examples.is_dir() else []:
                folder, created = Folder.objects.get_or_create(
                    owner=demo, name=source.name, defaults={"usage_mode": Folder.UsageMode.MODEL, "project": project}
                )
                if created or not folder.host_path.exists():
                    folder.host_path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(source, folder.host_path, dirs_exist_ok=True)
        self.stdout.write(
            "Logins (password from DEMO_PASSWORD, default 'modelserve'):\n"
            f"  operator: admin / {password if created_admin else '(unchanged)'}\n"
            f"  user:     demo / {password if created_demo else '(unchanged)'}"
        )
