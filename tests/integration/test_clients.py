"""The client library and CLI against in-process servers."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from clients import ClientError, SegmentationClient, area
from clients.cli import build_parser, run
from clients.demo import free_port, make_clip
from pipeline.samples import sample_bytes

from .conftest import running_server


def test_infer_equals_the_engine(server, pipeline_cpu):
    bus = sample_bytes("bus")
    with SegmentationClient(server.address) as client:
        doc = client.infer(bus)
        polygons = client.infer(bus, mask_format="polygon", confidence=0.8)
    (expected,) = pipeline_cpu.infer([bus])
    assert [p["rle"] for p in doc["predictions"]] == [p["rle"] for p in expected["predictions"]]
    assert all("points" in p and p["confidence"] > 0.8 for p in polygons["predictions"])
    person = doc["predictions"][0]
    assert area(person["rle"]) == coco_mask.area({"size": person["rle"]["size"],
                                                  "counts": person["rle"]["counts"].encode()})


def test_stream_in_order_from_raw_and_encoded_frames(server, samples):
    frames = [samples["coffee"], sample_bytes("bus"), samples["astronaut"]]
    with SegmentationClient(server.address) as client:
        results = list(client.stream(frames, stream_id="mixed"))
    assert [r.frame_index for r in results] == [0, 1, 2]
    assert [(r.width, r.height) for r in results] == [(600, 400), (810, 1080), (512, 512)]
    assert all(r.stream_id == "mixed" and not r.error for r in results)


def test_deadline(server, samples):
    with SegmentationClient(server.address, timeout_s=0.001) as client:
        with pytest.raises(ClientError) as info:
            client.infer(samples["coffee"])
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_stream_reconnects_after_the_server_restarts(samples):
    port = free_port()
    frames = [samples["coffee"]] * 4
    got = []
    first = running_server(grpc_port=port, grace_period_s=0.5)
    first.__enter__()
    with SegmentationClient(f"127.0.0.1:{port}") as client:
        results = client.stream(iter(frames))
        got.append(next(results))
        first.__exit__(None, None, None)  # the pod goes away mid-stream ...
        with running_server(grpc_port=port):  # ... and a new one takes its place
            got.extend(results)
    assert [r.frame_index for r in got] == [0, 1, 2, 3]
    assert all(not r.error for r in got)


def test_round_robin_over_two_servers(samples):
    with running_server() as a, running_server() as b:
        target = f"ipv4:127.0.0.1:{a.server.grpc_port},127.0.0.1:{b.server.grpc_port}"
        with SegmentationClient(target) as client:
            for _ in range(4):
                client.infer(samples["coffee"])
        served = [s.server.state.pipelines["instance_segmentation"].batcher.stats.requests
                  for s in (a, b)]
    assert all(n >= 1 for n in served), served


def test_token_and_tls_options(guarded, samples):
    running, cert = guarded
    cert_path = running.server.config.tls_cert
    target = f"localhost:{running.server.grpc_port}"
    with SegmentationClient(target, tls_root_cert=cert_path, token="s3cret") as client:
        assert client.infer(samples["coffee"])["predictions"]
    with SegmentationClient(target, tls_root_cert=cert_path, token="nope") as client:
        with pytest.raises(ClientError) as info:
            client.infer(samples["coffee"])
    assert info.value.code == "UNAUTHENTICATED"


def decoded_frames(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_cli_writes_jsonl_and_draws_masks_where_they_are(server, tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames_per_photo=2)
    args = build_parser().parse_args([str(clip), "--server", server.address, "--quiet",
                                      "--jsonl", str(tmp_path / "r.jsonl"),
                                      "--annotate", str(tmp_path / "frames")])
    summary = run(args)
    assert summary["frames"] == 6 and summary["errors"] == 0 and summary["detections"] > 0
    assert summary["rle_bytes"] < summary["dense_bytes"] / 50
    lines = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [d["frame_index"] for d in lines] == list(range(6))
    originals = decoded_frames(clip)
    for doc in lines:
        png = tmp_path / "frames" / f"frame-{doc['frame_index']:06d}.png"
        drawn = np.asarray(Image.open(png).convert("RGB")).astype(int)
        changed = np.abs(drawn - originals[doc["frame_index"]].astype(int)).sum(2) > 0
        near = np.zeros(changed.shape, bool)
        for p in doc["predictions"]:
            mask = coco_mask.decode({"size": p["rle"]["size"], "counts": p["rle"]["counts"].encode()}).astype(bool)
            assert changed[mask].mean() > 0.95  # painted inside the mask
            x1, y1 = int(p["x"] - p["width"] / 2), int(p["y"] - p["height"] / 2)
            x2, y2 = int(p["x"] + p["width"] / 2), int(p["y"] + p["height"] / 2)
            near[max(y1 - 3, 0) : y2 + 4, max(x1 - 3, 0) : x2 + 4] = True  # box outline
            label = f"{p['class']} {p['confidence']:.2f}"
            near[max(y1 - 3, 0) : y1 + 16, max(x1 - 3, 0) : x1 + 8 * len(label)] = True  # label
        assert not changed[~near].any()  # untouched away from the detections


def test_cli_ctrl_c_keeps_what_was_done(server, tmp_path, monkeypatch, samples):
    import clients.cli as cli

    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames_per_photo=3)
    real_update = cli.Progress.update

    def interrupt_after_two(self, frames, detections, final=False):
        real_update(self, frames, detections, final)
        if frames == 2 and not final:
            raise KeyboardInterrupt  # what Ctrl-C does to the main thread

    monkeypatch.setattr(cli.Progress, "update", interrupt_after_two)
    args = build_parser().parse_args([str(clip), "--server", server.address, "--quiet",
                                      "--jsonl", str(tmp_path / "r.jsonl"),
                                      "--annotate", str(tmp_path / "out.mp4")])
    summary = run(args)
    assert summary["interrupted"] is True and summary["frames"] == 2
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    assert len(decoded_frames(tmp_path / "out.mp4")) == 2  # the video was finalised


def test_cli_reports_a_missing_source(tmp_path, capsys):
    from clients.cli import main

    assert main([str(tmp_path / "nope.mp4"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
