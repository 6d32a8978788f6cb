"""A service that really serves: REST API -> workers -> replicas -> proxy -> curl and the openai client."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from tests.factories import FolderFactory
from tests.live import ROOT, LiveSystem, wait_for


def call(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"BackendAI {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_llm_echo_through_the_proxy(live_system: LiveSystem, api: Any, personas: dict[str, Any], settings: Any) -> None:
    proxy = live_system.start_proxy()
    settings.SERVING_PROXY_URL = proxy
    source = ROOT / "examples" / "llm-echo"
    folder = FolderFactory(
        owner=personas["owner"], name="llm-echo", files={p.name: p.read_text() for p in source.iterdir() if p.is_file()}
    )
    created = (
        api("owner")
        .post("/api/v1/services/", {"name": "echo", "folder": str(folder.pk), "replicas": 2}, format="json")
        .json()
    )
    sid, url = created["id"], created["url"]
    assert url == f"{proxy}/e/{created['slug']}/"

    def healthy() -> bool:
        body = api("owner").get(f"/api/v1/services/{sid}/").json()
        return sum(r["status"] == "healthy" for r in body["routes"]) == 2

    try:
        wait_for(healthy, timeout=30, what="2 healthy replicas")
    except AssertionError:
        print(json.dumps(api("owner").get(f"/api/v1/services/{sid}/").json(), indent=1))
        raise
    assert call(url + "v1/models") == 401  # private by default

    issued = api("owner").post(f"/api/v1/services/{sid}/tokens/", {}, format="json").json()
    token = issued["token"]
    # A token works as soon as the call that created it has returned; a healthy route takes traffic
    # within 1 s of the API reporting it.
    deadline = time.monotonic() + 1.0
    wait_for(
        lambda: call(url + "v1/models", token) == 200,
        timeout=1.0,
        interval=0.02,
        what="token + route live",
        promise=True,
    )
    assert time.monotonic() <= deadline + 0.05

    from openai import OpenAI

    client = OpenAI(base_url=url + "v1", api_key=token)
    assert [m.id for m in client.models.list()] == ["llm-echo"]
    reply = client.chat.completions.create(model="llm-echo", messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == "hello there"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="llm-echo", messages=[{"role": "user", "content": "stream me please"}], stream=True
        )
        if c.choices
    )
    assert streamed == "stream me please"

    # Revoked: refused within 1 s.
    assert api("owner").delete(f"/api/v1/services/{sid}/tokens/{issued['id']}/").status_code == 204
    wait_for(
        lambda: call(url + "v1/models", token) == 401,
        timeout=1.0,
        interval=0.02,
        what="revocation in 1 s",
        promise=True,
    )

    # Open to public: no token needed.
    api("owner").patch(f"/api/v1/services/{sid}/", {"open_to_public": True}, format="json")
    wait_for(lambda: call(url + "v1/models") == 200, timeout=2.0, interval=0.05, what="public")
    with urllib.request.urlopen(
        urllib.request.Request(
            url + "v1/completions",
            data=json.dumps({"prompt": "a b"}).encode(),
            headers={"Content-Type": "application/json"},
        ),
        timeout=5,
    ) as response:
        assert json.loads(response.read())["choices"][0]["text"] == "a b"
