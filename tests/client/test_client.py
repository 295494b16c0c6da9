"""The client library and CLI against real server processes (no torch needed on this side)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from pycocotools import mask as coco_mask

from clients import Backoff, ClientError, SegmentationClient, area, bbox, result_document
from clients.cli import build_parser, run
from clients.sources import VideoWriter
from pipeline.tools.launch import free_port

from .conftest import server_process


def without_ids(doc: dict) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "detection_id"} for p in doc["predictions"]]


@pytest.mark.skipif(os.environ.get("RLE_SERVING_LIGHT_CLIENT") != "1",
                    reason="checks the light client environment (make test runs it there)")
def test_the_light_client_environment_has_no_server_dependencies():
    for heavy in ("torch", "scipy", "skimage", "prometheus_client", "numba", "cv2"):
        assert importlib.util.find_spec(heavy) is None, f"{heavy} is in the client install"
    assert sys.prefix != sys.base_prefix  # a virtual environment of its own


@pytest.mark.skipif(os.environ.get("RLE_SERVING_LIGHT_CLIENT") != "1",
                    reason="checks the light client environment (make test runs it there)")
def test_the_light_client_encodes_through_numpy_with_pycocotools_bytes():
    from pycocotools import mask as coco_mask

    from pipeline import rle

    masks = np.random.default_rng(3).random((4, 90, 70)) < 0.4
    masks[2] = False
    expected = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert not rle.compiled()  # no numba here
    assert [r["counts"].encode() for r in rle.encode(masks)] == [e["counts"] for e in expected]


def test_infer_equals_the_official_tritonclient_and_pycocotools(server, photos):
    bus = photos["bus"]
    with SegmentationClient(server.address) as client:
        doc = client.infer(bus)
        polygons = client.infer(bus, mask_format="polygon", confidence=0.8)
    raw = triton.InferenceServerClient(server.address)
    tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[bus]], dtype=object))
    expected = json.loads(raw.infer("instance_segmentation", [tensor]).as_numpy("DETECTIONS")[0, 0])
    raw.close()
    assert without_ids(doc) == without_ids(expected)
    assert {"person", "bus"} <= {p["class"] for p in doc["predictions"]}
    assert all("points" in p and p["confidence"] > 0.8 for p in polygons["predictions"])
    for p in doc["predictions"]:
        coco = {"size": p["rle"]["size"], "counts": p["rle"]["counts"].encode()}
        assert area(p["rle"]) == coco_mask.area(coco)
        assert bbox(p["rle"]) == tuple(int(v) for v in coco_mask.toBbox(coco))


def test_both_apis_and_the_cameras_go_over_one_channel(server, photos, rgb, monkeypatch):
    import grpc

    opened = []
    insecure_channel = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", lambda *a, **k: opened.append(a) or insecure_channel(*a, **k))
    with SegmentationClient(server.address) as client:
        assert client.infer(photos["bus"])["predictions"]
        assert [r.frame_index for r in client.stream([rgb["coffee"]])] == [0]
        assert client.streams() == []
    assert len(opened) == 1  # KServe, video and cameras: the client's one channel


def test_stream_in_order_from_raw_and_encoded_frames(server, photos, rgb):
    frames = [rgb["coffee"], photos["bus"], rgb["astronaut"]]
    with SegmentationClient(server.address) as client:
        results = list(client.stream(frames, stream_id="mixed"))
    assert [r.frame_index for r in results] == [0, 1, 2]
    assert [(r.width, r.height) for r in results] == [(600, 400), (810, 1080), (512, 512)]
    assert all(r.stream_id == "mixed" and not r.error for r in results)


def test_stream_through_shared_memory_answers_as_raw_frames(server, rgb):
    """More frames than the ring has slots (each slot is rewritten once its frame is
    answered), and one too large for a slot (sent in the message): the results equal those
    of the same frames sent raw; the region is registered while the stream runs and
    unregistered and freed after it."""
    small = np.asarray(Image.fromarray(rgb["bus"]).resize((320, 400)))
    frames = [rgb["coffee"] if i % 3 else small for i in range(11)] + [rgb["astronaut"]]
    frames[0] = small  # the first frame sets the slot size: coffee (600x400) is larger
    frames[5] = rgb["coffee"][::-1].copy()
    watcher = triton.InferenceServerClient(server.address)
    with SegmentationClient(server.address) as client:
        shared, regions = [], []
        for result in client.stream(frames, stream_id="shm", shared_memory=True):
            shared.append(result)
            regions.append(dict(watcher.get_system_shared_memory_status().regions))
        raw = list(client.stream(frames, stream_id="raw"))
    (region,) = regions[0].values()
    assert region.name.startswith("rle_frames_") and region.byte_size == 8 * small.nbytes
    assert not watcher.get_system_shared_memory_status().regions
    assert not Path(f"/dev/shm/{region.name}").exists()
    watcher.close()
    assert [r.frame_index for r in shared] == list(range(12)) and not any(r.error for r in shared)
    for a, b in zip(shared, raw, strict=True):
        assert (a.width, a.height) == (b.width, b.height)
        assert [(d.class_name, d.rle.counts) for d in a.detections] == [
            (d.class_name, d.rle.counts) for d in b.detections]


def test_shared_memory_needs_one_server():
    with SegmentationClient("127.0.0.1:1,127.0.0.1:2") as client:
        with pytest.raises(ValueError, match="one server on this host"):
            next(client.stream([], shared_memory=True))


def test_deadline(server, rgb):
    with SegmentationClient(server.address, timeout_s=0.001) as client:
        with pytest.raises(ClientError) as info:
            client.infer(rgb["coffee"])
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_stream_reconnects_after_the_server_restarts(tmp_path, rgb):
    port = free_port()
    frames = [rgb["coffee"]] * 4
    got = []
    with server_process(tmp_path, port=port) as first:
        # Patient enough for a new server process to load the model.
        client = SegmentationClient(first.address, backoff=Backoff(0.2, 2.0, attempts=60))
        results = client.stream(iter(frames))
        got.append(next(results))
        assert first.stop() == 0  # the pod goes away mid-stream ...
    with server_process(tmp_path, port=port):  # ... and a new one takes its place
        got.extend(results)
        client.close()
    assert [r.frame_index for r in got] == [0, 1, 2, 3]
    assert all(not r.error for r in got)


def test_stream_survives_connections_aged_out_under_a_blocking_source(tmp_path, rgb):
    """A live camera's source blocks until its next frame; here until the last one is
    answered. Connections live 1 s, so calls end while the source is blocked inside next():
    the next call must neither read the source at the same time (ValueError: generator
    already executing) nor lose the frame the old call read: every frame is answered once,
    in order."""
    import threading

    small = np.asarray(Image.fromarray(rgb["zidane"]).resize((320, 180)))
    answered = threading.Semaphore(0)

    def camera():
        for _ in range(16):
            yield small
            answered.acquire()  # the next frame once this one is answered

    with server_process(tmp_path, "--grpc-max-connection-age-s", "1",
                        "--grpc-max-connection-age-grace-s", "0.5") as running:
        with SegmentationClient(running.address, backoff=Backoff(first_s=0.05)) as client:
            indices = []
            for result in client.stream(camera(), stream_id="aged"):
                assert not result.error
                indices.append(result.frame_index)
                answered.release()
    assert indices == list(range(16))


def test_round_robin_over_two_servers(tmp_path, rgb):
    with server_process(tmp_path) as a, server_process(tmp_path) as b:
        # Names, resolved by the client into one ipv4: target of both.
        with SegmentationClient([f"localhost:{a.port}", f"localhost:{b.port}"]) as client:
            assert client.target == f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
            for _ in range(4):
                client.infer(rgb["coffee"])
        served = []
        for s in (a, b):
            stats = triton.InferenceServerClient(s.address).get_inference_statistics(
                "instance_segmentation")
            served.append(stats.model_stats[0].inference_count)
    assert all(n >= 1 for n in served), served


def test_token_and_tls_options(tmp_path, tls_files, rgb):
    key, cert = tls_files
    with server_process(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
                        "--token", "s3cret") as running:
        target = f"localhost:{running.port}"
        with SegmentationClient(target, tls_root_cert=cert, token="s3cret") as client:
            assert client.infer(rgb["coffee"])["predictions"]
            # This server has no --allow-shared-memory: the stream says so on its first frame.
            with pytest.raises(ClientError, match="--allow-shared-memory") as off:
                list(client.stream([rgb["coffee"]], shared_memory=True))
            assert off.value.code == "UNAVAILABLE"
        # A list becomes addresses; the certificate is still checked against the first name.
        with SegmentationClient(f"{target},127.0.0.1:{running.port}", tls_root_cert=cert,
                                token="s3cret") as client:
            assert [r.error for r in client.stream([rgb["coffee"]])] == [""]
        with SegmentationClient(target, tls_root_cert=cert, token="nope") as client:
            with pytest.raises(ClientError) as info:
                client.infer(rgb["coffee"])
    assert info.value.code == "UNAUTHENTICATED"


# ---------------------------------------------------------------------------------- CLI


def write_clip(path: Path, pictures: list[np.ndarray], frames_per_picture: int = 2) -> int:
    """A short H.264 clip: each picture resized to 640x480, shown for a few frames."""
    writer = VideoWriter(path, 8)
    count = 0
    for picture in pictures:
        frame = np.asarray(Image.fromarray(picture).resize((640, 480)))
        for _ in range(frames_per_picture):
            writer.write(frame)
            count += 1
    writer.close()
    return count


def decoded_frames(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, rgb):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_clip(path, [rgb["astronaut"], rgb["coffee"], rgb["bus"]])
    return path


def test_cli_writes_jsonl_and_draws_masks_where_they_are(server, clip, tmp_path):
    args = build_parser().parse_args([str(clip), "--server", server.address, "--quiet",
                                      "--jsonl", str(tmp_path / "r.jsonl"),
                                      "--annotate", str(tmp_path / "frames")])
    summary = run(args)
    assert summary["frames"] == 6 and summary["errors"] == 0 and summary["detections"] > 0
    assert summary["rle_bytes"] < summary["dense_bytes"] / 50
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
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


def test_cli_shared_memory_sends_the_decoded_frames_themselves(server, clip, tmp_path):
    """--shared-memory: the decoded frames reach the server as they are (no JPEG), so the
    masks equal those of the raw frames sent in messages."""
    args = build_parser().parse_args([str(clip), "--server", server.address, "--quiet",
                                      "--jsonl", str(tmp_path / "r.jsonl"), "--shared-memory"])
    summary = run(args)
    assert summary["frames"] == 6 and summary["errors"] == 0
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    with SegmentationClient(server.address) as client:
        raw = [result_document(r) for r in client.stream(decoded_frames(clip))]
    assert [without_ids(d) for d in lines] == [without_ids(d) for d in raw]


def test_cli_ctrl_c_keeps_what_was_done(server, clip, tmp_path, monkeypatch):
    import clients.cli as cli

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


@pytest.mark.parametrize("target, words", [
    ([], "no server address given"),
    (" , ", "no server address given"),
    ("localhost", "'localhost' is not host:port"),
    (["localhost:8001", "replica.invalid:8001"], "'replica.invalid' does not resolve"),
    ("dns:///fleet.invalid:8001", "'fleet.invalid' does not resolve"),
    (["127.0.0.1:8001", "[::1]:8001"], "mix IPv4-only and IPv6-only"),
])
def test_a_bad_target_is_refused_when_the_client_is_made(target, words):
    with pytest.raises(ValueError, match=words):
        SegmentationClient(target)


def test_cli_reports_a_server_name_that_does_not_resolve(tmp_path, capsys):
    from clients.cli import main

    (tmp_path / "frames").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "frames" / "a.png")
    code = main([str(tmp_path / "frames"), "--server", "a.invalid:8001", "--quiet",
                 "--jsonl", str(tmp_path / "r.jsonl")])
    assert code == 2 and "'a.invalid' does not resolve" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()  # refused before any output


def test_cli_reports_a_missing_source(tmp_path, capsys):
    from clients.cli import main

    assert main([str(tmp_path / "nope.mp4"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_track_keeps_each_object_its_id_and_colour(server, rgb, tmp_path):
    from pipeline.overlay import colour

    bus = rgb["bus"]  # 810 x 1080: a camera panning right across it, 20 px a frame
    path = tmp_path / "pan.mp4"
    writer = VideoWriter(path, 10)
    for f in range(8):
        writer.write(np.ascontiguousarray(bus[:, 20 * f : 20 * f + 480]))
    writer.close()
    args = build_parser().parse_args([str(path), "--server", server.address, "--quiet", "--track",
                                      "--jsonl", str(tmp_path / "r.jsonl"),
                                      "--annotate", str(tmp_path / "frames")])
    summary = run(args)
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert summary["frames"] == 8 and summary["errors"] == 0, [d.get("error") for d in lines]
    assert all("tracker_id" in p for d in lines for p in d["predictions"])
    buses = [p for d in lines for p in d["predictions"] if p["class"] == "bus"]
    assert len(buses) == 8 and buses[0]["tracker_id"] == -1  # ByteTrack confirms on a 2nd sighting
    assert len({p["tracker_id"] for p in buses[1:]}) == 1
    people = {p["tracker_id"] for d in lines for p in d["predictions"] if p["class"] == "person"}
    assert summary["objects"] == {"bus": 1, "person": len(people - {-1})}
    assert summary["objects"]["person"] >= 2
    originals = decoded_frames(path)
    for doc, bus_found in zip(lines[1:], buses[1:]):  # the bus is painted in its id's colour in every frame
        drawn = np.asarray(Image.open(tmp_path / "frames" / f"frame-{doc['frame_index']:06d}.png"))
        mask = coco_mask.decode({"size": bus_found["rle"]["size"],
                                 "counts": bus_found["rle"]["counts"].encode()}).astype(bool)
        tint = (drawn[mask].astype(float) - 0.55 * originals[doc["frame_index"]][mask]) / 0.45
        assert np.abs(np.median(tint, axis=0) - colour(bus_found["tracker_id"])).max() < 4


def test_cli_without_track_has_no_tracker_ids(server, clip, tmp_path):
    args = build_parser().parse_args([str(clip), "--server", server.address, "--quiet",
                                      "--max-frames", "2", "--jsonl", str(tmp_path / "r.jsonl")])
    summary = run(args)
    assert "objects" not in summary
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines and not any("tracker_id" in p for d in lines for p in d["predictions"])
