"""`ferry predict` on a tiny trained text classifier exported by the real `ferry export`: every input
format, the row order, the same answers as a real `ferry serve`, bad rows, resume, and Ray Data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ferry.cli import main
from runtime.predictor import Runtime
from tests.cli import run, run_fails
from tests.predict import data

ROOT = Path(__file__).resolve().parents[2]
CHUNK = ["--chunk-rows", "7", "--quiet"]  # 36 rows: 6 chunks, the last one short


def predict(artifact, data_file, out, *extra, capsys=None):
    rc = main(["predict", str(artifact), "--data", str(data_file), "--output", str(out), *CHUNK, *extra])
    assert rc == 0
    return out


# --- formats, order, answers --------------------------------------------------------------
def test_every_input_format_gives_the_same_rows(text_artifact, rows, tmp_path, capsys):
    outputs = {}
    for fmt in ("csv", "tsv", "jsonl", "parquet"):
        src = data.write(tmp_path / f"in.{fmt}", rows)
        out = predict(text_artifact, src, tmp_path / f"out.{fmt}", "--variant", "fp32", "--all-scores")
        got = data.read(out)
        assert [list(r) for r in got][0] == ["id", "label", "score", "score_food", "score_sport", "score_tech", "error"]
        outputs[fmt] = data.predictions(out)
        assert all(r["error"] is None for r in got)
        for r in got:
            assert max(float(r[f"score_{x}"]) for x in ("food", "sport", "tech")) == float(r["score"])
            assert float(r[f"score_{r['label']}"]) == float(r["score"])
    assert outputs["csv"] == outputs["tsv"] == outputs["jsonl"] == outputs["parquet"]
    assert [p[0] for p in outputs["csv"]] == [r["id"] for r in rows]
    # the summary line and the manifest
    out = capsys.readouterr().out
    assert f"ferry predict: {len(rows)} rows in " in out and "variant 'fp32' (onnxruntime fp32)" in out
    m = json.loads((tmp_path / "out.parquet.ferry.json").read_text())
    assert m["variant"]["name"] == m["variant"]["name"] == "fp32" and m["engine"] == "onnxruntime"
    assert m["input"]["rows"] == m["output"]["rows"] == len(rows) and m["errors"]["rows"] == 0
    assert m["input"]["sha256"] == __import__("hashlib").sha256((tmp_path / "in.parquet").read_bytes()).hexdigest()
    assert m["artifact"]["sha256"] == __import__("hashlib").sha256((text_artifact / "ferry.json").read_bytes()).hexdigest()
    assert {"started", "seconds"} <= set(m["time"]) and m["versions"]["pyarrow"]


def test_csv_to_parquet_and_kept_columns(text_artifact, rows, tmp_path):
    src = data.write(tmp_path / "in.csv", rows)
    out = predict(text_artifact, src, tmp_path / "out.parquet", "--variant", "fp32", "--format", "parquet",
                  "--keep-columns", "topic,id")
    got = data.read(out)
    assert list(got[0]) == ["topic", "id", "label", "score", "error"]
    assert [(r["topic"], r["id"]) for r in got] == [(r["topic"], r["id"]) for r in rows]
    # the model was trained on these topics: far better than chance (1 in 3); a tiny 80-step
    # model, and a quarter of the rows are one text repeated past its 64 tokens
    assert sum(r["label"] == r["topic"] for r in got) >= 0.6 * len(rows)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_each_row_gets_its_own_text_s_answer(text_artifact, rows, tmp_path, variant):
    """Texts are sorted by length within each chunk and the answers put back: each row's score is
    its own text's answer (the answer alone), not a neighbour's."""
    src = data.write(tmp_path / "in.jsonl", rows)
    got = data.predictions(predict(text_artifact, src, tmp_path / "out.jsonl", "--variant", variant))
    rt = Runtime(text_artifact, variant=variant, device="cpu", choose=False)
    alone = [rt.classify([r["text"]])[0] for r in rows]
    assert [(label, score) for _, label, score in got] == [(a["label"], a["score"]) for a in alone]
    lengths = [len(r["text"]) for r in rows[:7]]
    assert lengths != sorted(lengths)  # the first chunk really was reordered to run


@pytest.mark.slow
def test_predictions_equal_ferry_serve_s_answers(text_artifact, rows, server, tmp_path):
    src = data.write(tmp_path / "in.csv", rows)
    got = data.predictions(predict(text_artifact, src, tmp_path / "out.csv", "--variant", "fp32"))
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["variant"] == json.loads((tmp_path / "out.csv.ferry.json").read_text())["variant"]["name"] == "fp32"
    r = httpx.post(server.url + "/classify", json={"texts": [x["text"] for x in rows]}, timeout=120)
    assert r.status_code == 200, r.text
    served = r.json()["results"]
    assert [(label, score) for _, label, score in got] == [(s["label"], s["score"]) for s in served]


# --- bad rows -------------------------------------------------------------------------------
def test_bad_rows_are_reported_not_dropped(text_artifact, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        '{"id": 1, "text": "the match team goal"}',
        '{"id": 2, "text": null}',
        '{"id": 3, "text": 42}',
        'not json at all',
        '{"id": 5, "text": "bad \\ud800 unicode"}',
        '{"id": 6}',
        '{"id": 7, "text": ""}',
    ]) + "\n", encoding="utf-8")
    rc, out, _ = run(["predict", str(text_artifact), "--data", str(src), "--output", str(tmp_path / "out.jsonl"),
                      "--variant", "fp32", *CHUNK], capsys)
    assert rc == 0
    got = data.read(tmp_path / "out.jsonl")
    assert [r["id"] for r in got] == [1, 2, 3, None, 5, 6, 7]
    errors = [r["error"] for r in got]
    assert errors[0] is None and errors[6] is None  # an empty text is a text
    assert errors[1] == errors[5] == "no text (null)"
    assert errors[2] == "the text is a number, not a string"
    assert errors[3].startswith("not valid JSON")
    assert "lone surrogate" in errors[4]
    assert all((r["label"] is None) == (r["error"] is not None) for r in got)
    assert "7 rows" in out and "5 bad rows" in out
    m = json.loads((tmp_path / "out.jsonl.ferry.json").read_text())
    assert m["errors"]["rows"] == 5 and m["errors"]["first"][0] == {"row": 2, "error": "no text (null)"}

    # CSV: an unquoted empty field is no text, a quoted one the empty string
    csv_in = tmp_path / "in.csv"
    csv_in.write_bytes(b'id,text\na,"sport match"\nb,\nc,""\nd,"caf\xe9 latin-1"\n')
    predict(text_artifact, csv_in, tmp_path / "out.csv", "--variant", "fp32")
    got = data.read(tmp_path / "out.csv")
    assert [(r["id"], r["error"]) for r in got] == [("a", None), ("b", "no text (null)"), ("c", None),
                                                    ("d", "not valid UTF-8 (byte 3)")]

    # --on-error fail: the first bad row, by its number, and no output
    run_fails(["predict", str(text_artifact), "--data", str(src), "--output", str(tmp_path / "fail.jsonl"),
               "--variant", "fp32", "--on-error", "fail", *CHUNK], capsys, "row 2: no text (null)", "--on-error fail")
    assert not (tmp_path / "fail.jsonl").exists() and not list(tmp_path.glob(".fail.jsonl*"))


# --- resume ---------------------------------------------------------------------------------
class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_resume_after_an_interrupt_gives_the_same_bytes(text_artifact, rows, tmp_path, monkeypatch, capsys, fmt):
    from predict.output import Partial
    from predict.score import Scorer

    src = data.write(tmp_path / f"in.{fmt}", rows)
    whole = predict(text_artifact, src, tmp_path / f"whole.{fmt}", "--variant", "fp32", "--all-scores")

    out = tmp_path / f"resumed.{fmt}"
    argv = ["predict", str(text_artifact), "--data", str(src), "--output", str(out), "--variant", "fp32", "--all-scores", *CHUNK]
    add = Partial.add

    def add_then_die(self, table, errors):
        add(self, table, errors)
        if self.chunks == 3:
            raise Interrupt()

    with monkeypatch.context() as m:
        m.setattr(Partial, "add", add_then_die)
        assert main(argv) == 130  # the CLI's status for an interrupt
    assert not out.exists() and (tmp_path / f".resumed.{fmt}.predict").is_dir()
    # without --resume, the leftover is not silently thrown away
    run_fails(argv, capsys, "interrupted run", "--resume")

    scored = []
    call = Scorer.__call__
    monkeypatch.setattr(Scorer, "__call__", lambda self, raw, progress=None: scored.append(raw.num_rows) or call(self, raw, progress))
    rc, stdout, _ = run([*argv, "--resume"], capsys)
    assert rc == 0
    assert out.read_bytes() == whole.read_bytes()
    assert scored == [7, 7, 1]  # only the chunks after the 3 done
    assert f"{len(rows)} rows (21 done before the resume)" in stdout
    assert not (tmp_path / f".resumed.{fmt}.predict").exists()


def test_resume_refuses_another_setting(text_artifact, rows, tmp_path, monkeypatch, capsys):
    from predict.output import Partial

    src = data.write(tmp_path / "in.csv", rows)
    out = tmp_path / "out.csv"
    argv = ["predict", str(text_artifact), "--data", str(src), "--output", str(out), "--variant", "fp32", *CHUNK]
    monkeypatch.setattr(Partial, "add", lambda self, table, errors: (_ for _ in ()).throw(Interrupt()))
    assert main(argv) == 130
    run_fails([*argv, "--resume", "--all-scores"], capsys, "--resume: all_scores differs", "--overwrite")


# --- Ray Data -------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_on_a_local_instance_writes_the_local_run_s_bytes(text_artifact, rows, tmp_path, capsys):
    pytest.importorskip("ray")  # installed with ferry[ray], which `make install` includes
    src = data.write(tmp_path / "in.parquet", rows)  # row groups of 5, chunks of 7: they never line up
    local = predict(text_artifact, src, tmp_path / "local.parquet", "--variant", "fp32", "--all-scores")
    rc, out, _ = run(["predict", str(text_artifact), "--data", str(src), "--output", str(tmp_path / "ray.parquet"),
                      "--variant", "fp32", "--all-scores", "--ray", "--ray-cpus", "2", *CHUNK], capsys)
    assert rc == 0, out
    assert (tmp_path / "ray.parquet").read_bytes() == local.read_bytes()
    assert "on Ray (local)" in out
    m = json.loads((tmp_path / "ray.parquet.ferry.json").read_text())
    # 6 chunks on a pool of 2 actors of 1 thread (the 2 CPUs); which actor scores a chunk is Ray's
    # choice: one ready first may take them all, each being milliseconds of work here
    assert {k: m["ray"][k] for k in ("address", "actors", "threads_per_actor")} == {"address": "local", "actors": 2,
                                                                                   "threads_per_actor": 1}
    assert sum(m["ray"]["chunks_per_actor"]) == 6 and 1 <= len(m["ray"]["chunks_per_actor"]) <= 2


def test_ray_missing_is_one_line_naming_the_extra(text_artifact, rows, tmp_path):
    src = data.write(tmp_path / "in.csv", rows)
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from ferry.cli import main\n"
            f"sys.exit(main(['predict', {str(text_artifact)!r}, '--data', {str(src)!r}, '--output', "
            f"{str(tmp_path / 'out.csv')!r}, '--ray']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["ferry predict: error: --ray needs Ray, which is not installed here: "
                                             "pip install 'ferry[ray]'"]
    assert not (tmp_path / "out.csv").exists()


# --- bad input ------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_status_2(text_artifact, rows, tmp_path, capsys):
    src = data.write(tmp_path / "in.csv", rows)
    a = str(text_artifact)

    def fails(*argv, needles):
        run_fails(["predict", a, *argv], capsys, *needles)

    fails("--data", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o.csv"), needles=["--data", "file not found"])
    (tmp_path / "in.xlsx").write_text("x")
    fails("--data", str(tmp_path / "in.xlsx"), "-o", str(tmp_path / "o.csv"), needles=["unsupported extension '.xlsx'"])
    fails("--data", str(src), "-o", str(tmp_path / "o.csv"), "--text-column", "body",
          needles=["--text-column 'body' not in in.csv; columns are: id, text, topic"])
    fails("--data", str(src), "-o", str(tmp_path / "o.csv"), "--keep-columns", "id,nope",
          needles=["--keep-columns 'nope' not in in.csv"])
    fails("--data", str(src), "-o", str(tmp_path / "no-folder" / "o.csv"), needles=["--output", "no folder"])
    fails("--data", str(src), "-o", str(tmp_path / "o.parquet"), needles=["a .parquet name for csv output"])
    fails("--data", str(src), "-o", str(src), needles=["is the --data file"])
    (tmp_path / "exists.csv").write_text("x")
    fails("--data", str(src), "-o", str(tmp_path / "exists.csv"), needles=["already exists", "--overwrite"])
    fails("--data", str(src), "-o", str(tmp_path / "o.csv"), "--variant", "fp64", needles=["--variant 'fp64' not in"])
    broken = tmp_path / "broken.csv"
    broken.write_text("id,text\na,one\nb,two,three\n")
    fails("--data", str(broken), "-o", str(tmp_path / "o.csv"), "--variant", "fp32",
          needles=["cannot read it as CSV", "Expected 2 columns, got 3"])
    labelled = data.write(tmp_path / "labelled.csv", [{"id": "a", "text": "soup", "label": "food"}])
    fails("--data", str(labelled), "-o", str(tmp_path / "o.csv"), "--keep-columns", "id,label", "--variant", "fp32",
          needles=["--keep-columns 'label' has the name of an output column"])
    fails("--data", str(src), needles=["--output is required"])
    run_fails(["predict", "--ray", a, "--data", str(src), "-o", str(tmp_path / "o.csv")], capsys,
              f"ARTIFACT is required (--ray took {a} as its value: write ARTIFACT before --ray)")
    assert (tmp_path / "exists.csv").read_text() == "x"
    assert not (tmp_path / "o.csv").exists()
