"""Pages in Japanese (docs/architecture.md): the browser's Accept-Language or the language cookie picks ja,
the compiled catalog is used, and English stays the default."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from serving.actions import services
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"
"""


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        name="simple",
        usage_mode=Folder.UsageMode.MODEL,
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )


def japanese(personas: dict[str, Any], who: str | None = "owner") -> Client:
    client = Client()
    client.cookies[settings.LANGUAGE_COOKIE_NAME] = "ja"
    if who:
        client.force_login(personas[who])
    return client


def test_the_login_page_follows_accept_language(db: None) -> None:
    ja = Client(headers={"accept-language": "ja,en;q=0.5"}).get(reverse("login")).content.decode()
    assert '<html lang="ja">' in ja
    assert "ログイン" in ja and "ユーザー名" in ja and "パスワード" in ja
    assert "Username" not in ja
    en = Client(headers={"accept-language": "en-US,en;q=0.9"}).get(reverse("login")).content.decode()
    assert '<html lang="en">' in en and "Username" in en and "ログイン" not in en


def test_the_folder_pages_in_japanese(personas: dict[str, Any], folder: Folder) -> None:
    client = japanese(personas)
    page = client.get(reverse("storage:list") + "?tab=model").content.decode()
    assert "フォルダー" in page and "フォルダーを作成" in page and "使用モード" in page
    assert "このモデルを実行" in page  # the model store's "Run this model"
    explorer = client.get(reverse("storage:explorer", args=[folder.pk])).content.decode()
    assert "ファイルをアップロード" in explorer and "モデルサービス" in explorer and "モデル定義ファイル" in explorer


def test_the_service_pages_in_japanese(personas: dict[str, Any], folder: Folder) -> None:
    endpoint = services.do_create_service(acting_user=personas["owner"], name="echo-ja", folder=folder)
    client = japanese(personas)
    listing = client.get(reverse("serving:list")).content.decode()
    assert "モデルサービス" in listing and "サービス開始" in listing and "エンドポイント" in listing
    assert "echo-ja" in listing
    launcher = client.get(reverse("serving:new") + f"?folder={folder.pk}").content.decode()
    assert "推論ランタイムバリアント" in launcher and "レプリカ数" in launcher and "追加マウント" in launcher
    # The cluster fields say what multi-node and single-node do.
    hint = launcher.split('id="cluster-hint">')[1].split("</p>", maxsplit=1)[0]
    assert "マルチノードは" in hint and "シングルノードは" in hint
    detail = client.get(reverse("serving:detail", kwargs={"pk": endpoint.pk})).content.decode()
    assert "ルーティング" in detail and "トークンを生成" in detail and "自動スケーリングルール" in detail
    assert "Generate token" not in detail


def test_a_message_after_an_action_is_in_japanese(personas: dict[str, Any]) -> None:
    client = japanese(personas)
    response = client.post(reverse("storage:list"), {"name": "data-ja", "usage_mode": "data"}, follow=True)
    assert "フォルダー「data-ja」を作成しました。" in response.content.decode()
