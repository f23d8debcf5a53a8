"""The online endpoint's text batcher (serving.batching.TextBatcher), without Ray: batches form
when the model is free from every text waiting, a lone text waits at most the configured time,
and a failing or cancelled request touches no other batch."""

from __future__ import annotations

import asyncio

import pytest

from serving.batching import TextBatcher


class Model:
    """Records each batch; answers after `seconds` (the model thread's work), or once `held`
    is set where the test holds it, or raises."""

    def __init__(self, seconds: float = 0.05, held: bool = False):
        self.seconds = seconds
        self.held = asyncio.Event() if held else None
        self.batches: list[list[str]] = []
        self.fail_on: str | None = None

    async def __call__(self, texts: list[str], predictors: list) -> list[dict]:
        self.batches.append(list(texts))
        if self.held is not None:
            await self.held.wait()
        else:
            await asyncio.sleep(self.seconds)
        if self.fail_on in texts:
            raise RuntimeError("model broke")
        return [{"label": text.upper(), "by": p} for text, p in zip(texts, predictors, strict=True)]


async def _until_in_the_model(model: Model, batches: int) -> None:
    """Yield to the loop until the model has started `batches` batches (a few turns)."""
    for _ in range(100):
        if len(model.batches) >= batches:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the model started {model.batches}, not {batches} batches")


# The model is held, not slept: timed with sleeps, a loaded machine (the Ray tests beside these)
# let 50 ms of "model work" end before the test's next step, and a cancelled text rode along.
def test_texts_arriving_while_a_batch_runs_ride_together_in_the_next():
    async def scenario():
        model = Model(held=True)
        batcher = TextBatcher(model, max_batch_size=64, batch_wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit("a", 1))
        await _until_in_the_model(model, 1)  # "a" runs alone: the model was idle, no wait set
        later = [asyncio.create_task(batcher.submit(t, 2)) for t in "bcdef"]
        await asyncio.sleep(0)  # they queue while "a" is in the model
        model.held.set()
        answers = await asyncio.gather(first, *later)
        return model.batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [["a"], list("bcdef")]
    assert [a["label"] for a in answers] == list("ABCDEF")
    assert [a["by"] for a in answers] == [1, 2, 2, 2, 2, 2]


def test_max_batch_size_caps_a_batch_and_the_rest_follow():
    async def scenario():
        model = Model(0.01)
        batcher = TextBatcher(model, max_batch_size=3, batch_wait_timeout_s=0.0)
        await asyncio.gather(*(batcher.submit(t, 0) for t in "abcdefg"))
        return model.batches

    assert asyncio.run(scenario()) == [list("abc"), list("def"), ["g"]]


def test_a_text_waits_for_company_only_after_a_batch_that_had_some():
    async def scenario(wait_s: float):
        model = Model(0.0)
        batcher = TextBatcher(model, max_batch_size=64, batch_wait_timeout_s=wait_s)
        began = asyncio.get_running_loop().time()
        await batcher.submit("alone", 0)  # a lone client: no wait at all
        alone_s = asyncio.get_running_loop().time() - began
        await asyncio.gather(batcher.submit("x", 0), batcher.submit("y", 0))  # company
        first = asyncio.create_task(batcher.submit("a", 0))
        await asyncio.sleep(0.03)
        await asyncio.gather(first, batcher.submit("b", 0))
        return model.batches, alone_s

    batches, alone_s = asyncio.run(scenario(0.3))
    assert alone_s < 0.2 and batches == [["alone"], ["x", "y"], ["a", "b"]]  # "b" was waited for
    batches, _ = asyncio.run(scenario(0.0))
    assert batches == [["alone"], ["x", "y"], ["a"], ["b"]]  # no wait: "a" did not wait for it


def test_reconfigure_changes_a_running_batcher():
    async def scenario():
        model = Model(0.01)
        batcher = TextBatcher(model, max_batch_size=64, batch_wait_timeout_s=0.0)
        await batcher.submit("a", 0)
        batcher.configure(2, 0.0)
        await asyncio.gather(*(batcher.submit(t, 0) for t in "bcd"))
        return model.batches

    assert asyncio.run(scenario()) == [["a"], ["b", "c"], ["d"]]


def test_a_failing_batch_fails_its_requests_only():
    async def scenario():
        model = Model(0.02)
        model.fail_on = "bad"
        batcher = TextBatcher(model, max_batch_size=2, batch_wait_timeout_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(t, 0)) for t in ("ok", "bad", "fine")]
        return await asyncio.gather(*tasks, return_exceptions=True), model.batches

    answers, batches = asyncio.run(scenario())
    assert batches == [["ok", "bad"], ["fine"]]
    assert isinstance(answers[0], RuntimeError) and isinstance(answers[1], RuntimeError)
    assert answers[2]["label"] == "FINE"


def test_a_request_cancelled_while_waiting_is_left_out_of_its_batch():
    async def scenario():
        model = Model(held=True)
        batcher = TextBatcher(model, max_batch_size=64, batch_wait_timeout_s=0.0)
        running = asyncio.create_task(batcher.submit("a", 0))
        await _until_in_the_model(model, 1)
        gone = asyncio.create_task(batcher.submit("gone", 0))
        kept = asyncio.create_task(batcher.submit("kept", 0))
        await asyncio.sleep(0)  # both queue while "a" is in the model
        gone.cancel()
        model.held.set()
        await asyncio.gather(running, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.batches

    assert asyncio.run(scenario()) == [["a"], ["kept"]]


def test_waiting_counts_the_texts_queued_and_not_those_cancelled():
    """What raylift_queued_texts reports: a text whose request was cancelled while it waited
    is not waiting any more (counted per request, the gauge only grew past such texts)."""

    async def scenario():
        model = Model(held=True)
        batcher = TextBatcher(model, max_batch_size=64, batch_wait_timeout_s=0.0)
        running = asyncio.create_task(batcher.submit("a", 0))
        await _until_in_the_model(model, 1)
        queued = [asyncio.create_task(batcher.submit(t, 0)) for t in ("b", "c", "gone")]
        await asyncio.sleep(0)
        seen = [batcher.waiting]  # "a" is in the model, three wait
        queued[-1].cancel()
        await asyncio.sleep(0)
        seen.append(batcher.waiting)
        model.held.set()
        await asyncio.gather(running, *queued[:2])
        seen.append(batcher.waiting)
        return seen

    assert asyncio.run(scenario()) == [3, 2, 0]
