"""The batch size chosen at load must not depend on who else is starting: a fake network whose
timings neighbours disturb (they only ever add time: fading, rising, in bursts) must be given
the batch size it is given alone. And config.pbtxt can pin it instead, with clear errors."""

from __future__ import annotations

import math

import pytest

from pipeline.engine import Pipeline
from pipeline.errors import ConfigError
from pipeline.repository import ModelRepository
from pipeline.runners.calibration import Run, choose_batch_size

from ..fakes import PIPELINE, fake_repository, png, scene


class Network:
    """A fake network's ``run(b)``: its own seconds for a batch of b, slowed at its k-th run by
    neighbours (``load(k)`` >= 1). ``penalty``: what sharing cores adds per batch (threads
    waiting on one another), the same for any size, so it weighs most on small batches.
    ``tells``: whether a run slowed by neighbours says so (a CPU run does; on a GPU there is
    nothing to tell them by). Its clock moves a second per run."""

    def __init__(self, seconds, load=lambda k: 1.0, penalty: float = 0.0, tells: bool = True):
        self.seconds, self.load, self.penalty, self.tells = seconds, load, penalty, tells
        self.runs: list[int] = []
        self.pauses: list[float] = []

    def __call__(self, batch: int) -> Run:
        self.runs.append(batch)
        load = self.load(len(self.runs) - 1)
        busy = load > 1.0
        return Run(self.seconds(batch) * load + self.penalty * busy, alone=not (busy and self.tells))

    def clock(self) -> float:
        return float(len(self.runs))


def choose(network: Network, bound: int, patience_s: float = 60.0):
    return choose_batch_size(network, bound, patience_s=patience_s, clock=network.clock,
                             pause=network.pauses.append)


def cpu(batch: int) -> float:  # a small CPU: every frame of a batch costs a little more
    return batch * 0.100 * (1 + 0.04 * math.log2(batch))


def gpu(batch: int) -> float:  # a GPU: a fixed cost per run, shared by the batch
    return 0.020 + 0.010 * batch


# How neighbours load the machine over the ~20 runs of a calibration.
NEIGHBOURS = {
    # they were importing and loading when we began, and finish while we measure
    "fading": lambda k: max(1.0, 3.0 - 0.3 * k),
    "slowly fading": lambda k: max(1.0, 3.0 - 0.15 * k),
    # they begin measuring while we do
    "rising": lambda k: min(3.0, 1.0 + 0.3 * k),
    # one of them compiles something for three runs, twice
    "bursts": lambda k: 2.5 if k % 8 in (1, 2, 3) else 1.0,
    # two of them measure as we do, and pause when their runs are not alone: turns
    "taking turns": lambda k: 3.0 if k % 3 else 1.0,
}


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
def test_on_the_cpu_the_choice_is_the_one_made_alone_whatever_the_neighbours_do(neighbours):
    """Neighbours that share our cores slow small batches most (``penalty``); only runs
    without them are compared. Where the machine is never quiet again ("rising"), batches
    stay at the size the evidence allowed: 1 here, as alone."""
    assert choose(Network(cpu), 8)[0] == 1
    assert choose(Network(cpu, NEIGHBOURS[neighbours], penalty=0.3), 8)[0] == 1


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
def test_on_a_gpu_the_interleaving_cancels_a_load_that_comes_and_goes(neighbours):
    assert choose(Network(gpu, tells=False), 8)[0] == 8
    assert choose(Network(gpu, NEIGHBOURS[neighbours], tells=False), 8)[0] == 8


def test_runs_with_neighbours_are_run_again_after_growing_pauses():
    """Taking runs as they came, sharing cores makes batching look good: 8 chosen where the
    network alone takes 1. Runs that had neighbours are run again after random pauses (so
    replicas measuring at once take turns) and never compared."""
    turns = NEIGHBOURS["taking turns"]
    assert choose(Network(cpu, turns, penalty=0.3, tells=False), 8)[0] == 8
    network = Network(cpu, turns, penalty=0.3)
    assert choose(network, 8)[0] == 1
    assert network.pauses and max(network.pauses) <= 3.0  # random, growing, at most 2 s x 1.5


def test_patience_bounds_the_wait_and_keeps_the_size_it_could_trust(caplog):
    """Neighbours that never stop, on a network that batching would help: after the patience,
    no doubling is chosen on runs that had neighbours, and the log says how to choose."""
    network = Network(gpu, lambda k: 2.0 if k > 17 else 1.0)  # quiet for 1 -> 2 -> 4, then busy
    assert choose(network, 8, patience_s=40)[0] == 4
    assert len(network.runs) <= 42
    assert "pin batch_limit" in caplog.text


def test_sizes_take_turns_after_an_untimed_first_run_and_report_their_fastest():
    network = Network(cpu)
    best, seen = choose(network, 8)
    # batch 1 is warm (the load check ran it); 2's first run is not timed; then A B B A A B B A
    assert network.runs == [2, 1, 2, 2, 1, 1, 2, 2, 1]
    assert best == 1 and seen == pytest.approx({1: cpu(1), 2: cpu(2) / 2})
    assert network.pauses == []


def test_doubling_stops_at_the_bound():
    assert choose(Network(gpu), 4)[0] == 4
    assert choose(Network(gpu), 1) == (1, {})


def with_parameters(root, **params):
    repository = fake_repository(root)
    config = repository / PIPELINE / "config.pbtxt"
    text = config.read_text().replace(
        'parameters { key: "calibrate_batch_size" value: { string_value: "false" } }\n', "")
    config.write_text(text + "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
                                     for k, v in params.items()))
    return repository


def test_batch_limit_in_config_pins_the_batch_size(tmp_path):
    pipe = Pipeline.from_repository(with_parameters(tmp_path, batch_limit="3"), PIPELINE, "cpu")
    assert pipe.batch_limit == 3 and pipe.max_batch_size == 8  # 3: never a measured size
    assert pipe.ledger.totals(PIPELINE).batch_limit == 3
    assert [len(batch) for batch in pipe.batches([pipe.accept(png(scene()))] * 7)] == [3, 3, 1]


@pytest.mark.parametrize("params, words", [
    ({"batch_limit": "0"}, "parameters.batch_limit': must be a whole number in 1..max_batch_size (8), got '0'"),
    ({"batch_limit": "9"}, "got '9'"),
    ({"batch_limit": "four"}, "got 'four'"),
    ({"batch_limit": "2", "calibrate_batch_size": "true"}, "keep one of the two"),
    ({"calibrate_batch_size": "sometimes"}, "parameters.calibrate_batch_size': must be true or false"),
])
def test_an_unusable_batch_setting_is_refused_at_load_naming_the_parameter(tmp_path, params, words):
    with pytest.raises(ConfigError, match="config.pbtxt: field '") as info:
        ModelRepository.load(with_parameters(tmp_path, **params)).get(PIPELINE)
    assert words in str(info.value)
