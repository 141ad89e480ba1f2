"""The dynamic-batching path (infer/dynamic.py): rows of one batch end, stream and cancel on their own,
and only requests one GenerationConfig can serve share a batch."""

from __future__ import annotations

import threading

import pytest

from sftflow.config.run_dir import infer_args
from sftflow.infer.engine import SamplingParams, load_engine
from test_infer_engine import QUESTION, make_run_dir


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    run_dir = make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"))
    engine = load_engine(infer_args(str(run_dir), ["serve_max_queue=8"]), batched=True)
    assert engine._dynamic is not None  # the default serve_batching
    yield engine
    engine.close()


def hold_worker(engine):
    """Keep the worker busy until the returned event is set, so that the next jobs queue up together."""
    started, release = threading.Event(), threading.Event()
    original = engine._dynamic.run

    def run(jobs, *rest):
        engine._dynamic.run = original
        started.set()
        release.wait(timeout=60)
        return original(jobs, *rest)

    engine._dynamic.run = run
    blocker = engine.submit(QUESTION, SamplingParams(max_new_tokens=1))
    assert started.wait(timeout=60)  # the worker runs the blocker: what comes next queues up
    return release, blocker


def batches(engine):
    """Record the rows of every batch the path runs."""
    seen: list[list] = []
    original = engine._dynamic.run

    def run(jobs, *rest):
        seen.append(list(jobs))
        return original(jobs, *rest)

    engine._dynamic.run = run
    return seen, lambda: setattr(engine._dynamic, "run", original)


def test_a_short_answer_resolves_before_its_batch_ends(engine):
    release, blocker = hold_worker(engine)
    seen, restore = batches(engine)
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
    assert [len(rows) for rows in seen] == [2]


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
    seen, restore = batches(engine)
    try:
        streams = [engine.stream(q, params)[0] for q in questions]
        release.set()
        blocker.result(timeout=60)
        assert ["".join(s) for s in streams] == expected
    finally:
        restore()
    assert [len(rows) for rows in seen] == [3]


def test_only_requests_with_one_generation_config_share_a_batch(engine):
    release, blocker = hold_worker(engine)
    seen, restore = batches(engine)
    try:
        futures = [
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3)),
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3, temperature=0.7)),
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3)),
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3, logprobs=True)),  # exact path
            engine.submit(QUESTION, SamplingParams(max_new_tokens=3, temperature=0.7)),
        ]
        release.set()
        blocker.result(timeout=60)
        assert all(f.result(timeout=60).choices[0].completion_tokens == 3 for f in futures)
    finally:
        restore()
    # greedy rows together, sampled rows together; the logprobs request ran alone on the exact path
    keys = [sorted(job.params.temperature or 0 for job in rows) for rows in seen]
    assert keys == [[0, 0], [0.7, 0.7]]


def test_a_request_sent_mid_batch_joins_it_and_the_running_answer_is_unchanged(engine):
    long_params = SamplingParams(max_new_tokens=200)
    exact = engine.submit(QUESTION, SamplingParams(max_new_tokens=200, seed=0))  # seed: the exact path
    expected = exact.result(timeout=120).choices[0]
    assert expected.completion_tokens == 200  # the tiny model never stops on its own
    before = engine._dynamic.regroups
    stream, _ = engine.stream(QUESTION, long_params)
    pieces = iter(stream)
    text = [next(pieces)]  # the long answer is under way
    short = engine.submit([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=3))
    assert short.result(timeout=60).choices[0].completion_tokens == 3
    assert not stream._job.done  # the short request did not wait for the long one to end
    text += list(pieces)
    assert engine._dynamic.regroups > before  # the batch stopped to let it in, then went on
    assert stream._job.answer == expected.token_ids  # greedy: the same tokens as without the interruption
    assert "".join(text) == expected.text and stream.completion_tokens == 200


def test_a_shared_system_prompt_is_read_once_and_answers_are_unchanged(engine):
    system = {"role": "system", "content": "You are a careful assistant who answers in one short line. " * 3}
    questions = [[system, {"role": "user", "content": "Question " + "why " * i}] for i in range(4)]
    params = SamplingParams(max_new_tokens=10)
    expected = [engine.submit(q, SamplingParams(max_new_tokens=10, seed=0)).result(timeout=60) for q in questions]
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


def test_a_waiting_request_that_cannot_join_is_not_passed_by_a_regroup(engine):
    before = engine._dynamic.regroups
    stream, _ = engine.stream(QUESTION, SamplingParams(max_new_tokens=200))
    pieces = iter(stream)
    next(pieces)
    scored = engine.submit(QUESTION, SamplingParams(max_new_tokens=2, logprobs=True))  # the exact path
    plain = engine.submit(QUESTION, SamplingParams(max_new_tokens=2))  # could join, but arrived later
    list(pieces)
    assert scored.result(timeout=60).choices[0].logprobs and plain.result(timeout=60)
    assert engine._dynamic.regroups == before  # the batch ran to its end; then each in arrival order


def test_a_closed_engine_refuses_new_requests(tiny_model_dir, tmp_path):
    from sftflow.errors import SftflowError

    closed = load_engine(infer_args(str(make_run_dir(tiny_model_dir, tmp_path)), []), batched=True)
    closed.close()
    closed.close()  # idempotent
    with pytest.raises(SftflowError, match="closed"):
        closed.submit(QUESTION, SamplingParams(max_new_tokens=2))
    assert closed.held == 0
