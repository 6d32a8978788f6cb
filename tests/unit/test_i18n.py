"""The Japanese catalog (docs/architecture.md): complete, not fuzzy, placeholders kept, and the committed .mo
compiled from the committed .po (a fresh clone runs without gettext, so a stale .mo would silently show
English or old text)."""

from __future__ import annotations

import ast
import gettext
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCALE = ROOT / "locale"
PO = LOCALE / "ja" / "LC_MESSAGES" / "django.po"
MO = LOCALE / "ja" / "LC_MESSAGES" / "django.mo"
# What `makemessages` is run with (README / the translation work): everything but these directories.
IGNORED = [".venv", "var", "tests", "examples", "bench", "locale", "node_modules"]

_KEYWORD = re.compile(r'^(msgctxt|msgid|msgid_plural|msgstr(?:\[\d+\])?)\s+(".*")$')
_PLACEHOLDER = re.compile(r"%\([A-Za-z_][A-Za-z0-9_]*\)[sdfr]|%%|\{[A-Za-z_][A-Za-z0-9_]*\}")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")


@dataclass
class Entry:
    line: int
    flags: set[str] = field(default_factory=set)
    obsolete: bool = False
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def msgid(self) -> str:
        return self.fields.get("msgid", "")

    @property
    def translations(self) -> list[str]:
        return [value for key, value in sorted(self.fields.items()) if key.startswith("msgstr")]


def parse_po(text: str) -> list[Entry]:
    """A .po file as entries; just enough of the format for the catalogs makemessages writes."""
    entries: list[Entry] = []
    current: Entry | None = None
    key = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            current = None
            continue
        if current is None:
            current = Entry(line=number)
            entries.append(current)
        if line.startswith("#~"):
            current.obsolete = True
        elif line.startswith("#,"):
            current.flags.update(flag.strip() for flag in line[2:].split(","))
        elif line.startswith("#"):
            continue
        elif match := _KEYWORD.match(line):
            key = match.group(1)
            current.fields[key] = ast.literal_eval(match.group(2))
        elif line.startswith('"') and key:
            current.fields[key] += ast.literal_eval(line)
        else:
            raise AssertionError(f"{PO.name}:{number}: can not parse {raw!r}")
    return [entry for entry in entries if "msgid" in entry.fields]


def _messages() -> list[Entry]:
    return [entry for entry in parse_po(PO.read_text(encoding="utf-8")) if entry.msgid and not entry.obsolete]


def _where(entry: Entry) -> str:
    return f"{PO.relative_to(ROOT)}:{entry.line} {entry.msgid[:60]!r}"


def test_the_catalog_exists_and_is_japanese() -> None:
    assert PO.is_file(), "run makemessages -l ja (see README) and translate"
    assert MO.is_file(), "run compilemessages -l ja and commit the .mo next to the .po"
    header = parse_po(PO.read_text(encoding="utf-8"))[0]
    assert header.msgid == ""
    assert "fuzzy" not in header.flags, "the header is still marked fuzzy"
    assert "Language: ja\n" in header.fields["msgstr"]
    assert "Plural-Forms: nplurals=1; plural=0;" in header.fields["msgstr"]
    assert len(_messages()) > 100


def test_every_entry_is_translated_and_not_fuzzy() -> None:
    messages = _messages()
    untranslated = [_where(e) for e in messages if not e.translations or not all(t.strip() for t in e.translations)]
    fuzzy = [_where(e) for e in messages if "fuzzy" in e.flags]
    assert not untranslated, "untranslated:\n" + "\n".join(untranslated)
    assert not fuzzy, "fuzzy (check the translation, then remove the flag):\n" + "\n".join(fuzzy)


def test_translations_keep_placeholders_and_markup() -> None:
    broken = []
    for entry in _messages():
        for translation in entry.translations:
            for pattern in (_PLACEHOLDER, _TAG):
                if sorted(pattern.findall(entry.msgid)) != sorted(pattern.findall(translation)):
                    broken.append(f"{_where(entry)} -> {translation!r}")
    assert not broken, "placeholders or HTML tags differ:\n" + "\n".join(broken)


def test_the_mo_file_is_compiled_from_this_po_file() -> None:
    # The content, not the modification time: git does not keep mtimes, a clone has arbitrary ones.
    with MO.open("rb") as handle:
        catalog = dict(gettext.GNUTranslations(handle)._catalog)  # type: ignore[attr-defined]
    catalog.pop("", None)
    expected: dict[object, str] = {}
    for entry in _messages():
        if "msgid_plural" in entry.fields:
            for index, translation in enumerate(entry.translations):
                expected[(entry.msgid, index)] = translation
        else:
            expected[entry.msgid] = entry.fields["msgstr"]
    stale = sorted(repr(k)[:70] for k in expected.keys() | catalog.keys() if expected.get(k) != catalog.get(k))
    assert not stale, "the .mo does not match the .po; run compilemessages -l ja:\n" + "\n".join(stale[:20])


@pytest.mark.skipif(shutil.which("xgettext") is None, reason="GNU gettext (xgettext) is not installed")
def test_every_marked_string_is_in_the_catalog(
    tmp_path: Path, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """makemessages over a copy of the sources finds no string that the committed catalog lacks.

    A copy, because makemessages writes next to any ``locale`` directory above the files it reads."""
    from django.core.management import call_command

    sources = tmp_path / "src"
    sources.mkdir()
    for path in ROOT.iterdir():
        if path.name in IGNORED or path.name.startswith("."):
            continue
        if path.is_dir():
            shutil.copytree(path, sources / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.suffix == ".py":
            shutil.copy(path, sources)
    settings.LOCALE_PATHS = [tmp_path / "locale"]  # type: ignore[attr-defined]
    monkeypatch.chdir(sources)
    call_command("makemessages", locale=["ja"], verbosity=0, no_location=True)
    fresh = parse_po((tmp_path / "locale" / "ja" / "LC_MESSAGES" / "django.po").read_text(encoding="utf-8"))
    missing = sorted({entry.msgid for entry in fresh if entry.msgid} - {entry.msgid for entry in _messages()})
    assert not missing, "strings missing from locale/ja (run makemessages -l ja, translate):\n" + "\n".join(missing)
