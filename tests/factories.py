"""Factories for tests: rows built the way the product builds them (through actions where it matters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import factory

from accounts.models import Membership, Project, User
from storage.models import Folder

SIMPLE_DEFINITION = """\
models:
  - name: "simple-http-server"
    model_path: "/models"
    service:
      start_command: [python3, -m, http.server, --directory, /models, "8000"]
      port: 8000
      health_check:
        path: /
        interval: 0.2
        max_retries: 3
        max_wait_time: 1.0
        initial_delay: 0.0
"""


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pw-for-tests")


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"project{n}")


class FolderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Folder
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"folder{n}")
    owner = factory.SubFactory(UserFactory)
    usage_mode = Folder.UsageMode.MODEL

    @factory.post_generation
    def files(self, create: bool, extracted: dict[str, str] | None, **kwargs: Any) -> None:
        Path(self.host_path).mkdir(parents=True, exist_ok=True)
        for name, body in (extracted or {}).items():
            path = Path(self.host_path) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)


def make_personas() -> dict[str, Any]:
    """owner and teammate share a project (owner manages it); stranger is alone; admin is an operator."""
    project = ProjectFactory(name="team")
    owner = UserFactory(username="owner")
    teammate = UserFactory(username="teammate")
    stranger = UserFactory(username="stranger")
    admin = UserFactory(username="admin", is_superuser=True, is_staff=True)
    Membership.objects.get_or_create(user=owner, project=project, defaults={"role": Membership.Role.MANAGER})
    Membership.objects.get_or_create(user=teammate, project=project, defaults={"role": Membership.Role.MEMBER})
    return {"owner": owner, "teammate": teammate, "stranger": stranger, "admin": admin, "project": project}
