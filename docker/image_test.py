"""``make image-test``: build docker/Dockerfile.cpu for real and serve from the image.

No Docker engine runs here, and public registries are unreachable, so:

1. a stand-in for the ``FROM`` base is made from Debian's packages (``debootstrap --variant=
   minbase bookworm``: Python 3.11 as ``python``, like the default base) and imported;
2. the Dockerfile is built with ``buildah bud --isolation chroot`` (vfs storage, in a fresh
   temporary folder) with only build arguments and build-time mounts changed: the base, and
   pip pointed at this machine's proxy CA and local wheel folder (the CPU torch) through a
   mounted /etc/pip.conf. Nothing of that is written into the image;
3. the server is started from the image as the Kubernetes Deployment runs it: the image's
   entrypoint, environment, working directory and user, plus the Deployment's args and env
   (all but ``RLE_SERVING_DEVICE=cuda``, which is for the CUDA image), with ``buildah run``;
4. proven: health SERVING through the image's own HEALTHCHECK command; tritonclient inference
   on real photos returns the same detections and RLE bytes as the host's ``.venv`` server;
   metrics on 8002; the Deployment's ports, env names, user and gRPC probes agree with the
   image; nothing is written outside /tmp (the Deployment mounts the root read-only); SIGTERM
   drains and the process exits 0;
5. the image size and the build time are printed, and every container, image and the
   storage folder are removed (``--keep`` keeps them for a look).

Needs root (debootstrap, buildah's chroot), and buildah and debootstrap installed
(``make image-test`` installs them with apt where missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.tools.launch import local_server, wait_until_serving
from pipeline.tools.samples import sample_bytes

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker/Dockerfile.cpu"
DEPLOYMENT = ROOT / "docker/k8s/base/deployment.yaml"
BASE_CACHE = Path.home() / ".cache/rle-serving/stand-in-bookworm.tar"
STAND_IN = "localhost/rle-serving-stand-in:bookworm"
IMAGE = "localhost/rle-serving:cpu-image-test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PHOTOS = ("bus", "zidane", "coffee")
MODEL = "instance_segmentation"


def step(message: str) -> None:
    print(f"[image-test] {message}", flush=True)


class Buildah:
    """buildah with its own storage folder, so that cleaning up is removing that folder."""

    def __init__(self, work: Path):
        self.flags = ["--storage-driver", "vfs", "--root", str(work / "storage"),
                      "--runroot", str(work / "run")]

    def command(self, *args: str) -> list[str]:
        return ["buildah", *self.flags, *args]

    def __call__(self, *args: str, quiet: bool = True) -> str:
        done = subprocess.run(self.command(*args), capture_output=quiet, text=True)
        if done.returncode:
            raise SystemExit(f"buildah {' '.join(args[:2])} failed ({done.returncode}):\n"
                             f"{(done.stderr or '')[-3000:]}")
        return (done.stdout or "").strip()


def stand_in_base(buildah: Buildah, work: Path) -> None:
    """A Debian bookworm root file system with Python 3.11, imported as STAND_IN."""
    if not BASE_CACHE.exists():
        rootfs = work / "rootfs"
        began = time.monotonic()
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,python-is-python3,ca-certificates",
                        "bookworm", str(rootfs), DEBIAN_MIRROR], check=True,
                       stdout=subprocess.DEVNULL)
        # This machine's apt settings (its mirror is a snapshot: Release files look expired).
        for conf in Path("/etc/apt/apt.conf.d").glob("99*"):
            shutil.copy(conf, rootfs / "etc/apt/apt.conf.d" / conf.name)
        BASE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(BASE_CACHE), "."], check=True)
        shutil.rmtree(rootfs)
        step(f"stand-in base made with debootstrap in {time.monotonic() - began:.0f} s")
    container = buildah("from", "scratch")
    buildah("add", container, str(BASE_CACHE), "/")
    buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--cmd", "/bin/bash", container)
    buildah("commit", "-q", container, STAND_IN)
    buildah("rm", container)


def pip_conf(work: Path) -> tuple[Path, list[str]]:
    """A pip.conf for the build only (mounted, never copied): this machine's CA and wheels."""
    mounts, lines = [], ["[global]"]
    ca = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
    if ca.is_file():
        mounts.append(f"{ca}:/run/image-test/ca.crt:ro")
        lines.append("cert = /run/image-test/ca.crt")
    wheels = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                            capture_output=True, text=True).stdout.strip()
    if wheels and Path(wheels).is_dir():
        mounts.append(f"{wheels}:/run/image-test/wheels:ro")
        lines.append("find-links = /run/image-test/wheels")
    conf = work / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, [f"{conf}:/etc/pip.conf:ro", *mounts]


def build(buildah: Buildah, work: Path) -> float:
    conf, mounts = pip_conf(work)
    args = ["bud", "--isolation", "chroot", "--network", "host", "--format", "docker",
            "-f", str(DOCKERFILE), "--build-arg", f"BASE_IMAGE={STAND_IN}",
            "--build-arg", "TORCH_SOURCE=", "-t", IMAGE]
    for mount in mounts:
        args += ["-v", mount]
    log = work / "build.log"
    began = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(buildah.command(*args, str(ROOT)), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"the image build failed:\n{log.read_text()[-4000:]}")
    return time.monotonic() - began


def image_size(buildah: Buildah) -> str:
    """As buildah reports it (uncompressed: what the image takes on a node's disk)."""
    return json.loads(buildah("images", "--json", IMAGE))[0]["size"]


def server_settings(buildah: Buildah, container: str) -> set[str]:
    """The RLE_SERVING_* names the server inside the image understands."""
    code = ("import dataclasses; from pipeline.frontends.config import ServerConfig; "
            "print(' '.join('RLE_SERVING_' + f.name.upper() for f in dataclasses.fields(ServerConfig)))")
    return set(buildah("run", "--isolation", "chroot", container, "--", "python", "-c", code).split())


def deployment_container() -> tuple[dict, dict]:
    """The Deployment's pod spec and its server container."""
    for doc in yaml.safe_load_all(DEPLOYMENT.read_text()):
        if doc and doc["kind"] == "Deployment":
            return doc["spec"]["template"]["spec"], doc["spec"]["template"]["spec"]["containers"][0]
    raise SystemExit(f"{DEPLOYMENT}: no Deployment")


def check_manifests(config: dict, settings: set[str]) -> tuple[list[str], dict[str, str]]:
    """Static agreement of the Deployment with the built image; returns its args and env."""
    pod, container = deployment_container()
    ports = {p["containerPort"] for p in container["ports"]}
    exposed = {int(p.split("/")[0]) for p in config.get("ExposedPorts", {})}
    assert ports <= exposed, f"Deployment ports {sorted(ports)}, image exposes {sorted(exposed)}"
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    unknown = [n for n in env if n.startswith("RLE_SERVING_") and n not in settings]
    assert not unknown, f"Deployment env {unknown}: the image's server has no such settings"
    user = pod["securityContext"]["runAsUser"]
    assert str(user) == config["User"], f"Deployment runAsUser {user}, image USER {config['User']}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container[probe]["grpc"]["port"]
        assert port == int(env.get("RLE_SERVING_GRPC_PORT", 8001)), f"{probe} port {port}"
    return container.get("args", []), env


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def server_process(runner: subprocess.Popen, entrypoint: list[str], timeout_s: float = 30) -> int:
    """The server's own process, under buildah run: the container's main process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in descendants(runner.pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                # /opt/venv/bin/python -m pipeline serve ... (not buildah-chroot-exec's argv)
                if Path(argv[0]).name.startswith("python") and argv[1 : len(entrypoint)] == entrypoint[1:]:
                    return pid
        time.sleep(0.2)
    raise SystemExit("could not find the server's process under buildah run")


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise SystemExit(f"no Uid for process {pid}")


def detections(address: str) -> list[tuple[list[dict], list[str]]]:
    """(predictions without their random ids, RLE_COUNTS) for each photo, via tritonclient."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(address)
    out = []
    for name in PHOTOS:
        tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[sample_bytes(name)]], dtype=object))
        result = client.infer(MODEL, [tensor])
        doc = json.loads(result.as_numpy("DETECTIONS")[0, 0])
        predictions = [{k: v for k, v in p.items() if k != "detection_id"} for p in doc["predictions"]]
        counts = [c.decode() for c in result.as_numpy("RLE_COUNTS")[0] if c]
        out.append((predictions, counts))
    client.close()
    return out


def written_outside_tmp(mount: Path, since: float) -> list[str]:
    """Files the run created or changed outside /tmp (buildah's own /etc files aside)."""
    allowed = {"tmp", "proc", "sys", "dev", "run"}
    ours = {"etc/hosts", "etc/resolv.conf", "etc/hostname"}  # written by buildah run itself
    changed = []
    for folder, dirs, files in os.walk(mount):
        relative = Path(folder).relative_to(mount)
        if relative.parts and relative.parts[0] in allowed:
            dirs[:] = []
            continue
        for name in files:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime > since and str(relative / name) not in ours:
                    changed.append(str(relative / name))
    return changed


NETWORK = re.compile(r'(key: "network" value: \{ string_value: ")([^"]*)(")')


def reference_repository(image_root: Path) -> Path:
    """The host's repository with its pipeline on the network the image's pipeline runs. Each
    times the converted forms where it is made and keeps the fastest (``make model``), so the
    two can differ (TorchScript in the image, ONNX on the host), and two runtimes' floats may
    differ in a detection; the comparison is of one network served two ways."""
    pipeline = "model_repository/instance_segmentation/config.pbtxt"
    network = NETWORK.search((image_root / "app" / pipeline).read_text()).group(2)
    folder = Path(tempfile.mkdtemp(prefix="reference-repository-"))
    for entry in (ROOT / "model_repository").iterdir():
        (folder / entry.name).symlink_to(entry.resolve())
    (folder / "instance_segmentation").unlink()
    shutil.copytree(ROOT / "model_repository/instance_segmentation", folder / "instance_segmentation")
    host = folder / "instance_segmentation/config.pbtxt"
    host.write_text(NETWORK.sub(rf"\g<1>{network}\g<3>", host.read_text()))
    return folder


def serve_and_prove(buildah: Buildah, config: dict, healthcheck: list[str]) -> None:
    container = buildah("from", IMAGE)
    settings = server_settings(buildah, container)
    args, env = check_manifests(config, settings)
    step(f"Deployment agrees with the image: ports {sorted(int(p.split('/')[0]) for p in config['ExposedPorts'])}, "
         f"user {config['User']}, {len(env)} env names known to the image's server, gRPC probes on 8001")
    env.pop("RLE_SERVING_DEVICE", None)  # cuda: the CUDA image's; this is the CPU image
    for port in (8000, 8001, 8002):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            raise SystemExit(f"port {port} is in use on this machine: the image serves on it")
    run = ["run", "--isolation", "chroot", "--network", "host"]
    for name, value in env.items():
        run += ["--env", f"{name}={value}"]
    entrypoint = config["Entrypoint"] + (config.get("Cmd") or [])
    mount = Path(buildah("mount", container))
    started = time.time()
    log = Path(tempfile.mkstemp(prefix="image-server-", suffix=".log")[1])
    runner = subprocess.Popen(buildah.command(*run, container, "--", *entrypoint, *args),
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    pid = None
    try:
        wait_until_serving("127.0.0.1:8001", runner)  # what the Deployment's gRPC probes ask
        pid = server_process(runner, entrypoint)
        assert uid_of(pid) == int(config["User"]), f"the server runs as uid {uid_of(pid)}"
        step(f"serving from the image as uid {uid_of(pid)} with args {args}")
        assert healthcheck[0] == "CMD", healthcheck
        check = subprocess.run(buildah.command(*run, container, "--", *healthcheck[1:]),
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "SERVING" in check.stdout, check
        step(f"HEALTHCHECK {' '.join(healthcheck[1:])}: {check.stdout.strip()}")
        repository = reference_repository(mount)
        with local_server("--device", "cpu", "--model-repository", str(repository), cwd=ROOT) as reference:
            ours, theirs = detections("127.0.0.1:8001"), detections(reference.address)
        shutil.rmtree(repository)
        for name, (image_doc, image_counts), (host_doc, host_counts) in zip(PHOTOS, ours, theirs):
            assert image_doc and image_doc == host_doc, f"{name}: image and host detections differ"
            assert image_counts == host_counts, f"{name}: RLE counts differ"
        found = sum(len(doc) for doc, _ in ours)
        step(f"tritonclient on {', '.join(PHOTOS)}: {found} detections, RLE bytes identical "
             "to the host .venv server's")
        import urllib.request

        metrics = urllib.request.urlopen("http://127.0.0.1:8002/metrics", timeout=10).read().decode()
        served = re.search(rf'^nv_inference_request_success{{model="{MODEL}"[^}}]*}} (\S+)$', metrics, re.M)
        assert served and float(served.group(1)) == len(PHOTOS), "metrics on 8002 miss the requests"
        step(f"metrics on 8002: nv_inference_request_success {served.group(1)}")
        os.kill(pid, signal.SIGTERM)  # what the kubelet sends the container's process
        code = runner.wait(90)
        pid = None  # exited: its number may be another process's by the time ``finally`` runs
        assert code == 0, f"the server exited with {code} after SIGTERM:\n{log.read_text()[-2000:]}"
        assert "draining" in log.read_text(), "no drain in the server's log"
        step("SIGTERM: drained and exited 0")
        changed = written_outside_tmp(mount, started)
        assert not changed, f"written outside /tmp (the Deployment's root is read-only): {changed[:10]}"
        step("nothing written outside /tmp (the Deployment mounts the root file system read-only)")
    except BaseException:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if pid is not None:  # buildah's wrapper dies alone on SIGKILL: its server would be left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        log.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the image, containers and storage")
    args = parser.parse_args(argv)
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (make image-test installs it with apt)")
    if os.geteuid() != 0:
        raise SystemExit("image-test needs root (debootstrap and buildah's chroot isolation)")
    work = Path(tempfile.mkdtemp(prefix="rle-image-test-", dir="/var/tmp"))
    buildah = Buildah(work)
    began = time.monotonic()
    try:
        stand_in_base(buildah, work)
        step(f"building {DOCKERFILE.relative_to(ROOT)} with buildah (base: a debootstrap stand-in) ...")
        seconds = build(buildah, work)
        size = image_size(buildah)
        inspected = json.loads(buildah("inspect", "--type", "image", IMAGE))
        config = inspected["OCIv1"]["config"]
        healthcheck = (inspected["Docker"]["config"].get("Healthcheck") or {}).get("Test")
        assert healthcheck, "the image has no HEALTHCHECK"
        step(f"built {IMAGE} in {seconds:.0f} s; image size {size}")
        serve_and_prove(buildah, config, healthcheck)
        step(f"passed in {time.monotonic() - began:.0f} s (build {seconds:.0f} s, image {size})")
        return 0
    finally:
        if args.keep:
            step(f"kept: buildah {' '.join(buildah.flags)} images")
        else:
            subprocess.run(buildah.command("rm", "--all"), capture_output=True)
            subprocess.run(buildah.command("rmi", "--all", "--force"), capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
