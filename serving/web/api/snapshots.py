"""What a node that copies model folders fetches: a folder's manifest and its files (serving.core.snapshots).

Authorized by a node key (``Authorization: Node <name>:<key>``), never a user's: the node must be
registered (its worker heartbeats) and the folder must be the model folder of a live service, or of a
dry run placed on that node (``?validation=<id>``, serving.bus.dryrun) and not finished. Files
are streamed with Range support, so an interrupted transfer resumes where it stopped.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_GET

from serving.bus import dryrun
from serving.core import snapshots
from serving.models import Endpoint, Node
from storage import actions, fs, manifest
from storage.api import download_response
from storage.models import Folder

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _folder_for_node(request: HttpRequest, folder_id: str) -> Folder:
    name = snapshots.check_node_authorization(request.headers.get("Authorization", ""), settings.SECRET_KEY)
    if name is None:
        raise _Refused(401, "A node key is needed: Authorization: Node <name>:<key> (manage.py node_key <name>).")
    if not Node.objects.filter(name=name).exists():
        raise _Refused(403, f"Node {name!r} is not registered; start its worker first.")
    folder = Folder.objects.filter(pk=folder_id).first()
    if folder is None:
        raise Http404("No such folder.")
    if Endpoint.objects.live().filter(model_folder=folder).exists():
        return folder
    validation = request.GET.get("validation", "")
    dry_run = dryrun.load_request(validation) if validation and UUID_RE.match(validation) else None
    if (
        dry_run is not None
        and dry_run.node == name
        and str(dry_run.config.get("folder")) == str(folder.pk)
        and not dryrun.is_finished(validation)
    ):
        return folder
    raise Http404("No live service (nor a dry run on this node) mounts this folder as its model folder.")


@require_GET
def manifest_view(request: HttpRequest, folder_id: str) -> HttpResponseBase:
    try:
        folder = _folder_for_node(request, folder_id)
        data = manifest.folder_manifest(actions.folder_fs(folder), str(folder.pk))
    except _Refused as exc:
        return JsonResponse({"detail": str(exc)}, status=exc.status)
    except fs.FsError as exc:
        return JsonResponse({"detail": str(exc)}, status=409)
    return JsonResponse(data)


@require_GET
def file_view(request: HttpRequest, folder_id: str, path: str) -> HttpResponseBase:
    try:
        folder = _folder_for_node(request, folder_id)
        handle = actions.folder_fs(folder).open_read(path)
    except _Refused as exc:
        return JsonResponse({"detail": str(exc)}, status=exc.status)
    except fs.PathNotFound as exc:
        return JsonResponse({"detail": str(exc)}, status=404)
    except fs.FsError as exc:
        return JsonResponse({"detail": str(exc)}, status=409)
    return download_response(request, handle, path)
