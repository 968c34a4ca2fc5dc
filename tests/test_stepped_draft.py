"""Drafts computed as read (:class:`adapters.stepped_draft.SteppedDraft`): the batching of
``want``, the draft's length, and where a remote error surfaces."""

from __future__ import annotations

import asyncio

import pytest

from adapters.base import Candidate, ContextExhausted, Position, RemoteUnavailable
from adapters.stepped_draft import SteppedDraft


def position(i: int, eot: bool = False) -> Position:
    c = Candidate(b"", 0.0, "<eot>", is_eot=True) if eot else Candidate(f"t{i}".encode(), -0.5, f"t{i}", i)
    return Position((c,), c)


class Steps:
    """A remote that computes positions 0, 1, 2, … (the end of turn at ``eot``), failing at ``fail``."""

    def __init__(self, eot: int | None = None, fail: int | None = None, error: Exception | None = None) -> None:
        self.next, self.eot, self.fail, self.error = 0, eot, fail, error
        self.calls: list[int] = []

    def __call__(self, count: int) -> tuple[list[Position], bool]:
        self.calls.append(count)
        out = []
        for _ in range(count):
            if self.next == self.fail:
                if out:
                    return out, False
                raise self.error or RemoteUnavailable("gone")
            pos = position(self.next, eot=self.next == self.eot)
            self.next += 1
            out.append(pos)
            if pos.sampled.is_eot:
                return out, True
        return out, False


async def read(stream: SteppedDraft, wants: list[int]) -> list[int]:
    got = []
    for w in wants:
        stream.want(w)
        for _ in range(w):
            try:
                pos = await anext(stream)
            except StopAsyncIteration:
                return got
            got.append(-1 if pos.sampled.is_eot else pos.sampled.token_id)
    return got


def test_positions_are_computed_as_many_at_a_time_as_wanted_and_no_more():
    steps = Steps()
    stream = SteppedDraft(steps, n_tokens=20, prompt_tokens=9, executor=None)
    assert asyncio.run(read(stream, [1, 3, 4])) == list(range(8))
    assert steps.calls == [1, 3, 4]  # one step per chunk, nothing computed ahead
    assert asyncio.run(stream.prompt_token_count()) == 9


def test_a_draft_holds_at_most_n_tokens_and_ends_at_its_end_of_turn():
    steps = Steps()
    stream = SteppedDraft(steps, n_tokens=5, prompt_tokens=1, executor=None)
    assert asyncio.run(read(stream, [4, 4])) == [0, 1, 2, 3, 4]
    assert steps.calls == [4, 1]
    steps = Steps(eot=2)
    stream = SteppedDraft(steps, n_tokens=10, prompt_tokens=1, executor=None)
    assert asyncio.run(read(stream, [8, 8])) == [0, 1, -1]
    assert steps.calls == [8]


def test_a_closed_draft_computes_nothing_more():
    steps = Steps()
    stream = SteppedDraft(steps, n_tokens=10, prompt_tokens=1, executor=None)

    async def go() -> list[int]:
        first = await read(stream, [2])
        await stream.aclose()
        return first + await read(stream, [3])

    assert asyncio.run(go()) == [0, 1]
    assert steps.calls == [2]


@pytest.mark.parametrize("error", [RemoteUnavailable("the adapter is shut down"), ContextExhausted("full")])
def test_a_remote_error_is_raised_by_the_first_read_and_later_ends_the_draft(error):
    stream = SteppedDraft(Steps(fail=0, error=error), n_tokens=10, prompt_tokens=1, executor=None)
    with pytest.raises(type(error)):
        asyncio.run(read(stream, [1]))
    # Later (the context full after 3 drafted positions): the draft ends there; the next
    # call meets the error at its first position and reports it.
    stream = SteppedDraft(Steps(fail=3, error=error), n_tokens=10, prompt_tokens=1, executor=None)
    assert asyncio.run(read(stream, [2, 4])) == [0, 1, 2]


def test_other_errors_reach_the_reader():
    def broken(count: int) -> tuple[list[Position], bool]:
        raise ValueError("a bug")

    stream = SteppedDraft(broken, n_tokens=10, prompt_tokens=1, executor=None)
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(read(stream, [1]))
