"""A camera stream as asked for (``cameras.spec``): every field read once, every mistake a
BadInputError naming it, and the operator's stance on sources (files from one folder, URLs
only when allowed, private hosts only where listed)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.cameras.spec import SourceRules, StreamSpec
from pipeline.errors import BadInputError
from pipeline.serving.url_policy import AllowList


@pytest.fixture
def rules(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "lobby.mp4").write_bytes(b"not checked here")
    (tmp_path / "secret.mp4").write_bytes(b"outside")
    (tmp_path / "clips" / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    return SourceRules(tmp_path / "clips", allow_urls=True)


def read(body, rules):
    return StreamSpec.read(body, rules)


def test_a_file_is_found_in_the_source_folder_and_defaults_are_sane(rules, tmp_path):
    spec = read({"source": "lobby.mp4"}, rules)
    assert spec.location == str((tmp_path / "clips" / "lobby.mp4").resolve())
    assert not spec.network and spec.realtime and not spec.track
    assert spec.model == "instance_segmentation" and spec.max_fps is None and spec.sinks == ()
    absolute = read({"source": str(tmp_path / "clips" / "lobby.mp4")}, rules)
    assert absolute.location == spec.location
    assert read({"source": "file://" + str(tmp_path / "clips" / "lobby.mp4")}, rules).location == spec.location


@pytest.mark.parametrize("source, words", [
    ("../secret.mp4", "outside the stream source directory"),
    ("escape.mp4", "outside the stream source directory"),  # a link out of the folder
    ("/etc/passwd", "outside the stream source directory"),
    ("missing.mp4", "is not a file"),
    ("ftp://host/x.mp4", "unknown source scheme 'ftp'"),
    ("rtsp:///no-host", "names no valid host"),
    ("rtsp://[::1/cam", "not a valid URL"),
    ("rtsp://cam.example:99999/1", "not a valid URL"),
    ("lobby\x00.mp4", "not a usable path"),
    ("", "'source' must be"),
])
def test_sources_that_may_not_be_pulled_are_refused_with_the_reason(rules, source, words):
    with pytest.raises(BadInputError, match=words):
        read({"source": source}, rules)


@pytest.mark.parametrize("source", [
    pytest.param("a" * 256 + ".mp4", id="a name over NAME_MAX"),
    pytest.param("/".join(["é" * 120] * 20) + "/x.mp4", id="over PATH_MAX in bytes, not in characters"),
    pytest.param("loop.mp4", id="a link to itself"),
    pytest.param("n" * 1000 + "\x00.mp4", id="a NUL byte after a long name"),
])
def test_a_path_the_system_cannot_use_is_refused_naming_no_folder(rules, tmp_path, source):
    (tmp_path / "clips" / "loop.mp4").symlink_to("loop.mp4")
    with pytest.raises(BadInputError, match="is not a usable path") as refused:
        read({"source": source}, rules)
    assert len(str(refused.value)) < 300 and str(tmp_path) not in str(refused.value)


LONG = 5000  # characters of a client's value: more than any error may repeat
SECRET = "rtsp://user:s3cret@"


@pytest.mark.parametrize("body", [
    pytest.param({"source": "x" * (LONG * 1000)}, id="a source over the limit"),
    pytest.param({"source": SECRET + "cam.example/" + "a" * LONG}, id="a URL over the limit"),
    pytest.param({"source": "d/" * 1500}, id="a missing file"),
    pytest.param({"source": "y" * 3000 + "://host/x"}, id="an unknown scheme"),
    pytest.param({"source": SECRET + "[" + "a" * 3000}, id="not a valid URL"),
    pytest.param({"source": "rtsp://user:s3cret\uff03@cam.example/" + "a" * 200}, id="not a valid URL's netloc"),
    pytest.param({"source": SECRET + "h" * 300 + "/x"}, id="a host longer than a DNS name"),
    pytest.param({"source": "lobby.mp4", "model": "m" * LONG}, id="model"),
    pytest.param({"source": "lobby.mp4", "stream_id": "s" * LONG}, id="stream_id"),
    pytest.param({"source": "lobby.mp4", "track": "t" * LONG}, id="track"),
    pytest.param({"source": "lobby.mp4", "max_fps": "9" * LONG}, id="max_fps"),
    pytest.param({"source": "lobby.mp4", "parameters": {"p" * LONG: 1}}, id="an unknown parameter"),
    pytest.param({"source": "lobby.mp4", "parameters": {"confidence": "c" * LONG}}, id="a parameter's value"),
    pytest.param({"source": "lobby.mp4", "f" * LONG: 1}, id="an unknown field"),
])
def test_an_error_repeats_a_short_prefix_of_what_was_sent_and_no_secret(rules, tmp_path, body):
    with pytest.raises(BadInputError) as refused:
        read(body, rules)
    message = str(refused.value)
    assert len(message) < 400 and "..." in message, message[:400]
    assert "s3cret" not in message and str(tmp_path) not in message


def test_each_kind_of_source_is_off_until_the_operator_turns_it_on(tmp_path):
    nothing = SourceRules()
    with pytest.raises(BadInputError, match="--stream-source-dir"):
        read({"source": "lobby.mp4"}, nothing)
    with pytest.raises(BadInputError, match="--allow-stream-urls"):
        read({"source": "rtsp://10.0.0.5/stream1"}, nothing)


def test_a_private_camera_needs_its_address_listed():
    open_rules = SourceRules(allow_urls=True)
    with pytest.raises(BadInputError, match="--stream-url-allow"):
        asyncio.run(open_rules.check("rtsp://127.0.0.1:8554/cam"))
    listed = SourceRules(allow_urls=True, url_allow=AllowList.parse(["127.0.0.0/8"]))
    asyncio.run(listed.check("rtsp://127.0.0.1:8554/cam"))  # no error


@pytest.mark.parametrize("body, words", [
    ({"max_fps": 0}, "max_fps"), ({"max_fps": -2}, "max_fps"), ({"max_fps": 1e6}, "max_fps"),
    ({"max_fps": float("nan")}, "max_fps"), ({"max_fps": "5"}, "max_fps"), ({"max_fps": True}, "max_fps"),
    ({"track": "yes"}, "'track' must be true or false"),
    ({"sinks": ["amqp://broker/queue"]}, "amqp"), ({"sinks": "mqtt://h/t"}, "list of URLs"),
    ({"sinks": ["mqtt://h/t"] * 9}, "at most 8 sinks"),
    ({"parameters": {"confidence": 2}}, "confidence"), ({"parameters": {"colour": 1}}, "unknown parameter"),
    ({"parameters": {"lost_track_seconds": -1}}, "lost_track_seconds"),
    ({"parameters": "fast"}, "'parameters' must be an object"),
    ({"stream_id": "../x"}, "stream_id"), ({"stream_id": "a" * 65}, "stream_id"),
    ({"model": 7}, "model"), ({"fps": 5}, "unknown field"),
])
def test_bad_fields_are_refused_naming_the_field(rules, body, words):
    with pytest.raises(BadInputError, match=words):
        read({"source": "lobby.mp4", **body}, rules)


def test_realtime_is_for_files_only(rules):
    assert not read({"source": "lobby.mp4", "realtime": False}, rules).realtime
    with pytest.raises(BadInputError, match="'realtime' is for file sources"):
        read({"source": "rtsp://cam.example/1", "realtime": False}, rules)


def test_a_full_spec_is_read_as_given(rules):
    spec = read({"source": "rtsp://user:pw@cam.example:554/1", "model": "m", "max_fps": 2.5,
                 "track": True, "sinks": ["mqtt://broker/cams", "redis://r/k", "http://hook/x"],
                 "parameters": {"confidence": 0.4, "lost_track_seconds": 2}, "stream_id": "door-1"},
                rules)
    assert spec.network and spec.location == "rtsp://user:pw@cam.example:554/1"
    assert spec.display == "rtsp://user:***@cam.example:554/1"
    assert (spec.model, spec.max_fps, spec.track, spec.stream_id) == ("m", 2.5, True, "door-1")
    assert len(spec.sinks) == 3 and spec.tracker.lost_s == 2 and spec.options == {"confidence": 0.4}
