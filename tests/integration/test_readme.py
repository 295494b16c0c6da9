"""The README's snippets, and those of the docs pages its reference moved to, run as written
(against a test server), so neither can rot."""

from __future__ import annotations

import re
import subprocess

import pytest

from ..conftest import ROOT

README = (ROOT / "README.md").read_text()
# The pages made from the README's sections: their snippets are held to the same promise.
PAGES = ("README.md", "docs/calling.md", "docs/cameras.md", "docs/models.md", "docs/operations.md",
         "docs/shared-memory.md", "docs/tracking.md")
SNIPPETS = [(page, index, code) for page in PAGES
            for index, code in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S))
            if "kafka://" not in code]  # those need a broker: test_kafka_sink runs them


def test_readme_leads_with_the_two_commands():
    first_block = re.search(r"```\n(.*?)```", README, re.S).group(1)
    assert first_block.split("\n")[0].startswith("make run")
    assert first_block.split("\n")[1].startswith("make test")


def test_every_page_with_snippets_is_collected():
    assert {page for page, _, _ in SNIPPETS} >= {"README.md", "docs/calling.md", "docs/shared-memory.md",
                                                 "docs/tracking.md"}


SDK_PYTHON = ROOT / ".venv-sdk/bin/python"


@pytest.mark.parametrize(("page", "index", "snippet"), SNIPPETS,
                         ids=[f"{page}:{index + 1}" for page, index, _ in SNIPPETS])
def test_python_snippets_run(page, index, snippet, real_server, capsys, tmp_path):
    from pipeline.tools.samples import sample_bytes

    server = real_server
    code = (snippet.replace("localhost:8001", server.address)
            .replace("localhost:8000", f"127.0.0.1:{server.server.http_port}"))
    if "inference_sdk" in code:  # Roboflow's SDK lives in its own environment (make sdk-env)
        (tmp_path / "bus.jpg").write_bytes(sample_bytes("bus"))
        run = subprocess.run([str(SDK_PYTHON), "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "person" in run.stdout and "[1080, 810]" in run.stdout
        return
    exec(compile(code, f"{page} python snippet {index + 1}", "exec"), {"__name__": "readme"})
