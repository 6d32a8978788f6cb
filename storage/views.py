"""Folder pages (S1.1, S1.2, S1.3): the folder list with its tabs, and the folder explorer.

Server-rendered; every change is a small POST form that calls one action and redirects back with a
message (so the pages work without JavaScript). ``static/js/explorer.js`` adds drag and drop uploads
with a progress bar per file; uploads go to the REST API (streamed by storage.asgi), never through here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext
from django.views.decorators.http import require_GET, require_POST

from accounts.models import Project
from storage import actions, fs, modelstore
from storage.access import access_folder, can_manage_folder
from storage.models import Folder

TABS = [
    ("all", gettext_lazy("All"), None),
    ("model", gettext_lazy("Models"), Folder.UsageMode.MODEL),
    ("data", gettext_lazy("Data"), Folder.UsageMode.DATA),
    ("general", gettext_lazy("General"), Folder.UsageMode.GENERAL),
]


def _explorer_url(folder: Folder | str, path: str = "") -> str:
    folder_id = folder.pk if isinstance(folder, Folder) else folder
    url = reverse("storage:explorer", args=[folder_id])
    return f"{url}?{urlencode({'path': path})}" if path else url


def _error_text(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return " ".join(str(m) for errors in exc.error_dict.values() for e in errors for m in e.messages)
    return " ".join(exc.messages)


TEXT_SUFFIXES = (".yaml", ".yml", ".toml", ".json", ".txt", ".log", ".md", ".py", ".cfg", ".ini", ".csv", ".sh")


def _previewable(entry: fs.Entry) -> bool:
    """Small files of any kind (binary ones are refused with a sentence), and text files of any size
    (only their beginning is shown)."""
    if entry.type != "file":
        return False
    return entry.size <= fs.PREVIEW_LIMIT or entry.name.lower().endswith(TEXT_SUFFIXES)


def _size_text(size: int) -> str:
    """``fs.format_bytes`` with the byte count in the page's language (KiB, MiB, GiB read the same)."""
    if size < 1024:
        return ngettext("%(size)d byte", "%(size)d bytes", size) % {"size": size}
    return fs.format_bytes(size)


def _slot_text(key: str, value: float) -> str:
    if key == "mem":
        return f"mem={fs.format_bytes(int(value))}"
    return f"{key}={value:g}"


def launcher_url(folder: Folder) -> str:
    """Where "Run this model" goes: the service launcher when it exists, else this folder's run panel."""
    try:
        return f"{reverse('serving:new')}?{urlencode({'folder': str(folder.pk)})}"
    except NoReverseMatch:
        return reverse("storage:explorer", args=[folder.pk]) + "#run"


@login_required
def folder_list(request: HttpRequest) -> HttpResponse:
    """All folders the user can see, by tab; the Models tab is the model store (S1.3)."""
    tab = request.GET.get("tab", "all")
    modes = {key: mode for key, _label, mode in TABS}
    if tab not in modes:
        tab = "all"
    if request.method == "POST":
        return _create_folder(request, tab)
    folders = Folder.objects.visible_to(request.user).select_related("owner", "project")
    if modes[tab] is not None:
        folders = folders.filter(usage_mode=modes[tab])
    rows = []
    for folder in folders:
        info = modelstore.store_info(folder) if folder.usage_mode == Folder.UsageMode.MODEL else None
        rows.append(
            {
                "folder": folder,
                "runnable": bool(info and info.runnable),
                "launcher_url": launcher_url(folder) if info and info.runnable else "",
            }
        )
    return render(
        request,
        "storage/folder_list.html",
        {
            "tabs": [(key, label) for key, label, _mode in TABS],
            "tab": tab,
            "rows": rows,
            "projects": Project.objects.of(request.user),
            "usage_modes": Folder.UsageMode.choices,
        },
    )


def _create_folder(request: HttpRequest, tab: str) -> HttpResponse:
    back = reverse("storage:list") + (f"?tab={tab}" if tab != "all" else "")
    project = None
    project_id = request.POST.get("project") or ""
    if project_id:
        project = Project.objects.of(request.user).filter(pk=project_id if project_id.isdigit() else 0).first()
        if project is None:
            messages.error(request, _("No such project, or you are not a member of it."))
            return HttpResponseRedirect(back)
    quota_text = (request.POST.get("quota_gib") or "").strip()
    quota: int | None = None
    if quota_text:
        try:
            quota = int(float(quota_text) * 1024**3)
        except ValueError:
            messages.error(request, _("The quota is a number of GiB, such as 10 or 0.5."))
            return HttpResponseRedirect(back)
    try:
        folder = actions.do_create_folder(
            acting_user=request.user,  # type: ignore[arg-type]
            name=(request.POST.get("name") or "").strip(),
            usage_mode=request.POST.get("usage_mode") or Folder.UsageMode.GENERAL,
            project=project,
            quota_bytes=quota,
        )
    except ValidationError as exc:
        messages.error(request, _error_text(exc))
        return HttpResponseRedirect(back)
    messages.success(request, _("Folder “%(name)s” created.") % {"name": folder.name})
    return HttpResponseRedirect(_explorer_url(folder))


@login_required
@require_GET
def explorer(request: HttpRequest, folder_id: str) -> HttpResponse:
    """One directory of a folder: breadcrumbs, entries, and every action on them (S1.2)."""
    folder = access_folder(request.user, folder_id)
    path = request.GET.get("path", "")
    folder_fs = actions.folder_fs(folder)
    error = ""
    entries: list[fs.Entry] = []
    try:
        parts = fs.split_path(path, allow_root=True)
        path = fs.join(parts)
        entries = folder_fs.list(path)
    except fs.FsError as exc:
        error, parts, path = exc.message, (), ""
    crumbs = [{"name": folder.name, "url": _explorer_url(folder)}]
    for index, name in enumerate(parts):
        crumbs.append({"name": name, "url": _explorer_url(folder, fs.join(parts[: index + 1]))})
    rows = []
    for entry in entries:
        rows.append(
            {
                "entry": entry,
                "open_url": _explorer_url(folder, entry.path) if entry.type == "dir" else "",
                "download_url": reverse("folder-file", args=[folder.pk, entry.path]) if entry.type == "file" else "",
                "preview_url": (
                    f"{reverse('storage:preview', args=[folder.pk])}?{urlencode({'path': entry.path})}"
                    if _previewable(entry)
                    else ""
                ),
                "size_text": _size_text(entry.size) if entry.type == "file" else "",
            }
        )
    try:
        used = folder_fs.usage()
    except fs.FsError:
        used = 0
    run: dict[str, Any] | None = None
    info = modelstore.store_info(folder)
    if folder.usage_mode == Folder.UsageMode.MODEL or info.model_definition_path or info.has_service_definition:
        run = modelstore.launcher_values(folder, None)  # the runtime the folder describes
        run["launcher_url"] = launcher_url(folder)
        run["launcher_page"] = not run["launcher_url"].endswith("#run")
        run["launcher_api"] = reverse("folder-launcher", args=[folder.pk]) + f"?runtime={run['runtime']}"
        run["resources_text"] = [_slot_text(k, v) for k, v in run["resources"].items()]
    return render(
        request,
        "storage/explorer.html",
        {
            "folder": folder,
            "path": path,
            "parent_url": _explorer_url(folder, fs.join(parts[:-1])) if parts else "",
            "crumbs": crumbs,
            "rows": rows,
            "error": error,
            "can_manage": can_manage_folder(request.user, folder),
            "used_text": _size_text(used),
            "quota_text": _size_text(folder.effective_quota),
            "used_percent": min(100, round(100 * used / folder.effective_quota)) if folder.effective_quota else 100,
            "usage_modes": Folder.UsageMode.choices,
            "run": run,
            "upload_api": reverse("folder-upload", args=[folder.pk]),
            "self_url": _explorer_url(folder, path),
        },
    )


def _back(request: HttpRequest, folder: Folder) -> HttpResponseRedirect:
    return HttpResponseRedirect(_explorer_url(folder, request.POST.get("cwd", "")))


@login_required
@require_POST
def make_directory(request: HttpRequest, folder_id: str) -> HttpResponse:
    folder = access_folder(request.user, folder_id, write=True)
    cwd = request.POST.get("cwd", "")
    name = request.POST.get("name", "")
    try:
        fs.check_name(name)
        entry = actions.do_make_directory(
            folder,
            f"{cwd}/{name}" if cwd else name,
            acting_user=request.user,  # type: ignore[arg-type]
        )
    except fs.FsError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, _("Directory “%(path)s” created.") % {"path": entry.path})
    return _back(request, folder)


@login_required
@require_POST
def move_path(request: HttpRequest, folder_id: str) -> HttpResponse:
    folder = access_folder(request.user, folder_id, write=True)
    src, dst = request.POST.get("src", ""), request.POST.get("dst", "")
    try:
        entry = actions.do_move_path(folder, src, dst, acting_user=request.user)  # type: ignore[arg-type]
    except fs.FsError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, _("“%(src)s” is now “%(dst)s”.") % {"src": src, "dst": entry.path})
    return _back(request, folder)


@login_required
@require_POST
def delete_path(request: HttpRequest, folder_id: str) -> HttpResponse:
    folder = access_folder(request.user, folder_id, write=True)
    path = request.POST.get("path", "")
    try:
        entry = actions.do_delete_path(folder, path, acting_user=request.user)  # type: ignore[arg-type]
    except fs.FsError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, _("“%(path)s” deleted.") % {"path": entry.path})
    return _back(request, folder)


@login_required
@require_POST
def folder_settings(request: HttpRequest, folder_id: str) -> HttpResponse:
    """Rename the folder or change its usage mode (owner, project manager, operator)."""
    folder = access_folder(request.user, folder_id, manage=True)
    changes = {key: request.POST[key].strip() for key in ("name", "usage_mode") if request.POST.get(key, "").strip()}
    try:
        folder = actions.do_update_folder(folder, acting_user=request.user, changes=changes)  # type: ignore[arg-type]
    except ValidationError as exc:
        messages.error(request, _error_text(exc))
    else:
        messages.success(request, _("Folder settings saved."))
    return _back(request, folder)


@login_required
@require_POST
def delete_folder(request: HttpRequest, folder_id: str) -> HttpResponse:
    folder = access_folder(request.user, folder_id, manage=True)
    if request.POST.get("confirm_name", "") != folder.name:
        messages.error(request, _("Type the folder's name to confirm that it should be deleted."))
        return _back(request, folder)
    try:
        actions.do_delete_folder(folder, acting_user=request.user)  # type: ignore[arg-type]
    except ValidationError as exc:
        messages.error(request, _error_text(exc))
        return _back(request, folder)
    messages.success(request, _("Folder “%(name)s” deleted.") % {"name": folder.name})
    return HttpResponseRedirect(reverse("storage:list"))


@login_required
@require_GET
def preview(request: HttpRequest, folder_id: str) -> HttpResponse:
    """A small text file shown as text (escaped by the template): YAML, TOML, JSON, logs."""
    folder = access_folder(request.user, folder_id)
    path = request.GET.get("path", "")
    text, size, truncated, error = "", 0, False, ""
    try:
        text, size, truncated = actions.folder_fs(folder).preview(path)
    except fs.FsError as exc:
        error = exc.message
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    return render(
        request,
        "storage/preview.html",
        {
            "folder": folder,
            "path": path,
            "text": text,
            "size_text": _size_text(size),
            "truncated": truncated,
            "error": error,
            "back_url": _explorer_url(folder, parent),
            "download_url": reverse("folder-file", args=[folder.pk, path]) if not error else "",
        },
        status=200 if not error else 400,
    )
