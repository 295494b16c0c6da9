"""The house's layering, checked on real imports: the core never imports the adapters, and the
codec and the client import without torch."""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import ROOT

CORE = ["pipeline.rle", "pipeline.batcher", "pipeline.stream_window", "pipeline.telemetry",
        "pipeline.engine", "pipeline.postprocess", "pipeline.runner", "pipeline.repository",
        "pipeline.images", "pipeline.schema", "pipeline.errors"]
ADAPTERS = ["pipeline.service", "pipeline.streaming", "pipeline.server", "pipeline.metrics",
            "pipeline.kserve", "pipeline.serving",
            "pipeline.http", "pipeline.__main__", "pipeline.proto", "clients"]


def loaded_after(*modules: str) -> set[str]:
    code = (f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout))


def test_the_core_never_imports_an_adapter():
    loaded = loaded_after(*CORE)
    assert not [m for m in loaded if m.split(".")[0] == "clients" or m.startswith(tuple(ADAPTERS))]


def test_the_codec_and_the_client_import_without_torch():
    for modules in (["pipeline.rle"], ["clients", "clients.cli", "clients.masks"]):
        loaded = loaded_after(*modules)
        assert not [m for m in loaded if m.split(".")[0] in ("torch", "scipy", "skimage")], modules
