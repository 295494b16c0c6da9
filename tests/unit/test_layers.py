"""The house's layering, checked on real imports, package by package:

- the core (``pipeline``'s own modules, ``pipeline.rle``, ``pipeline.proto``) never imports the
  frontends, the tools or the client;
- the frontends never import the tools or the client;
- the client never imports the frontends or the tools;
- the tools never import the frontends (they start servers as processes);
- the codec and the client import without torch (or SciPy, scikit-image), and decoding
  needs no numba.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from ..conftest import ROOT


def modules_of(package: str) -> list[str]:
    """Every module of a package folder (not its sub-packages' modules)."""
    folder = ROOT.joinpath(*package.split("."))
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(folder)])
                        if not m.ispkg and m.name != "__main__"]


CORE = [m for m in modules_of("pipeline") if m != "pipeline.convert"] + ["pipeline.rle", "pipeline.proto"]
PARTS = {
    "core": CORE,
    "frontends": modules_of("pipeline.frontends") + modules_of("pipeline.frontends.cameras"),
    "tools": [*modules_of("pipeline.tools"), "pipeline.convert"],
    "clients": [m for m in modules_of("clients") if m != "clients.__main__"],
}
NEVER = {  # part -> the parts it must never import
    "core": ("frontends", "tools", "clients"),
    "frontends": ("tools", "clients"),
    "clients": ("frontends", "tools"),
    "tools": ("frontends",),
}


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


def part_of(module: str) -> str | None:
    for part, modules in PARTS.items():
        if module in modules:
            return part
    return None


def test_every_module_belongs_to_one_part():
    assert len(PARTS["core"]) > 10 and len(PARTS["frontends"]) > 8 and len(PARTS["tools"]) > 5
    everything = [m for modules in PARTS.values() for m in modules]
    assert len(everything) == len(set(everything))


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
