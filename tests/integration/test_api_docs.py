"""The API docs page works on an air-gapped install: Swagger UI comes from the package, not a CDN (issue 20)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest


@pytest.mark.django_db
def test_the_api_docs_page_loads_nothing_from_another_host(client: Any) -> None:
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assets = [s for s in sources if s.endswith((".js", ".css", ".png"))]
    assert assets, html  # the page does load Swagger UI's files...
    for url in sources:
        assert not re.match(r"(?:https?:)?//", url), f"{url} is fetched from another host"
    for url in assets:  # ...and every one of them is served here
        assert client.get(url).status_code == 200, url
    # The schema it shows is ours.
    assert client.get("/api/schema/").status_code == 200


@pytest.mark.django_db
def test_the_definition_schemas_are_published_to_anyone(client: Any) -> None:
    from serving.core import schemas

    for name, make in schemas.SCHEMAS.items():
        answer = client.get(f"/api/v1/schemas/{name}")
        assert answer.status_code == 200 and answer["Content-Type"].startswith("application/schema+json")
        assert json.loads(answer.content) == make()
    missing = client.get("/api/v1/schemas/nothing.json")
    assert missing.status_code == 404 and "model-definition.json" in missing.json()["detail"]
