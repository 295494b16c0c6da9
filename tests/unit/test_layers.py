"""The house's layering, checked on real imports, package by package. The parts, top down:

    frontends (protocols) -> cameras (ingest, sinks) -> serving (the request life) -> core

- a part never imports a part above it, nor the tools or the client;
- the client never imports the server's parts or the tools;
- the tools never import the server's parts (they start servers as processes);
- every module of ``pipeline`` and ``clients`` is in exactly one part, by its package: a new
  package fails here until it is placed;
- the codec and the client import without torch (or SciPy, scikit-image), and decoding
  needs no numba.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from ..conftest import ROOT

# part -> the packages whose modules it holds (a package's own sub-packages are listed apart)
PACKAGES = {
    "core": ("pipeline", "pipeline.rle", "pipeline.proto", "pipeline.runners", "pipeline.heads"),
    "serving": ("pipeline.serving",),
    "cameras": ("pipeline.cameras",),
    "frontends": ("pipeline.frontends",),
    "tools": ("pipeline.tools",),
    "clients": ("clients",),
}
ENTRY_POINTS = {"pipeline.convert": "tools"}  # ``python -m pipeline.convert``: a tool in the core's folder
NEVER = {  # part -> the parts it must never import
    "core": ("serving", "cameras", "frontends", "tools", "clients"),
    "serving": ("cameras", "frontends", "tools", "clients"),
    "cameras": ("frontends", "tools", "clients"),
    "frontends": ("tools", "clients"),
    "clients": ("serving", "cameras", "frontends", "tools"),
    "tools": ("serving", "cameras", "frontends"),
}


def every_module() -> list[str]:
    """Every module under pipeline/ and clients/, packages included (not ``__main__``, not
    generated code)."""
    found = []
    for top in ("pipeline", "clients"):
        found.append(top)
        for info in pkgutil.walk_packages([str(ROOT / top)], prefix=f"{top}."):
            if not info.name.endswith("__main__") and "_pb2" not in info.name:
                found.append(info.name)
    return found


def part_of(module: str) -> str | None:
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    package = module if (ROOT / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]
    for part, packages in PACKAGES.items():
        if package in packages:
            return part
    return None


PARTS = {part: [m for m in every_module() if part_of(m) == part] for part in PACKAGES}


def importer(modules: list[str]) -> subprocess.Popen:
    """A fresh interpreter that imports ``modules`` and prints every module then loaded."""
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def loaded(process: subprocess.Popen) -> set[str]:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return set(json.loads(out))


def loaded_after(*modules: str) -> set[str]:
    return loaded(importer(list(modules)))


def test_every_module_belongs_to_one_part():
    unplaced = [m for m in every_module() if part_of(m) is None]
    assert not unplaced, f"modules in no part (add their package to PACKAGES): {unplaced}"
    assert all(PARTS[part] for part in PACKAGES)
    assert "pipeline.runners.calibration" in PARTS["core"] and "pipeline.serving.life" in PARTS["serving"]


def test_an_unplaced_package_is_found():
    assert part_of("pipeline.somewhere_new.module") is None
    assert part_of("pipeline.cameras.sinks") == "cameras" and part_of("pipeline.convert") == "tools"


def test_a_part_never_imports_what_it_must_not():
    importers = {part: importer(PARTS[part]) for part in NEVER}  # side by side: they are slow
    for part, process in importers.items():
        crossing = sorted(m for m in loaded(process) if part_of(m) in NEVER[part])
        assert not crossing, f"{part} imports {crossing}"


def test_the_codec_and_the_client_import_without_torch():
    for modules in (["pipeline.rle"], PARTS["clients"]):
        loaded = loaded_after(*modules)
        assert not [m for m in loaded if m.split(".")[0] in ("torch", "scipy", "skimage")], modules


def test_decoding_needs_no_numba():
    code = ("import sys; from pipeline import rle; "
            "rle.decode({'size': [2, 2], 'counts': [1, 2, 1]}); print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
