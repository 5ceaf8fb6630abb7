"""What the model can do, measured: its tokens/s at each forward size, and from that how
long a forward of any size takes and how big a forward must be to run efficiently.

Every bound of the batcher is in units of this measurement, never in absolute seconds: a
2M-parameter model on 2 CPU cores runs a forward in milliseconds, a 70B teacher on GPUs
in seconds, and a GPU's first forwards are several times slower than its steady state.
`warm_up` fills it before the first request is admitted; every real forward keeps it
current (`observe`).

Rates are kept per size, by powers of two, because they differ with size in opposite
directions on the two kinds of hardware: on a GPU tokens/s grows with the forward until
the device is full; on CPU cores it peaks at a few hundred to a few thousand tokens and
then falls (2 cores, docs/benchmarks.md: a 2M model 24k tokens/s at 1k tokens, 15k at
8k). One rate for every size is wrong at one end or the other.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RATE_WEIGHT = 0.3  # the newest forward's weight in its size's rate
# the efficient batch: the smallest forward whose rate is within this of the best one
EFFICIENT_FRACTION = 0.9
# warm-up doubles its forward while the rate still grows by this much over the best so far
WARM_UP_GROWTH = 1.1
# a warm-up forward longer than this is the last: start-up should take seconds, and real
# forwards measure the bigger sizes (a start-up cost, not a serving policy)
WARM_UP_LONGEST_SECONDS = 2.0


def size_bucket(tokens: int) -> int:
    """The power of two at or below `tokens` (at least 1): forwards of one bucket share a rate."""
    return 1 << max(0, int(tokens).bit_length() - 1)


class Capacity:
    """Tokens/s by forward size, each an EWMA of tokens and of seconds (a ratio of
    averages, so a slow outlier weighs by its length)."""

    def __init__(self) -> None:
        self._tokens: dict[int, float] = {}
        self._seconds: dict[int, float] = {}
        self._recent = [0.0, 0.0]  # tokens and seconds of recent forwards, whatever their size

    @property
    def measured(self) -> bool:
        """Whether any forward has been timed (before that, nothing is known)."""
        return bool(self._tokens)

    def observe(self, tokens: int, seconds: float) -> None:
        """A forward of `tokens` (what it fed the model) took `seconds`, scoring included."""
        if tokens <= 0 or seconds <= 0:
            return
        size = size_bucket(tokens)
        if size not in self._tokens:  # the first forward of a size is its rate outright
            self._tokens[size], self._seconds[size] = float(tokens), seconds
        else:
            self._tokens[size] += RATE_WEIGHT * (tokens - self._tokens[size])
            self._seconds[size] += RATE_WEIGHT * (seconds - self._seconds[size])
        if not self._recent[1]:
            self._recent = [float(tokens), seconds]
        else:
            self._recent[0] += RATE_WEIGHT * (tokens - self._recent[0])
            self._recent[1] += RATE_WEIGHT * (seconds - self._recent[1])

    def rates(self) -> dict[int, float]:
        """tokens/s of each measured size bucket."""
        return {size: self._tokens[size] / self._seconds[size] for size in sorted(self._tokens)}

    def rate(self, tokens: int) -> float:
        """tokens/s of a forward of `tokens`: its size's, else the nearest measured size's
        (log scale; the larger of two as near). Needs a measurement."""
        wanted = math.log2(size_bucket(tokens))
        nearest = min(self._tokens, key=lambda size: (abs(math.log2(size) - wanted), -size))
        return self._tokens[nearest] / self._seconds[nearest]

    def seconds(self, tokens: int) -> float:
        """How long one forward of `tokens` takes, at the rate measured at its size."""
        return tokens / self.rate(tokens)

    def drain_seconds(self, tokens: float) -> float:
        """How long the model takes for `tokens` in the forwards it runs now: at the rate of
        the recent forwards, whatever their size (so a queue's drain time is right whichever
        size the batcher's budget gives its forwards)."""
        return tokens * self._recent[1] / self._recent[0]

    def efficient_tokens(self) -> int:
        """The smallest measured forward size within EFFICIENT_FRACTION of the best rate:
        below it the hardware idles, above it a forward is only longer."""
        rates = self.rates()
        best = max(rates.values())
        return min(size for size, rate in rates.items() if rate >= EFFICIENT_FRACTION * best)

    def describe(self) -> str:
        return ", ".join(f"{size}: {rate:,.0f}" for size, rate in self.rates().items())


def warm_up(
    capacity: Capacity,
    run: Callable[[int], int],
    first: int,
    ceiling: int,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Time forwards of `first`, 2 x `first`, ... tokens up to `ceiling` into `capacity`.
    `run(n)` runs one forward of about n tokens and returns the tokens it fed.

    The first forward runs twice and its first time is discarded (lazy initialisation,
    cold caches, a GPU's kernel selection). The sizes stop growing once the rate has
    not grown by WARM_UP_GROWTH for two sizes (CPU cores: past their peak), or a forward
    took WARM_UP_LONGEST_SECONDS, or failed (a device out of memory: logged, and the
    service starts with what ran; the first forward failing is raised)."""
    run(first)
    size, best, flat = first, 0.0, 0
    while True:
        started = clock()
        try:
            fed = run(size)
        except RuntimeError as error:  # out of memory, say: say so, serve what did run
            log.warning(
                "warm-up: a forward of %d tokens failed (%s); --max-batch-tokens %d may not "
                "fit this device",
                size,
                error,
                ceiling,
            )
            break
        seconds = clock() - started
        capacity.observe(fed, seconds)
        rate = fed / seconds
        flat = 0 if rate >= WARM_UP_GROWTH * best else flat + 1
        best = max(best, rate)
        if size >= ceiling or flat >= 2 or seconds >= WARM_UP_LONGEST_SECONDS:
            break
        size = min(ceiling, 2 * size)
    log.info("warm-up: tokens/s by forward size {%s}", capacity.describe())
