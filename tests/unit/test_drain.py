"""When a stopping worker finishes its stage and when it hands it back (worker/drain.py)."""

from __future__ import annotations

from types import SimpleNamespace

from farm.worker.drain import FINISH_SECONDS, HANDBACK_SECONDS, Drain, InFlight


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_that_fits_in_the_grace_finishes_and_one_that_does_not_is_handed_back() -> None:
    clock = Clock()
    drain = Drain(grace=30.0, clock=clock)
    assert not drain.must_hand_back(1000, 1.0)  # no stop requested: never
    drain.request()
    room = 30.0 - HANDBACK_SECONDS - FINISH_SECONDS
    assert not drain.must_hand_back(10, room / 10)
    assert drain.must_hand_back(11, room / 10)
    clock.now += 5  # five seconds later the same work no longer fits
    assert drain.must_hand_back(10, room / 10)
    assert not drain.must_hand_back(0, 100.0)  # only decoding left: finish
    assert not drain.must_hand_back(None, 1.0) and not drain.must_hand_back(5, None)
    first = drain.since
    drain.request()  # a second signal keeps the first one's time
    assert drain.since == first


def test_steps_left_counts_the_image_in_flight_and_the_images_after_it() -> None:
    inflight = InFlight(stage="full")
    pipe = SimpleNamespace(num_timesteps=20)
    inflight.begin_image(0, generator=None)
    for i in range(20):
        inflight.note_step(pipe, i, {"latents": i})
    assert inflight.images[0].complete and inflight.steps_left(3) == 40
    inflight.begin_image(1, generator=None)
    inflight.note_step(pipe, 0, {"latents": "x"})
    assert inflight.steps_left(3) == 19 + 20 and inflight.steps == 21
    resumed = InFlight(stage="full")
    resumed.begin_image(0, generator=None, first_step=15)
    resumed.note_step(SimpleNamespace(num_timesteps=5), 0, {})
    assert resumed.images[0].done == 16 and resumed.steps_left(1) == 4
    assert InFlight().steps_left(1) is None  # a backend that does not say: no estimate
