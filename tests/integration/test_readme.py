"""The README's snippets run as written (against a test server), so the README cannot rot."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest

from pipeline.frontends.config import ServerConfig

from ..conftest import ROOT

README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_leads_with_the_two_commands():
    first_block = re.search(r"```\n(.*?)```", README, re.S).group(1)
    assert first_block.split("\n")[0].startswith("make run")
    assert first_block.split("\n")[1].startswith("make test")


SDK_PYTHON = ROOT / ".venv-sdk/bin/python"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_python_snippets_run(index, real_server, capsys, tmp_path):
    from pipeline.tools.samples import sample_bytes

    server = real_server
    code = (SNIPPETS[index].replace("localhost:8001", server.address)
            .replace("localhost:8000", f"127.0.0.1:{server.server.http_port}"))
    if "inference_sdk" in code:  # Roboflow's SDK lives in its own environment (make sdk-env)
        (tmp_path / "bus.jpg").write_bytes(sample_bytes("bus"))
        run = subprocess.run([str(SDK_PYTHON), "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "person" in run.stdout and "[1080, 810]" in run.stdout
        return
    exec(compile(code, f"README.md python snippet {index + 1}", "exec"), {"__name__": "readme"})


def test_configuration_table_lists_every_setting():
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        assert f"`{flag}`" in README or f"`{flag}`," in README, flag
        assert f"RLE_SERVING_{field.name.upper()}" in README or field.name == "tls_key", field.name
