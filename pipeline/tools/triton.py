"""Run the REAL NVIDIA Triton Inference Server on our model repository (``make triton``).

The tritonserver 2.51 binary and its Python backend come inside the PyPI wheel
``nvidia-pytriton==0.7.0`` (unzipped, never pip-installed: that would drag numpy < 2 into the
project's environment). It runs on a CPU without CUDA. The pipeline model executes in the
Python backend, in a separate environment (``.venv-triton``, numpy < 2; see
docker/triton/requirements-models.txt), and loads the same TorchScript network file.
On a GPU machine, NGC's Triton container runs the same repository (see docs/operations.md, "NVIDIA Triton").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..repository import DEFAULT_MODEL
from .fetch import DEFAULT_CACHE, fetch_wheel

WHEEL = "nvidia-pytriton==0.7.0"
DEFAULT_MODELS = (DEFAULT_MODEL,)


def unpack(cache: Path = DEFAULT_CACHE) -> Path:
    """The unzipped wheel (once): holds pytriton/tritonserver and nvidia_pytriton.libs."""
    target = cache.parent / "tritonserver"
    binary = target / "pytriton/tritonserver/bin/tritonserver"
    if not binary.exists():
        wheel = fetch_wheel(WHEEL, cache)
        partial = target.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.replace(target)
    for path in [binary, *(target / "pytriton/tritonserver/python_backend_stubs").glob("*/triton_python_backend_stub")]:
        path.chmod(0o755)
    return target


def backend_dir(root: Path, python: Path) -> Path:
    """A writable backends folder with the Python backend and the stub for python's version."""
    version = subprocess.run([str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    server = root / "pytriton/tritonserver"
    backends = root / f"backends-{version}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (server / "backends/python/libtriton_python.so",
                   server / "backends/python/triton_python_backend_utils.py",
                   server / f"python_backend_stubs/{version}/triton_python_backend_stub"):
        if not source.exists():
            raise FileNotFoundError(f"{source}: not in {WHEEL} (Python {version} unsupported?)")
        shutil.copy2(source, python_dir / source.name)
    return backends


def command(repository: Path, grpc_port: int, http_port: int, python: Path,
            models=DEFAULT_MODELS, cache: Path = DEFAULT_CACHE) -> tuple[list[str], dict]:
    """(argv, environment) that start tritonserver serving ``models`` from ``repository``."""
    root = unpack(cache)
    backends = backend_dir(root, python)
    libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(root / "nvidia_pytriton.libs"), libdir, env.get("LD_LIBRARY_PATH")) if p)
    # The stub finds the models' interpreter (and so its site-packages) on PATH.
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    argv = [
        str(root / "pytriton/tritonserver/bin/tritonserver"),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={backends}",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
        "--pinned-memory-pool-byte-size=0",
        "--allow-metrics=false",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        "--exit-timeout-secs=5",
        "--disable-auto-complete-config",
        "--model-control-mode=explicit",
        *(f"--load-model={m}" for m in models),
    ]
    return argv, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.triton",
        description="Start the real NVIDIA Triton server (from the nvidia-pytriton wheel) on "
        "the model repository, serving the pipeline model through its Python backend.",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int, default=8101, help="default 8101 (ours is 8001)")
    parser.add_argument("--http-port", type=int, default=8100)
    parser.add_argument("--python", type=Path, default=Path(".venv-triton/bin/python"),
                        help="interpreter of the models' environment (numpy < 2)")
    parser.add_argument("--model", action="append", help="model(s) to load (default instance_segmentation)")
    args = parser.parse_args(argv)
    if not args.python.exists():
        print(f"error: {args.python} is missing; run `make triton-env`", file=sys.stderr)
        return 2
    argv, env = command(args.model_repository, args.grpc_port, args.http_port,
                        args.python.absolute(), tuple(args.model or DEFAULT_MODELS))
    os.execve(argv[0], argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
