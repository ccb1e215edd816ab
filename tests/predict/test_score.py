"""The scorer of `ferry predict` on one chunk, with the real runtime of a tiny exported classifier:
the order in which texts are run, and a batch that fails or gives a non-finite score."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from predict.score import Job, Scorer
from runtime.tokens import encode


def scorer(artifact, batch_size: int) -> Scorer:
    job = Job(str(artifact), "fp32", "cpu", 1, "all", batch_size, None, "csv", "text", ("id",), False, str(artifact),
              choose=False)
    return Scorer(job)


def chunk(texts: list) -> pa.Table:
    return pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string())})


# Texts whose order by characters is not their order by tokens: a long rare word is many word
# pieces, a short common word one.
TEXTS = ["the the the the the the the the", "sport", "xylophonically quizzical", "the match",
         "zyzzyva qwertyuiop", "a a a a a a a a a a a a", "goal", "pneumonoultramicroscopic"]


def test_a_chunk_runs_in_token_length_order_and_answers_in_row_order(text_artifact):
    s = scorer(text_artifact, batch_size=3)
    tokens = [len(e.ids) for e in encode(s.runtime.inputs.tokenizer, TEXTS)]
    by_chars = sorted(range(len(TEXTS)), key=lambda i: len(TEXTS[i]))
    assert [tokens[i] for i in by_chars] != sorted(tokens), "the texts no longer tell the two orders apart"

    ran: list[list[int]] = []
    run_encoded = s.runtime.run_encoded

    def recording(encodings):
        ran.extend(e.ids for e in encodings)
        return run_encoded(encodings)

    s.runtime.run_encoded = recording
    out = s(chunk(TEXTS))
    ids = [e.ids for e in encode(s.runtime.inputs.tokenizer, TEXTS)]
    assert sorted(ran) == sorted(ids)  # every text run once
    assert [len(x) for x in ran] == sorted(tokens)  # run by token length
    alone = [s.runtime.classify([t])[0] for t in TEXTS]
    assert out.column("id").to_pylist() == list(range(len(TEXTS)))
    assert out.column("label").to_pylist() == [a["label"] for a in alone]
    assert out.column("score").to_pylist() == pytest.approx([a["score"] for a in alone], abs=1e-6)


def test_a_failing_batch_is_run_again_one_row_at_a_time(text_artifact):
    """Only the row the engine raises on gets an error; the rows of its batch are answered."""
    s = scorer(text_artifact, batch_size=4)
    expected = s(chunk(TEXTS))
    run_encoded, calls = s.runtime.run_encoded, []
    goal = encode(s.runtime.inputs.tokenizer, ["goal"])[0].ids

    def failing(encodings):
        calls.append(len(encodings))
        if any(e.ids == goal for e in encodings):
            raise RuntimeError("engine fault\nsecond line")
        return run_encoded(encodings)

    s.runtime.run_encoded = failing
    out = s(chunk(TEXTS))
    bad = TEXTS.index("goal")
    errors = out.column("error").to_pylist()
    assert errors[bad] == "inference failed: RuntimeError: engine fault"
    assert [e for i, e in enumerate(errors) if i != bad] == [None] * (len(TEXTS) - 1)
    assert out.column("label")[bad].as_py() is None and out.column("score")[bad].as_py() is None
    keep = [i for i in range(len(TEXTS)) if i != bad]
    for name in ("label", "score"):
        assert [out.column(name)[i].as_py() for i in keep] == [expected.column(name)[i].as_py() for i in keep]
    assert calls == [4, 1, 1, 1, 1, 4]  # the failing batch again, one row at a time; the other batch once


def test_a_non_finite_score_is_the_row_s_error(text_artifact):
    s = scorer(text_artifact, batch_size=8)
    run_encoded = s.runtime.run_encoded
    goal = encode(s.runtime.inputs.tokenizer, ["goal"])[0].ids

    def nan_for_goal(encodings):
        batch = run_encoded(encodings)
        batch.probs[[e.ids for e in encodings].index(goal)] = np.nan
        return batch

    s.runtime.run_encoded = nan_for_goal
    out = s(chunk(TEXTS))
    errors = out.column("error").to_pylist()
    assert errors[TEXTS.index("goal")] == "the model gave a non-finite score (NaN)"
    assert errors.count(None) == len(TEXTS) - 1
