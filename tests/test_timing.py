"""The sampler under bench and gradcheck: which calls it times, in which order (a fake clock, no timings)."""
import pytest

from jaxconv import timing


class FakeClock:
    def __init__(self):
        self.now, self.calls = 0.0, []

    def perf_counter(self):
        return self.now

    def contender(self, name, cost_of):  # the k-th call of `name` takes cost_of(k) seconds
        def run():
            k = sum(1 for c in self.calls if c == name)
            self.calls.append(name)
            self.now += cost_of(k)
        return run


def test_rounds_alternate_and_the_first_call_of_each_block_is_not_timed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    # a's first call of every round is slow (what a library's idle threads do to whoever runs next), b is steady
    runs = {"a": clock.contender("a", lambda k: 1.0 if k == 0 or (k >= 3 and (k - 3) % 3 == 0) else 0.25),
            "b": clock.contender("b", lambda k: 5.0 if k == 0 else 0.5)}
    out = timing.time_calls(runs, steps=4, warmup=2, block=3)
    # first calls, 2 warm-up rounds, then 2 rounds of 3 calls each
    assert clock.calls == ["a", "b"] + ["a", "b"] * 2 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert out["a"] == dict(first_s=1.0, median_s=0.25, q25_s=0.25, q75_s=0.25, samples=4, times_s=[0.25] * 4)
    assert out["b"]["first_s"] == 5.0 and out["b"]["median_s"] == 0.5 and out["b"]["samples"] == 4


def test_block_one_times_every_call(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    runs = {"a": clock.contender("a", lambda k: float(k))}
    out = timing.time_calls(runs, steps=5, warmup=0, block=1)
    assert clock.calls == ["a"] * 6
    assert out["a"]["median_s"] == 3.0 and out["a"]["q25_s"] == 2.0 and out["a"]["q75_s"] == 4.0
    with pytest.raises(ValueError, match="time_calls: steps and block must be >= 1"):
        timing.time_calls(runs, steps=0)


def test_speed_ups_are_spread_over_the_rounds_pairing_calls_of_one_round(monkeypatch):
    """The machine slows every other round: each contender's own times spread 2x, but within a round b takes
    exactly twice a's time, so the call-by-call ratios do not spread at all; a steady b against a steady a
    spreads only with b's own noise."""
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    runs = {"a": clock.contender("a", lambda k: 1.0 if k % 2 else 2.0),
            "b": clock.contender("b", lambda k: 2.0 if k % 2 else 4.0)}
    out = timing.time_calls(runs, steps=4, warmup=0, block=1)
    assert out["a"]["times_s"] == [1.0, 2.0, 1.0, 2.0] and out["b"]["times_s"] == [2.0, 4.0, 2.0, 4.0]
    assert (out["a"]["q25_s"], out["a"]["q75_s"]) == (1.0, 2.0)
    assert timing.ratio_quartiles(out["b"], out["a"]) == (2.0, 2.0)
    steady = {"a": {"times_s": [1.0] * 4}, "b": {"times_s": [2.0, 3.0, 2.0, 3.0]}}
    assert timing.ratio_quartiles(steady["b"], steady["a"]) == (2.0, 3.0)
