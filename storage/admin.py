from __future__ import annotations

from django.contrib import admin

from storage.models import Folder


@admin.register(Folder)
class FolderAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "project", "usage_mode", "quota_bytes", "created_at")
    list_filter = ("usage_mode", "project")
    search_fields = ("name", "owner__username", "id")
    readonly_fields = ("id", "created_at", "updated_at", "host_path")
    autocomplete_fields = ("owner",)
