"""The console's files, read as shipped: no markup from strings, nothing inline, nothing remote."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from callbridge.api.console import static_files

FILES = static_files()
SCRIPTS = {name: body.decode() for name, (body, _) in FILES.items() if name.endswith(".js")}

# Every way a script can turn a string into markup or code.
SINKS = [
    "innerHTML",
    "outerHTML",
    "insertAdjacentHTML",
    "document.write",
    "eval(",
    "new Function",
    'setTimeout("',
    "createContextualFragment",
    'setAttribute("style"',
    'setAttribute("on',
    "DOMParser",
    "srcdoc",
]


def test_every_file_is_packaged_with_its_type() -> None:
    shipped = {
        e.name
        for e in resources.files("callbridge.api").joinpath("static").iterdir()
        if e.is_file()
    }
    assert set(FILES) == shipped
    assert {"index.html", "app.js", "console.css"} <= shipped
    assert FILES["app.js"][1].startswith("text/javascript")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_never_build_markup_from_strings(name: str) -> None:
    text = SCRIPTS[name]
    found = [sink for sink in SINKS if sink in text]
    assert not found, f"{name} uses {found}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_import_only_shipped_files(name: str) -> None:
    for target in re.findall(r'from "([^"]+)"', SCRIPTS[name]):
        assert target.startswith("./"), f"{name} imports {target}: not a local file"
        assert target[2:] in FILES, f"{name} imports a missing {target}"


def test_the_page_has_nothing_inline_and_nothing_remote() -> None:
    html = FILES["index.html"][0].decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert "<style" not in html, "inline style"
    assert " style=" not in html, "inline style"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert not re.search(r"//|:", ref), f"remote reference {ref}"
        assert ref in FILES, f"missing {ref}"
    for name, (body, _) in FILES.items():
        text = body.decode()
        if name.endswith((".js", ".css")):
            assert not re.search(r"https?://", text), f"{name} refers to the network"
            assert "@import" not in text
