"""The documents run: every ```python block of README.md and docs/*.md is executed (the blocks of one page in
order, in one namespace, in a scratch folder), and the user-facing documents hold no issue numbers, dated run
logs or machine paths, and link only to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# What a user document must not contain: the project's bookkeeping, dates of runs, paths of one machine.
FORBIDDEN = {
    "an issue number": re.compile(r"\b[Ii]ssue \d+|#\d{1,4}\b"),
    "a session word": re.compile(r"\b[Ss]top \d+|\b[Ss]uperseded\b|\bthis session\b"),
    "a date": re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    "a machine path": re.compile(r"(?<![\w.])/(tmp|work|home|root|Users)/"),
}


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("FXCONDENSA_CACHE_DIR", str(tmp_path / "cache"))  # latency tables: not the user's cache
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.name}, python block {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name}: python block {i + 1} failed: {exc!r}\n{code}") from exc


DOCUMENTS = [*PAGES, ROOT / "BENCHMARKS.md", *sorted((ROOT / "examples").glob("*.py"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_no_bookkeeping_in_user_documents(document):
    text = document.read_text()
    for what, pattern in FORBIDDEN.items():
        found = pattern.search(text)
        assert found is None, f"{document.name} holds {what}: {found.group(0)!r}; say it in user terms or drop it"


@pytest.mark.parametrize("document", [*PAGES, ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_relative_links_resolve(document):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
        if "://" not in target:
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which does not exist"


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
