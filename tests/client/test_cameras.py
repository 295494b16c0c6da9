"""``python -m clients streams``: a camera on the server, from the light client's environment,
against a real server process with the real model: add a file as a camera, list it, watch
its live results (JSON Lines and frames with the masks drawn), show, remove; a camera that
cannot be reached listed with its error code beside its last error."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
from PIL import Image

from clients.cli import main

from .conftest import server_process
from .test_client import write_clip


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (a camera that is off)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_streams_cli_adds_watches_lists_and_removes_a_camera(tmp_path, rgb, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    # 8 fps, 40 frames: 5 s played in real time, sampled at 2 fps
    write_clip(clips / "street.mp4", [rgb["bus"], rgb["zidane"]], frames_per_picture=20)
    with server_process(tmp_path, "--stream-source-dir", str(clips), "--allow-stream-urls",
                        "--stream-url-allow", "127.0.0.1") as server:
        cli = ["streams", "--server", server.address]
        assert main([*cli, "add", f"rtsp://127.0.0.1:{closed_port()}/cam", "--id", "off"]) == 0
        capsys.readouterr()
        assert main([*cli, "add", "street.mp4", "--id", "street", "--max-fps", "2", "--track"]) == 0
        added = json.loads(capsys.readouterr().out)
        assert added["stream_id"] == "street" and added["track"] and added["max_fps"] == 2
        jsonl, frames = tmp_path / "watch.jsonl", tmp_path / "frames"
        assert main([*cli, "watch", "street", "--max-results", "3", "--jsonl", str(jsonl),
                     "--annotate", str(frames)]) == 0
        assert "street: " in capsys.readouterr().out  # the per-second line
        docs = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert len(docs) == 3 and all(d["stream_id"] == "street" for d in docs)
        assert any(p["class"] in ("bus", "person") for d in docs for p in d["predictions"])
        drawn = sorted(frames.glob("street-*.png"))
        assert len(drawn) == 3 and np.asarray(Image.open(drawn[0])).shape == (480, 640, 3)
        deadline = time.monotonic() + 30
        while True:  # the camera's first refusal is told within a second or two
            assert main([*cli, "list"]) == 0
            listing = capsys.readouterr().out
            if "off: last error" in listing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert listing.startswith("stream_id") and "street" in listing and "street.mp4" in listing
        assert "off: last error [CONNECTION_FAILED]: cannot open: Connection refused" in listing, listing
        assert main([*cli, "rm", "off"]) == 0
        capsys.readouterr()
        assert main([*cli, "show", "street"]) == 0
        assert json.loads(capsys.readouterr().out)["frames_out"] >= 3
        assert main([*cli, "rm", "street"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "stopped"
        assert main([*cli, "rm", "street"]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err
        assert main([*cli, "list"]) == 0
        assert capsys.readouterr().out.strip() == "no camera streams"
