"""The light and the dark theme (static/css/app.css): every text colour keeps WCAG AA contrast (4.5:1)
on the backgrounds it is used on, computed from the stylesheet's custom properties, so a colour
changed in one theme can not quietly become unreadable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSS = (Path(__file__).resolve().parents[2] / "static" / "css" / "app.css").read_text()

# (text, background) pairs the stylesheet uses for words.
PAIRS = [
    *[(text, bg) for text in ("fg", "muted", "accent", "ok", "warn", "bad") for bg in ("bg", "card")],
    ("accent", "tint-accent"),
    ("fg", "tint-accent"),
    ("muted", "tint-accent"),
    ("ok", "tint-ok"),
    ("warn", "tint-warn"),
    ("bad", "tint-bad"),
    ("on-strong", "accent"),
    ("on-strong", "bad"),
    ("code-fg", "code-bg"),
]


def _variables(block: str) -> dict[str, str]:
    return dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-fA-F]{3,6})", block))


def themes() -> dict[str, dict[str, str]]:
    light = _variables(re.search(r"^:root \{(.*?)\}", CSS, re.S | re.M).group(1))  # type: ignore[union-attr]
    dark_block = re.search(r"@media \(prefers-color-scheme: dark\) \{\s*:root \{(.*?)\}", CSS, re.S)
    assert dark_block is not None, "app.css has no dark theme"
    return {"light": light, "dark": {**light, **_variables(dark_block.group(1))}}


def luminance(colour: str) -> float:
    value = colour.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_the_formula_matches_known_values() -> None:
    assert contrast("#000", "#fff") == pytest.approx(21)
    assert contrast("#777", "#fff") == pytest.approx(4.48, abs=0.01)


def test_both_themes_define_every_colour_they_use() -> None:
    found = themes()
    for name, values in found.items():
        missing = {v for pair in PAIRS for v in pair} - set(values)
        assert not missing, f"the {name} theme lacks --{', --'.join(sorted(missing))}"
    # The dark theme really is dark, and it changes more than one colour.
    assert luminance(found["dark"]["bg"]) < 0.05 < luminance(found["light"]["bg"])
    assert sum(found["dark"][k] != found["light"][k] for k in found["light"]) >= 10


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize(("text", "background"), PAIRS)
def test_text_colours_meet_wcag_aa(theme: str, text: str, background: str) -> None:
    values = themes()[theme]
    ratio = contrast(values[text], values[background])
    assert ratio >= 4.5, (
        f"{theme} theme: --{text} {values[text]} on --{background} {values[background]} has contrast "
        f"{ratio:.2f}:1, below WCAG AA's 4.5:1; change one of them in static/css/app.css"
    )


def test_no_text_colour_is_fixed_outside_the_themes() -> None:
    """A literal colour for words or a background (other than the log/code panes, dark in both
    themes, and the share bar's fills) would not follow the dark theme."""
    rules = re.sub(r"/\*.*?\*/", "", CSS, flags=re.S)
    rules = re.sub(r"@media \(prefers-color-scheme: dark\) \{\s*:root \{.*?\}\s*\}", "", rules, flags=re.S)
    offenders = [
        line.strip()
        for line in rules.splitlines()
        if re.search(r"(?<![-\w])(color|background):\s*#", line)
        and not line.lstrip().startswith((":root", "--", "pre.log ", ".share-c"))
    ]
    assert not offenders, offenders
