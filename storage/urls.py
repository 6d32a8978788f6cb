"""Folder pages, mounted by config/urls.py at ``folders/`` (namespace ``storage``)."""

from __future__ import annotations

from django.urls import path

from storage import views

app_name = "storage"

urlpatterns = [
    path("", views.folder_list, name="list"),
    path("<uuid:folder_id>/", views.explorer, name="explorer"),
    path("<uuid:folder_id>/preview/", views.preview, name="preview"),
    path("<uuid:folder_id>/mkdir/", views.make_directory, name="mkdir"),
    path("<uuid:folder_id>/move/", views.move_path, name="move"),
    path("<uuid:folder_id>/delete-path/", views.delete_path, name="delete-path"),
    path("<uuid:folder_id>/settings/", views.folder_settings, name="settings"),
    path("<uuid:folder_id>/delete/", views.delete_folder, name="delete"),
]
