"""The documentation cannot rot: every ```python block of docs/**/*.md and of README.md runs, and the site builds.

Each page runs as one script in a fresh Python process (JAX fixes its devices when it starts, and a page may ask
for several), its blocks in order in one namespace, so a block may use what an earlier block of the same page
defined. A failure's traceback names the page and the line of the markdown file that failed.

Markers: HTML comments, which neither the site nor GitHub shows.

    <!-- docs-test: setup
    code run before the page's first block, hidden from readers (a stand-in model, a temporary folder)
    -->
    <!-- docs-test: skip: REASON -->          the next ```python block is only compiled, not run; REASON (required)
                                              says why
    <!-- docs-test: requires NAME, ... -->    the page runs only where every NAME is available: `deis_jax.X` (an
                                              API not merged yet: the page's test goes live once it is) or a
                                              module that must import (e.g. diffusers); skipped, naming it, else
    <!-- docs-test: devices N -->             the page runs with N host CPU devices (XLA_FLAGS)

The README's blocks use names its prose introduces (`model_fn`, `key`, `shape`, ...): README_SETUP below defines
them, so the README needs no markers (it may use them all the same), and runs with README_DEVICES devices, for its
sharding example.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import deis_jax

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [README]

README_DEVICES = 4
README_SETUP = """
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from flax import nnx
import deis_jax

def model_fn(x, t):                                  # a smooth stand-in for a noise-prediction network
    return jnp.tanh(x) * (0.5 + t / 1000)

def denoiser(x, sigma):                              # the Gaussian N(0, I) data's exact denoiser D(x, sigma)
    return x / (1 + sigma**2)

class MyUNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 3, kernel_size=(3, 3), rngs=rngs)
    def __call__(self, x, t):
        return self.conv(x) * (1 + t / 1000)

class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        return nn.Conv(3, (3, 3))(x) * (1 + t / 1000)

def cond_model(x, t, cond):                          # class-conditional stand-in: cond is [batch] labels
    return jnp.tanh(x) + 0.1 * cond[:, None, None, None]

key = jax.random.key(0)
shape = (4, 8, 8, 3)
x = jax.random.normal(jax.random.key(1), shape)
image = jnp.tanh(jax.random.normal(jax.random.key(2), shape))
noise = jax.random.normal(jax.random.key(3), shape)
cond, uncond = jnp.arange(4.0), jnp.zeros(4)
model = MyUNet(rngs=nnx.Rngs(0))
linen_model = LinenNet()
params = linen_model.init(jax.random.key(4), x, 0)
"""

MARKER = re.compile(r"\s*<!-- docs-test: (?P<kind>[\w-]+)(?P<rest>.*)$")
FENCE = re.compile(r"(?P<indent> *)```(?P<lang>\S*)\s*$")

# Run a page: [absolute path, first line, code] per block; compiled with the page's line numbers, so a traceback
# shows the failing line of the markdown file.
RUNNER = r"""
import json, sys
namespace = {"__name__": "__main__"}
for path, line, code in json.load(open(sys.argv[1])):
    exec(compile("\n" * (line - 1) + code, path, "exec"), namespace)
"""


@dataclasses.dataclass
class Page:
    blocks: list[tuple[int, str]]  # (first line of the code, code), setup first
    skipped: list[tuple[int, str, str]]  # (first line, reason, code): compiled, not run
    requires: list[str]
    devices: int


def parse(path: Path) -> Page:
    """The page's code in order (hidden setup, then the ```python blocks), its skipped blocks and its needs."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = Page([], [], [], 1)
    skip_reason, i = None, 0
    while i < len(lines):
        marker, fence = MARKER.match(lines[i]), FENCE.match(lines[i])
        if marker:
            kind, rest = marker["kind"], marker["rest"].strip()
            if kind == "setup":
                end = lines.index("-->", i + 1)
                page.blocks.append((i + 2, "\n".join(lines[i + 1:end])))
                i = end
            elif not rest.endswith("-->"):
                raise ValueError(f"{path}:{i + 1}: a docs-test marker other than setup fits on one line")
            elif kind == "skip":
                skip_reason = rest[:-3].strip().lstrip(":").strip()
                if not skip_reason:
                    raise ValueError(f"{path}:{i + 1}: 'docs-test: skip' needs a reason: 'skip: REASON'")
            elif kind == "requires":
                page.requires += [n.strip() for n in rest[:-3].split(",") if n.strip()]
            elif kind == "devices":
                page.devices = int(rest[:-3])
            else:
                raise ValueError(f"{path}:{i + 1}: unknown marker 'docs-test: {kind}' (setup, skip, requires, devices)")
        elif fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            code = textwrap.dedent("\n".join(lines[i + 1:end]))
            if skip_reason is not None:
                if fence["lang"] != "python":
                    raise ValueError(f"{path}:{i + 1}: 'docs-test: skip' must come right before a python block")
                page.skipped.append((i + 2, skip_reason, code))
                skip_reason = None
            elif fence["lang"] == "python":
                page.blocks.append((i + 2, code))
            i = end
        i += 1
    if skip_reason is not None:
        raise ValueError(f"{path}: 'docs-test: skip' at the end of the page, before no python block")
    return page


def missing(name: str) -> bool:
    if name.startswith("deis_jax."):
        return not hasattr(deis_jax, name.removeprefix("deis_jax."))
    return importlib.util.find_spec(name) is None


def run_page(path: Path, page: Page, setup: tuple[str, str] | None, tmp_path: Path) -> None:
    blocks = [[str(path), line, code] for line, code in page.blocks]
    if setup is not None:
        blocks.insert(0, [setup[0], 1, setup[1]])
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if page.devices > 1:
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={page.devices}", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{os.path.relpath(path, ROOT)}: an example failed\n{result.stderr[-6000:]}"


PAGES_WITH_CODE = [p for p in PAGES if "```python" in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_examples_run(path, tmp_path):
    page = parse(path)
    text = path.read_text(encoding="utf-8")
    assert len(page.blocks) + len(page.skipped) - text.count("<!-- docs-test: setup") == text.count("```python")
    for line, _, code in page.skipped:
        compile("\n" * (line - 1) + code, str(path), "exec")
    absent = [name for name in page.requires if missing(name)]
    if absent:
        pytest.skip(f"needs {', '.join(absent)}")
    if path == README:
        page.devices = README_DEVICES
    setup = ("tests/test_docs.py:README_SETUP", README_SETUP) if path == README else None
    run_page(path, page, setup, tmp_path)


def test_parse_finds_setup_blocks_skips_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        # Title
        <!-- docs-test: requires deis_jax.sample, numpy -->
        <!-- docs-test: devices 2 -->
        <!-- docs-test: setup
        a = 1
        -->
        ```python
        b = a + 1
        ```
        - a list item:

          ```python
          c = b
          ```
        <!-- docs-test: skip: needs a GPU -->
        ```python
        raise RuntimeError
        ```
        ```bash
        echo not python
        ```
        """))
    parsed = parse(page)
    assert parsed.blocks == [(5, "a = 1"), (8, "b = a + 1"), (13, "c = b")]
    assert parsed.skipped == [(17, "needs a GPU", "raise RuntimeError")]
    assert (parsed.requires, parsed.devices) == (["deis_jax.sample", "numpy"], 2)
    run_page(page, parsed, None, tmp_path)
    page.write_text("<!-- docs-test: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        parse(page)
    page.write_text("<!-- docs-test: skipp: typo -->\n")
    with pytest.raises(ValueError, match="unknown marker"):
        parse(page)
    page.write_text("```python\nassert 1 == 2\n```\n")
    with pytest.raises(AssertionError, match=r"(?s)page\.md\", line 2.*assert 1 == 2"):
        run_page(page, parse(page), None, tmp_path)


def test_api_reference_lists_every_export():
    """docs/api/index.md has a `::: deis_jax.NAME` entry for each name of `deis_jax.__all__`, and no other."""
    text = (ROOT / "docs" / "api" / "index.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: deis_jax\.(\w+)$", text, re.MULTILINE))
    exported = set(deis_jax.__all__)
    assert not exported - documented, f"add to docs/api/index.md: {sorted(exported - documented)}"
    assert not documented - exported, f"not exported any more: {sorted(documented - exported)}"


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: broken links and anchors, pages missing from the nav, includes of absent files or
    sections and unresolvable API references fail it (CI installs the `docs` extra; skipped without it)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8").count("deis_jax.sample_from_noise")
