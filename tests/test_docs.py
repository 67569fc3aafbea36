"""The documentation: the site builds strictly (a broken link, a missing page or a symbol
mkdocstrings cannot find fails it), and the README stays a short page whose relative links
all lead somewhere. Quick suite: the build takes about 15 s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250

# Inline links and images, [text](target "title"), and reference definitions, [id]: target.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _mkdocs() -> Path:
    path = Path(sys.executable).parent / "mkdocs"
    if not path.exists():
        pytest.fail(f"mkdocs is not installed next to {sys.executable}: rebuild the venv (make venv)")
    return path


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [str(_mkdocs()), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    for page in ("index.html", "architecture/index.html", "api/data/index.html", "changelog/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_the_readme_is_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the rest into docs/"


def _relative_links(markdown: str) -> list[str]:
    text = FENCE.sub("", markdown)
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    relative = []
    for target in targets:
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or target.startswith("#"):
            continue
        relative.append(target)
    return relative


def test_every_relative_readme_link_exists():
    links = _relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links to no file of the repository"
    missing = [link for link in links if not (ROOT / unquote(urlsplit(link).path)).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_link_check_sees_relative_links_only():
    markdown = (
        "[a](docs/index.md) [b](https://example.org/x.md) [c](#quick-start) ![d](docs/x.png)\n"
        '[e](CHANGELOG.md "title")\n[f]: docs/data.md\n```\n[g](inside/a/fence.md)\n```\n'
    )
    assert _relative_links(markdown) == ["docs/index.md", "docs/x.png", "CHANGELOG.md", "docs/data.md"]
