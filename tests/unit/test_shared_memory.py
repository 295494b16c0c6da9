"""The shared memory rules (``pipeline.serving.shared_memory``), on plain files standing in
for /dev/shm: who may register, which keys, the bounds, and a region unregistered while a
request holds it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import AlreadyExistsError, BadInputError, ConfigError, NotFoundError, UnavailableError
from pipeline.frontends.config import ServerConfig
from pipeline.frontends.kserve import SharedOutputs
from pipeline.serving.shared_memory import Reference, SharedMemory, is_local


@pytest.fixture
def memory(tmp_path):
    (tmp_path / "rle_frames").write_bytes(bytes(range(256)) * 4)
    return SharedMemory(enabled=True, max_regions=2, directory=tmp_path)


@pytest.mark.parametrize(("client", "local"), [
    ("127.0.0.1", True), ("127.8.0.3", True), ("::1", True), ("unix:/run/rle.sock", True),
    ("10.0.0.7", False), ("::ffff:10.0.0.7", False), ("fe80::1", False), ("", False),
])
def test_only_clients_on_this_host_may_register(memory, client, local):
    assert is_local(client) is local
    if local:
        memory.register(client, "r", "rle_frames", 0, 16)
        assert memory.status() == [{"name": "r", "key": "rle_frames", "offset": 0, "byte_size": 16}]
    else:
        with pytest.raises(BadInputError, match="on the server's host"):
            memory.register(client, "r", "rle_frames", 0, 16)


def test_reads_are_copies_of_the_window(memory):
    memory.register("127.0.0.1", "r", "/rle_frames", 100, 50)
    assert memory.read(Reference("r", 4, 10), "input") == bytes([110, 111, 112, 113])
    with pytest.raises(BadInputError, match="do not fit region"):
        memory.read(Reference("r", 4, 47), "input")


def test_the_key_prefix_limits_what_can_be_named(tmp_path):
    (tmp_path / "other").write_bytes(b"x" * 64)
    (tmp_path / "rle_frames").write_bytes(b"x" * 64)
    memory = SharedMemory(enabled=True, key_prefix="rle_", directory=tmp_path)
    with pytest.raises(BadInputError, match="must begin with 'rle_'"):
        memory.register("127.0.0.1", "r", "/other", 0, 8)
    memory.register("127.0.0.1", "r", "/rle_frames", 0, 8)


def test_bounds_names_and_switch(memory, tmp_path):
    memory.register("127.0.0.1", "a", "rle_frames", 0, 8)
    with pytest.raises(AlreadyExistsError):
        memory.register("127.0.0.1", "a", "rle_frames", 0, 8)
    with pytest.raises(BadInputError, match="whole numbers"):
        memory.register("127.0.0.1", "b", "rle_frames", -1, 8)
    with pytest.raises(BadInputError, match="does not fit object"):
        memory.register("127.0.0.1", "b", "rle_frames", 0, 0)
    with pytest.raises(NotFoundError):
        memory.status("b")
    off = SharedMemory(directory=tmp_path)
    for call in (lambda: off.register("127.0.0.1", "a", "rle_frames", 0, 8), off.status,
                 lambda: off.read(Reference("a", 8), "input")):
        with pytest.raises(UnavailableError, match="--allow-shared-memory"):
            call()


@pytest.mark.parametrize(("parameters", "words"), [
    ({"shared_memory_byte_size": 8}, "but no 'shared_memory_region'"),
    ({"shared_memory_region": "r"}, "without 'shared_memory_byte_size'"),
    ({"shared_memory_region": "", "shared_memory_byte_size": 8}, "a region's name"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": True}, "whole numbers"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": -2}, "whole numbers"),
])
def test_references_are_read_strictly(parameters, words):
    with pytest.raises(BadInputError, match=words):
        Reference.of(parameters, "input 'IMAGE'")
    assert Reference.of({"binary_data_size": 3}, "input") is None


def test_a_region_unregistered_while_a_request_holds_it_is_still_written(memory, tmp_path):
    """The request took its output region at arrival; unregistering it meanwhile drops it
    from the table only, and the answer still lands where the client asked."""
    memory.register("127.0.0.1", "out", "rle_frames", 0, 64)
    held = SharedOutputs([("BOXES", {"shared_memory_region": "out", "shared_memory_byte_size": 16})], memory)
    memory.unregister()
    assert memory.status() == []
    boxes = np.arange(4, dtype=np.float32)
    assert held.place("BOXES", boxes) and not held.place("SCORES", boxes)
    assert (tmp_path / "rle_frames").read_bytes()[:16] == boxes.tobytes()


def test_settings_are_checked_at_start_up():
    with pytest.raises(ConfigError, match="regions must be >= 1"):
        ServerConfig(allow_shared_memory=True, max_shared_memory_regions=0)
    with pytest.raises(ConfigError, match="needs --allow-shared-memory"):
        ServerConfig(shared_memory_key_prefix="rle_")
    assert ServerConfig(allow_shared_memory=True, shared_memory_key_prefix="rle_").shared_memory_key_prefix == "rle_"
