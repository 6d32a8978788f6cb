"""Virtual folders (S1.1): a directory under STORAGE_ROOT, named by id, owned by a user or a project."""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from accounts.models import shared_with

folder_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    _("A folder name is 1-64 letters, digits, '_', '.' or '-', and starts with a letter or digit."),
)


class FolderQuerySet(models.QuerySet["Folder"]):
    def visible_to(self, user: object) -> FolderQuerySet:
        """Folders a user may see: their own and their projects'; operators see all."""
        if getattr(user, "is_superuser", False):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(shared_with(user)).distinct()


class Folder(models.Model):
    class UsageMode(models.TextChoices):
        GENERAL = "general", _("general")
        DATA = "data", _("data")
        MODEL = "model", _("model")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=64, validators=[folder_name_validator])
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="folders")
    project = models.ForeignKey(
        "accounts.Project", on_delete=models.CASCADE, null=True, blank=True, related_name="folders"
    )
    usage_mode = models.CharField(max_length=16, choices=UsageMode.choices, default=UsageMode.GENERAL)
    quota_bytes = models.BigIntegerField(
        null=True, blank=True, help_text=_("Maximum total size in bytes; empty means the default.")
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    objects = FolderQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="folder_name_unique_per_owner"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def host_path(self) -> Path:
        """The folder's directory on disk: named by id, never by the user's name."""
        return Path(settings.STORAGE_ROOT) / str(self.id)

    @property
    def effective_quota(self) -> int:
        return self.quota_bytes if self.quota_bytes is not None else settings.DEFAULT_FOLDER_QUOTA
