"""The dynamic-batching path (infer/dynamic.py): requests join a running batch and leave it at every step,
end, stream and cancel on their own, and keep their greedy answers."""

from __future__ import annotations

import threading
from collections import deque

import pytest

from helpers import QUESTION, make_run_dir
from sftflow.config.run_dir import infer_args
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = load_engine(infer_args(str(run_dir), ["serve_max_queue=8"]), batched=True)
    assert engine._dynamic is not None  # the default serve_batching
    yield engine
    engine.close()


def hold_worker(engine):
    """Keep the worker busy until the returned event is set, so that the next jobs queue up together."""
    started, release = threading.Event(), threading.Event()
    original = engine._dynamic.read

    def read(jobs):  # the blocker's prompt is read (whether the worker was idle or not) after release
        engine._dynamic.read = original
        started.set()
        release.wait(timeout=60)
        return original(jobs)

    engine._dynamic.read = read
    blocker = engine.submit(QUESTION, SamplingParams(max_new_tokens=1))
    assert started.wait(timeout=60)  # the worker holds the blocker: what comes next queues up
    return release, blocker


def steps(engine):
    """Record the rows of every decode step the path runs."""
    seen: list[int] = []
    original = engine._dynamic.step

    def step(rows):
        seen.append(len(rows.jobs))
        return original(rows)

    engine._dynamic.step = step
    return seen, lambda: setattr(engine._dynamic, "step", original)


def test_a_short_answer_resolves_before_its_batch_ends(engine):
    release, blocker = hold_worker(engine)
    seen, restore = steps(engine)
    try:
        long = engine.submit(QUESTION, SamplingParams(max_new_tokens=300))
        short = engine.submit(QUESTION, SamplingParams(max_new_tokens=2))
        release.set()
        blocker.result(timeout=60)
        assert short.result(timeout=60).choices[0].completion_tokens == 2
        assert not long.done()  # the long row still runs in the same batch
        assert long.result(timeout=120).choices[0].completion_tokens == 300
    finally:
        restore()
    # the blocker's 1 token needs no step; then 2 rows until the short one leaves, then the long one alone
    assert seen == [2] + [1] * (300 - 2)


def test_one_cancelled_row_leaves_the_others_running(engine):
    release, blocker = hold_worker(engine)
    kept = engine.submit(QUESTION, SamplingParams(max_new_tokens=40))
    stream, _ = engine.stream(QUESTION, SamplingParams(max_new_tokens=400))
    release.set()
    blocker.result(timeout=60)
    pieces = iter(stream)
    next(pieces)
    stream.close()  # the client went away
    assert stream.completion_tokens < 400
    assert kept.result(timeout=120).choices[0].completion_tokens == 40
    assert engine.held == 0


def test_streamed_rows_of_one_batch_equal_their_plain_answers(engine):
    questions = [[{"role": "user", "content": "Tell me more" + "!" * i}] for i in range(3)]
    params = SamplingParams(max_new_tokens=12)
    expected = [engine.generate(q, params).choices[0].text for q in questions]  # one at a time
    release, blocker = hold_worker(engine)
    seen, restore = steps(engine)
    try:
        streams = [engine.stream(q, params)[0] for q in questions]
        release.set()
        blocker.result(timeout=60)
        assert ["".join(s) for s in streams] == expected
    finally:
        restore()
    assert seen == [3] * (12 - 1)  # the first token comes from reading the prompts


def test_greedy_and_sampled_rows_share_a_batch_up_to_a_request_that_cannot_join(engine):
    greedy = [[{"role": "user", "content": "Count" + " up" * i}] for i in range(2)]
    expected = [engine.submit(q, SamplingParams(max_new_tokens=3, seed=0)).result(timeout=60) for q in greedy]
    release, blocker = hold_worker(engine)
    seen, restore = steps(engine)
    try:
        futures = [
            engine.submit(greedy[0], SamplingParams(max_new_tokens=3)),
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3, temperature=0.7)),
            engine.submit(greedy[1], SamplingParams(max_new_tokens=3)),
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3, logprobs=True)),  # exact path
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3, temperature=0.7)),
        ]
        release.set()
        blocker.result(timeout=60)
        got = [f.result(timeout=60).choices[0] for f in futures]
    finally:
        restore()
    assert all(c.completion_tokens == 3 for c in got) and got[3].logprobs
    assert [got[0].token_ids, got[2].token_ids] == [e.choices[0].token_ids for e in expected]
    # three rows (greedy and sampled) decode together; the logprobs request runs alone after them and
    # the last one, which arrived after it, waits for it: arrival order is kept
    assert seen == [3, 3, 1, 1]


def test_a_request_sent_mid_batch_joins_it_and_the_running_answer_is_unchanged(engine):
    long_params = SamplingParams(max_new_tokens=200)
    exact = engine.submit(QUESTION, SamplingParams(max_new_tokens=200, seed=0))  # seed: the exact path
    expected = exact.result(timeout=120).choices[0]
    assert expected.completion_tokens == 200  # the tiny model never stops on its own
    # one joiner shorter than the running row (its KV is padded), one longer (the batch's KV is padded)
    joiners = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Tell me " * 10}]]
    alone = [engine.submit(q, SamplingParams(max_new_tokens=3, seed=0)).result(timeout=60) for q in joiners]
    for joiner, answer in zip(joiners, alone, strict=True):
        before = engine._dynamic.joined
        stream, _ = engine.stream(QUESTION, long_params)
        pieces = iter(stream)
        text = [next(pieces)]  # the long answer is under way
        short = engine.submit(joiner, SamplingParams(max_new_tokens=3)).result(timeout=60).choices[0]
        assert not stream._job.done  # the short request did not wait for the long one to end
        text += list(pieces)
        assert engine._dynamic.joined == before + 1  # it joined the running batch
        assert short.token_ids == answer.choices[0].token_ids
        assert stream._job.answer == expected.token_ids  # greedy: the same tokens as without the joiner
        assert "".join(text) == expected.text and stream.completion_tokens == 200


def test_a_shared_system_prompt_is_read_once_and_answers_are_unchanged(engine):
    system = {"role": "system", "content": "You are a careful assistant who answers in one short line. " * 3}
    questions = [[system, {"role": "user", "content": "Question " + "why " * i}] for i in range(4)]
    params = SamplingParams(max_new_tokens=10)
    expected = [
        engine.submit(q, SamplingParams(max_new_tokens=10, seed=0)).result(timeout=60) for q in questions
    ]
    engine._dynamic.prefixes.clear()
    for _ in range(2):  # the second batch reuses the first one's prefix
        release, blocker = hold_worker(engine)
        futures = [engine.submit(q, params) for q in questions]
        release.set()
        blocker.result(timeout=60)
        got = [f.result(timeout=60).choices[0] for f in futures]
        assert [c.token_ids for c in got] == [e.choices[0].token_ids for e in expected]
    (prefix,) = engine._dynamic.prefixes  # one shared prefix, cached once
    assert len(prefix) >= 16 and all(engine.encode(q)[: len(prefix)] == list(prefix) for q in questions)


def test_a_waiting_request_that_cannot_join_is_not_passed(engine):
    before = engine._dynamic.joined
    stream, _ = engine.stream(QUESTION, SamplingParams(max_new_tokens=200))
    pieces = iter(stream)
    next(pieces)
    scored = engine.submit(QUESTION, SamplingParams(max_new_tokens=2, logprobs=True))  # the exact path
    plain = engine.submit(QUESTION, SamplingParams(max_new_tokens=2))  # could join, but arrived later
    list(pieces)
    assert scored.result(timeout=60).choices[0].logprobs and plain.result(timeout=60)
    assert engine._dynamic.joined == before  # plain waited behind scored: each in arrival order


def test_cached_prefixes_make_way_for_rows_when_memory_is_short(engine):
    from sftflow.infer.requests import Job

    dynamic = engine._dynamic
    budget, prefixes = dynamic.cache_budget, dict(dynamic.prefixes)
    stops = engine.generator.stop_id_set
    jobs = [
        Job(engine.tokenizer, stops, engine.encode(QUESTION), SamplingParams(), 4, False, None)
        for _ in range(4)
    ]
    width = len(jobs[0].prompt_ids) + 4
    dynamic.cache_budget = 4 * width * dynamic.token_bytes  # room for the 4 rows, not for prefixes too
    dynamic.prefixes = {tuple(range(i, i + 50)): None for i in range(3)}
    try:
        group = dynamic.admit(None, deque(jobs))
        assert group == jobs  # all four joined: the batch did not shrink for the cache
        assert len(dynamic.prefixes) < 3  # the least recently used prefixes gave way
        assert all(prefix[0] != 0 for prefix in dynamic.prefixes)
    finally:
        dynamic.cache_budget, dynamic.prefixes = budget, prefixes
        for job in jobs:
            job.finish()


def test_a_closed_engine_refuses_new_requests(tiny_model_dir, tmp_path):
    from sftflow.errors import SftflowError

    closed = load_engine(infer_args(str(make_run_dir(tiny_model_dir, tmp_path)), []), batched=True)
    closed.close()
    closed.close()  # idempotent
    with pytest.raises(SftflowError, match="closed"):
        closed.submit(QUESTION, SamplingParams(max_new_tokens=2))
    assert closed.held == 0


def test_a_request_queued_while_the_engine_closes_is_still_answered(tiny_model_dir, tmp_path):
    engine = load_engine(infer_args(str(make_run_dir(tiny_model_dir, tmp_path)), []), batched=True)
    inside, go = threading.Event(), threading.Event()
    hold = engine._hold

    def slow_hold(count):  # the request has passed the closed check and is about to be queued
        inside.set()
        go.wait(timeout=60)
        hold(count)

    engine._hold = slow_hold
    futures = []
    sender = threading.Thread(
        target=lambda: futures.append(engine.submit(QUESTION, SamplingParams(max_new_tokens=2)))
    )
    sender.start()
    assert inside.wait(timeout=60)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(timeout=0.5)
    assert closer.is_alive()  # close() waits for the request being queued
    go.set()
    sender.join(timeout=60)
    closer.join(timeout=60)
    assert (
        futures[0].result(timeout=1).choices[0].completion_tokens == 2
    )  # answered before the worker stopped
    assert engine.held == 0
