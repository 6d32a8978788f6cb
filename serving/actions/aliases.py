"""The writers of model aliases (issue 17; proxy/gateway.py): one gateway model name that points at
several services with weights. Create, modify and delete; each change reaches every proxy after the
commit over the routing table's pub/sub channel (serving/bus/routing.py)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.models import Project, User
from serving.actions.validators import MODEL_NAME_RE
from serving.bus import routing
from serving.models import Endpoint, ModelAlias, ModelAliasBackend, served_model_names

MAX_BACKENDS = 16
MAX_WEIGHT = 1000


def check_alias_name(name: Any, *, owner_id: Any, project_id: Any, alias_id: Any = None) -> str:
    """A free model name in the alias's scope: no other alias and no live service answers to it."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ValidationError(
            {
                "name": f"{name!r} is not a model name: use up to 128 letters, digits and . _ : / @ + -, "
                "starting with a letter or digit."
            }
        )
    aliases = ModelAlias.objects.filter(name=name).exclude(pk=alias_id)
    aliases = aliases.filter(project_id=project_id) if project_id else aliases.filter(owner_id=owner_id, project=None)
    if aliases.exists():
        raise ValidationError({"name": f"An alias {name!r} exists already here: choose another name, or modify it."})
    services = Endpoint.objects.live()
    services = (
        services.filter(project_id=project_id) if project_id else services.filter(owner_id=owner_id, project=None)
    )
    for service in services.only("name", "environ", "model_names"):
        if name in served_model_names(service):
            raise ValidationError(
                {
                    "name": f"Service {service.name!r} already serves {name!r}: model names are unique per "
                    "project; choose another name for the alias."
                }
            )
    return name


def check_backends(backends: list[tuple[Endpoint, int]], *, owner_id: Any, project_id: Any) -> None:
    """1 to 16 distinct live services of the alias's scope, each with a weight of 1 to 1000."""
    if not backends:
        raise ValidationError({"backends": 'Give at least one backend: [{"service": "<id>", "weight": 1}].'})
    if len(backends) > MAX_BACKENDS:
        raise ValidationError({"backends": f"Give at most {MAX_BACKENDS} backends."})
    seen: set[Any] = set()
    for endpoint, weight in backends:
        if endpoint.pk in seen:
            raise ValidationError({"backends": f"Service {endpoint.name!r} is given twice; give each once."})
        seen.add(endpoint.pk)
        if not 1 <= weight <= MAX_WEIGHT:
            raise ValidationError({"backends": f"The weight of {endpoint.name!r} is {weight}: from 1 to {MAX_WEIGHT}."})
        if endpoint.lifecycle != Endpoint.Lifecycle.CREATED:
            raise ValidationError({"backends": f"Service {endpoint.name!r} is terminated; choose a live one."})
        in_scope = (
            endpoint.project_id == project_id
            if project_id
            else (endpoint.project_id is None and endpoint.owner_id == owner_id)
        )
        if not in_scope:
            raise ValidationError(
                {
                    "backends": f"Service {endpoint.name!r} is not in the alias's "
                    + ("project" if project_id else "own services (no project)")
                    + ": an alias points only at services of its project (or, without one, its owner's)."
                }
            )


def _set_backends(alias: ModelAlias, backends: list[tuple[Endpoint, int]]) -> None:
    alias.backends.all().delete()
    ModelAliasBackend.objects.bulk_create(
        ModelAliasBackend(alias=alias, endpoint=endpoint, weight=weight, position=i)
        for i, (endpoint, weight) in enumerate(backends)
    )


@transaction.atomic
def do_create_alias(
    *, acting_user: User, name: str, backends: list[tuple[Endpoint, int]], project: Project | None = None
) -> ModelAlias:
    """A new alias. ``backends``: (service, weight) in order; the caller checked the user may read each."""
    project_id = project.pk if project is not None else None
    check_alias_name(name, owner_id=acting_user.pk, project_id=project_id)
    check_backends(backends, owner_id=acting_user.pk, project_id=project_id)
    alias = ModelAlias.objects.create(name=name, owner=acting_user, project=project)
    _set_backends(alias, backends)
    transaction.on_commit(lambda: routing.publish_alias_safely(str(alias.pk)))
    return alias


@transaction.atomic
def do_modify_alias(
    alias: ModelAlias, *, name: str | None = None, backends: list[tuple[Endpoint, int]] | None = None
) -> ModelAlias:
    if name is not None and name != alias.name:
        alias.name = check_alias_name(name, owner_id=alias.owner_id, project_id=alias.project_id, alias_id=alias.pk)
        alias.save(update_fields=["name"])
    if backends is not None:
        check_backends(backends, owner_id=alias.owner_id, project_id=alias.project_id)
        _set_backends(alias, backends)
    transaction.on_commit(lambda: routing.publish_alias_safely(str(alias.pk)))
    return alias


@transaction.atomic
def do_delete_alias(alias: ModelAlias) -> None:
    alias_id = str(alias.pk)
    alias.delete()
    transaction.on_commit(lambda: routing.publish_alias_safely(alias_id))
