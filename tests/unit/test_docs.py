"""docs/architecture.md matches the code: every module is on the page, every file it names
exists, and every ``module.name`` or ``Class.name`` it cites is defined."""

from __future__ import annotations

import importlib
import re

import pytest

from ..conftest import ROOT

PAGE = (ROOT / "docs/architecture.md").read_text()
SOURCES = sorted(p for folder in ("pipeline", "clients") for p in (ROOT / folder).rglob("*.py")
                 if p.name not in ("__init__.py", "__main__.py") and "_pb2" not in p.name)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_on_the_page(path):
    if path.name == "convert.py" and path.parent.name == "pipeline":
        return  # the `python -m pipeline.convert` entry point of tools/convert.py
    assert path.name in PAGE


def test_every_file_the_page_names_exists():
    named = set(re.findall(r"([\w/]+\.py)\b", PAGE))
    everything = [str(p.relative_to(ROOT)) for folder in ("pipeline", "clients", "model_repository",
                                                          "tests", "benchmarks", "docker")
                  for p in (ROOT / folder).rglob("*.py")]
    missing = [n for n in named if not any(f == n or f.endswith("/" + n) for f in everything)]
    assert not missing, missing


def test_every_name_the_page_cites_is_defined():
    modules = {}
    for path in SOURCES:
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[path.stem] = importlib.import_module(dotted)
    cited = {c for c in re.findall(r"`([A-Z_a-z]\w*)\.([a-z_A-Z]\w*)", PAGE) if c[1] != "py"}
    assert len(cited) > 10
    for owner, name in cited:
        if owner in modules:
            assert hasattr(modules[owner], name), f"{owner}.{name}"
        else:
            classes = [getattr(m, owner) for m in modules.values() if hasattr(m, owner)]
            assert classes and any(hasattr(c, name) for c in classes), f"{owner}.{name}"


def test_the_security_page_names_only_real_settings():
    """docs/security.md promises behaviour by flag: each one it names is a server setting."""
    import dataclasses

    from pipeline.frontends.config import ServerConfig

    page = (ROOT / "docs/security.md").read_text()
    settings = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ServerConfig)}
    named = set(re.findall(r"`(--[a-z][a-z-]*)", page))
    assert len(named) > 15 and named <= settings, named - settings
