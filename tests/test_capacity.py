"""The model's measured speed (teacher_service/capacity.py): rates by forward size, the
efficient batch, and the warm-up that measures them before the first request."""

from __future__ import annotations

import pytest

from teacher_service.capacity import (
    EFFICIENT_FRACTION,
    WARM_UP_LONGEST_SECONDS,
    Capacity,
    size_bucket,
    warm_up,
)


def test_sizes_share_a_rate_by_powers_of_two():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 511, 512, 513, 1023, 1024)] == [
        1, 1, 2, 2, 256, 512, 512, 512, 1024,
    ]  # fmt: skip


def test_each_size_keeps_its_own_rate_and_an_unmeasured_size_takes_the_nearest():
    capacity = Capacity()
    assert not capacity.measured
    capacity.observe(256, 0.02)  # 12,800 tokens/s
    capacity.observe(4096, 0.1)  # 40,960 tokens/s: a GPU's rate grows with the forward
    assert capacity.measured
    assert capacity.rate(300) == pytest.approx(12_800)
    assert capacity.rate(5000) == pytest.approx(40_960)
    assert capacity.rate(64) == pytest.approx(12_800)  # nearest on a log scale
    assert capacity.rate(1 << 20) == pytest.approx(40_960)
    assert capacity.rate(1024) == pytest.approx(40_960)  # 2 steps from either: the larger
    assert capacity.seconds(8192) == pytest.approx(0.2)
    assert capacity.seconds(256) == pytest.approx(0.02)


def test_a_queue_drains_at_the_rate_of_the_forwards_run_lately_whatever_their_size():
    capacity = Capacity()
    capacity.observe(256, 0.02)
    capacity.observe(4096, 0.1)  # the EWMAs: 256 + 0.3 x 3840 tokens in 0.02 + 0.3 x 0.08 s
    assert capacity.drain_seconds(1408) == pytest.approx(0.044)
    assert capacity.drain_seconds(0) == 0.0


def test_a_rate_is_a_ratio_of_averages_that_follows_the_newest_forwards():
    capacity = Capacity()
    capacity.observe(1000, 1.0)
    capacity.observe(1000, 0.5)  # 30 % towards 0.5 s: 1000 / 0.85
    assert capacity.rate(1000) == pytest.approx(1000 / 0.85)
    capacity.observe(0, 1.0)  # nothing ran: nothing learnt
    capacity.observe(10, 0.0)
    assert capacity.rate(1000) == pytest.approx(1000 / 0.85)


@pytest.mark.parametrize(
    ("rates", "efficient"),
    [
        ({512: 850, 1024: 1000, 2048: 1000, 4096: 950}, 1024),  # CPU: past a peak, slower
        ({512: 10, 1024: 20, 2048: 40, 4096: 80}, 4096),  # a GPU filling up
        ({512: 1000}, 512),
    ],
    ids=["cpu-like", "gpu-like", "one-size"],
)
def test_the_efficient_batch_is_the_smallest_within_a_tenth_of_the_best_rate(rates, efficient):
    capacity = Capacity()
    for size, rate in rates.items():
        capacity.observe(size, size / rate)
    assert capacity.efficient_tokens() == efficient
    best = max(rates.values())
    assert rates[efficient] >= EFFICIENT_FRACTION * best


class FakeModel:
    """A forward of n tokens takes overhead + n / rate(n) seconds on a fake clock."""

    def __init__(self, overhead: float, rate) -> None:
        self.overhead, self.rate, self.now, self.sizes = overhead, rate, 0.0, []

    def clock(self) -> float:
        return self.now

    def run(self, tokens: int) -> int:
        self.sizes.append(tokens)
        self.now += self.overhead + tokens / self.rate(tokens)
        return tokens


def test_warm_up_doubles_until_the_ceiling_while_the_rate_grows():
    gpu = FakeModel(0.02, lambda n: 100_000)  # a fixed cost per forward: bigger is faster
    capacity = Capacity()
    warm_up(capacity, gpu.run, 512, 8192, clock=gpu.clock)
    assert gpu.sizes == [512, 512, 1024, 2048, 4096, 8192]  # the first twice: it is cold
    assert capacity.efficient_tokens() == 8192
    assert capacity.rate(8192) == pytest.approx(8192 / (0.02 + 8192 / 100_000))


def test_warm_up_stops_once_the_rate_no_longer_grows_or_a_forward_is_long():
    cpu = FakeModel(0.0, lambda n: 20_000 if n <= 1024 else 15_000)  # peaks early
    capacity = Capacity()
    warm_up(capacity, cpu.run, 512, 1 << 20, clock=cpu.clock)
    assert cpu.sizes == [512, 512, 1024, 2048]  # two sizes without growth: enough
    slow = FakeModel(0.0, lambda n: 200.0)  # 512 tokens take 2.56 s
    warm_up(Capacity(), slow.run, 512, 1 << 20, clock=slow.clock)
    assert slow.sizes == [512, 512] and WARM_UP_LONGEST_SECONDS <= 512 / 200


def test_a_warm_up_forward_that_fails_ends_the_warm_up_with_a_warning(caplog):
    def run(tokens: int) -> int:
        if tokens > 1024:
            raise RuntimeError("CUDA out of memory")  # what torch.OutOfMemoryError is
        return tokens

    capacity = Capacity()
    warm_up(capacity, run, 512, 8192)
    assert set(capacity.rates()) == {512, 1024}
    assert "a forward of 2048 tokens failed (CUDA out of memory)" in caplog.text
    assert "--max-batch-tokens 8192 may not fit" in caplog.text
    with pytest.raises(RuntimeError):  # the first forward failing: the model cannot run
        warm_up(Capacity(), lambda tokens: run(4096), 4096, 8192)
