"""mkdocs hooks (`hooks:` in mkdocs.yml): text and pictures that live outside docs/ appear on the site from their
one source, never copied.

- A line `<!-- include: PATH -->` is replaced by the file PATH (relative to the repository root), and
  `<!-- include: PATH#HEADING -->` by the body of its section HEADING: the lines after that heading up to the next
  heading of any level. A missing file or heading fails the build.
- ASSETS: pictures of the repository, served at the given paths of the site.
"""

from __future__ import annotations

import os
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = {
    "img/digits_grid.png": "examples/digits_grid.png",
    "img/accuracy.png": "benchmarks/accuracy.png",
    "img/digits_fid.png": "benchmarks/digits_fid.png",
}
INCLUDE = re.compile(r"^<!-- include: (?P<path>[^#]+?)(?:#(?P<heading>.+?))? -->$", re.MULTILINE)
HEADING = re.compile(r"#{1,6} (.+)")
FENCE = re.compile(r"\s*(```|~~~)")


def section(text: str, heading: str, path: str) -> str:
    """The body of the section `heading` of a markdown text (headings inside code fences do not count)."""
    body: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        match = None if fenced else HEADING.fullmatch(line)
        if match and body is not None:
            break
        if body is not None:
            body.append(line)
        elif match and match.group(1).strip() == heading:
            body = []
    if body is None:
        raise PluginError(f"{path} has no heading {heading!r}")
    return "\n".join(body).strip("\n")


def include(match: re.Match) -> str:
    path = os.path.join(ROOT, match["path"])
    if not os.path.isfile(path):
        raise PluginError(f"include: {match['path']} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return section(text, match["heading"], match["path"]) if match["heading"] else text


def on_page_markdown(markdown: str, **kwargs) -> str:
    return INCLUDE.sub(include, markdown)


def on_files(files, config):
    for uri, path in ASSETS.items():
        files.append(File.generated(config, uri, abs_src_path=os.path.join(ROOT, path)))
    return files
