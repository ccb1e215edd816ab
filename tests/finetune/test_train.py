"""`ferry finetune` end to end on a tiny BERT: files, manifest, transfer modes, early stopping, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ferry.cli import main
from ferry.errors import CheckpointError
from ferry.files import read_manifest, sha256_file
from finetune import train as train_mod
from finetune.checkpoint import check_valid_checkpoint_dir
from tests.artifacts import read_jsonl
from tests.cli import finetune_argv, run_fails, run_ok

CHECKPOINT_FILES = {
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "ferry.json", "heldout.jsonl", "validation.jsonl", "calibration.jsonl", "metrics.jsonl", "training_curve.png",
}


def test_checkpoint_has_exactly_these_files(trained):
    assert {p.name for p in trained.iterdir()} == CHECKPOINT_FILES
    assert not any(p.name.startswith(".") for p in trained.parent.iterdir())  # no staging left behind
    ckpt = check_valid_checkpoint_dir(trained)
    assert ckpt.labels == ["food", "sport", "tech"]
    assert ckpt.max_length == 32
    assert (trained / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest_content(trained, tiny_bert, train_csv):
    m = read_manifest(trained)
    assert m["stage"] == "finetune"
    assert m["base_model"] == {"given": str(tiny_bert), "resolved": str(tiny_bert)}
    assert m["data"]["train"] == {"path": str(train_csv), "sha256": sha256_file(train_csv), "rows": 120, "dropped_empty": 0}
    assert m["data"]["validation"] == {"split_of": "train"}
    assert m["labels"] == ["food", "sport", "tech"]
    settings = m["settings"]
    for key, value in {"epochs": 3, "batch_size": 16, "max_length": 32, "learning_rate": 5e-3, "seed": 42,
                       "freeze": "none", "scheduler": "linear", "precision": "fp32", "split_seed": 42}.items():
        assert settings[key] == value, key
    assert set(settings) == set(train_mod.FinetuneArgs.__dataclass_fields__)
    metrics = m["metrics"]
    assert metrics["metric"] == "accuracy"
    assert 1 <= metrics["best_epoch"] <= 3
    assert metrics["test"]["examples"] == 12
    assert metrics["validation"]["examples"] == 12
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "examples", "per_class", "confusion_matrix"}
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 12
    assert m["timing"]["train_samples_per_second"] > 0 and m["timing"]["wall_seconds"] > 0
    assert {"torch", "transformers", "safetensors", "tokenizers", "python", "ferry"} <= set(m["versions"])
    assert m["world_size"] == 1 and m["created"]
    # every file is listed with its hash, the manifest itself excepted
    assert set(m["files"]) == CHECKPOINT_FILES - {"ferry.json"}
    assert m["files"]["model.safetensors"]["sha256"] == sha256_file(trained / "model.safetensors")


def test_history_heldout_and_calibration(trained):
    hist = read_jsonl(trained / "metrics.jsonl")
    assert [(h["split"], h["epoch"]) for h in hist[:3]] == [("validation", 1), ("validation", 2), ("validation", 3)]
    assert hist[3]["split"] == "test" and hist[3]["epoch"] == read_manifest(trained)["metrics"]["best_epoch"]
    assert all(h["train_loss"] > 0 and "accuracy" in h for h in hist[:3])
    heldout = read_jsonl(trained / "heldout.jsonl")
    assert len(heldout) == 12 and set(heldout[0]) == {"text", "label"}
    assert len(read_jsonl(trained / "calibration.jsonl")) == 20
    config = json.loads((trained / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "sport", "2": "tech"}
    assert config["architectures"] == ["BertForSequenceClassification"]


def test_validation_split_is_kept(trained, rows):
    """validation.jsonl holds exactly the validation part of the seeded split (not the test
    part, not training texts): export chooses int8-static's fp32 MatMuls on it."""
    from finetune.data import stratified_split

    _, val_ix, test_ix = stratified_split([y for _, y in rows], [0.1, 0.1], 42, "train, validation, test")
    validation = read_jsonl(trained / "validation.jsonl")
    assert [(r["text"], r["label"]) for r in validation] == [rows[i] for i in val_ix]
    assert [(r["text"], r["label"]) for r in read_jsonl(trained / "heldout.jsonl")] == [rows[i] for i in test_ix]
    ckpt = check_valid_checkpoint_dir(trained)
    assert ckpt.validation == trained / "validation.jsonl"
    assert ckpt.heldout == trained / "heldout.jsonl"


def test_learns_the_tiny_task(trained):
    # 3 balanced classes: chance is 1/3
    assert read_manifest(trained)["metrics"]["validation"]["accuracy"] > 0.5


def test_summary_prints_test_accuracy(tmp_path, tiny_bert, train_csv, capsys):
    out = run_ok(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--epochs", "1"), capsys)
    line = next(line for line in out.splitlines() if line.startswith("test accuracy"))
    acc = read_manifest(tmp_path / "c")["metrics"]["test"]["accuracy"]
    assert line.startswith(f"test accuracy {acc:.4f}")


def test_progress_bar_and_epoch_lines_unless_quiet(tmp_path, tiny_bert, train_csv, capsys):
    argv = [a for a in finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--epochs", "1") if a != "--quiet"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "epoch 1/1: train loss" in out
    assert "epoch 1/1: 100%" in err and "samples_s=" in err and "loss=" in err
    assert main([*argv, "--overwrite", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "epoch 1/1" not in out + err
    assert out.splitlines()[0].startswith("test accuracy")


# --- transfer modes -------------------------------------------------------------------------------

def base_weights(tiny_bert: Path) -> dict:
    return {f"bert.{k}": v for k, v in load_file(str(tiny_bert / "model.safetensors")).items()}


@pytest.mark.parametrize(
    "freeze, frozen_prefixes",
    [
        ("all", ("bert.",)),
        ("1", ("bert.embeddings.", "bert.encoder.layer.0.")),
        ("none", ()),
    ],
)
def test_freeze_modes(tmp_path, tiny_bert, train_csv, capsys, freeze, frozen_prefixes):
    from finetune.modeling import apply_freeze, load_base

    model, _, _ = load_base(str(tiny_bert), ["a", "b", "c"], None)
    counts = apply_freeze(model, freeze)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, _ in model.named_parameters():
        assert (name in trainable) == (not name.startswith(frozen_prefixes) if frozen_prefixes else True), name
    assert counts["frozen_parameters"] == sum(p.numel() for n, p in model.named_parameters() if n not in trainable)
    if freeze == "all":
        assert trainable == {"classifier.weight", "classifier.bias"}

    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1", "--freeze", freeze), capsys)
    after = load_file(str(out / "model.safetensors"))
    before = base_weights(tiny_bert)
    for name, tensor in before.items():
        if name not in after:
            continue  # buffers such as position_ids
        frozen = bool(frozen_prefixes) and name.startswith(frozen_prefixes)
        if frozen:
            assert after[name].equal(tensor), f"{name} is frozen but changed"
        else:
            assert not after[name].equal(tensor), f"{name} trains but did not change"
    assert read_manifest(out)["transfer"]["freeze"] == freeze


def test_freeze_more_layers_than_the_model_has(tmp_path, tiny_bert, train_csv, capsys):
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--freeze", "5"), capsys,
              "--freeze 5", "only 2 layers")


def test_no_weight_decay_on_biases_and_layernorm(tiny_bert):
    from finetune.modeling import load_base, param_groups

    model, _, _ = load_base(str(tiny_bert), ["a", "b"], None)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"bert.embeddings.LayerNorm.weight", "classifier.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_classifier_dropout_is_saved(tmp_path, tiny_bert, train_csv, capsys):
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1", "--classifier-dropout", "0.3"), capsys)
    assert json.loads((out / "config.json").read_text())["classifier_dropout"] == 0.3


# --- early stopping -------------------------------------------------------------------------------

def test_early_stopping_keeps_the_best_epoch(tmp_path, tiny_bert, train_csv, capsys, monkeypatch):
    """A learning rate too small to change any prediction: epoch 1 stays best, patience 2 stops at 3 of 6."""
    out = tmp_path / "ckpt"
    saved = {}

    def capture(epoch):
        saved[epoch] = load_file(str(tmp_path / ".ckpt.incomplete" / "resume" / "model.safetensors"))

    monkeypatch.setattr(train_mod, "after_epoch", capture)
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "6", "--patience", "2", "--learning-rate", "1e-9"), capsys)
    m = read_manifest(out)["metrics"]
    assert (m["best_epoch"], m["epochs_run"], m["stopped_early"]) == (1, 3, True)
    assert sorted(saved) == [1, 2]
    final = load_file(str(out / "model.safetensors"))
    assert all(final[k].equal(v) for k, v in saved[1].items() if k in final)
    assert any(not final[k].equal(v) for k, v in saved[2].items() if k in final)
    assert [h["epoch"] for h in read_jsonl(out / "metrics.jsonl") if h["split"] == "validation"] == [1, 2, 3]


# --- atomic write and resume ----------------------------------------------------------------------

def interrupt_after(epoch_to_stop: int):
    def hook(epoch):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt

    return hook


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_bert, train_csv, capsys, monkeypatch):
    args = ("--epochs", "3", "--patience", "0")
    whole = tmp_path / "whole"
    run_ok(finetune_argv(tiny_bert, train_csv, whole, *args), capsys)

    out = tmp_path / "resumed"
    monkeypatch.setattr(train_mod, "after_epoch", interrupt_after(1))
    assert main(finetune_argv(tiny_bert, train_csv, out, *args)) == 130
    capsys.readouterr()
    staging = tmp_path / ".resumed.incomplete"
    assert not out.exists()
    assert staging.is_dir() and not (staging / "ferry.json").exists()
    with pytest.raises(CheckpointError, match="--resume"):
        check_valid_checkpoint_dir(out)
    monkeypatch.undo()

    run_ok(finetune_argv(tiny_bert, train_csv, out, *args, "--resume"), capsys)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not staging.exists()
    a, b = read_manifest(whole), read_manifest(out)
    assert a["metrics"] == b["metrics"]
    assert [h["train_loss"] for h in read_jsonl(out / "metrics.jsonl")[:3]] == [
        h["train_loss"] for h in read_jsonl(whole / "metrics.jsonl")[:3]
    ]


def test_resume_refuses_other_settings(tmp_path, tiny_bert, train_csv, capsys, monkeypatch):
    out = tmp_path / "c"
    monkeypatch.setattr(train_mod, "after_epoch", interrupt_after(1))
    assert main(finetune_argv(tiny_bert, train_csv, out, "--epochs", "2")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    run_fails(finetune_argv(tiny_bert, train_csv, out, "--epochs", "2", "--resume", "--learning-rate", "1e-3"),
              capsys, "--resume: settings differ", "learning_rate")
    # without --resume, a new run discards the interrupted one
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1"), capsys)
    assert (out / "ferry.json").is_file() and not (tmp_path / ".c.incomplete").exists()


def test_resume_with_nothing_to_resume(tmp_path, tiny_bert, train_csv, capsys):
    run_fails(finetune_argv(tiny_bert, train_csv, tmp_path / "c", "--resume"), capsys,
              "--resume: there is no interrupted run", "run without --resume")


def test_interrupted_write_leaves_no_checkpoint(tmp_path, tiny_bert, train_csv, capsys, monkeypatch):
    import finetune.checkpoint as ckpt_mod

    def broken(path, data):
        raise KeyboardInterrupt  # the process dies while writing the manifest

    out = tmp_path / "c"
    monkeypatch.setattr(ckpt_mod, "write_json", broken)
    assert main(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1")) == 130
    assert not out.exists()
    staging = tmp_path / ".c.incomplete"
    assert not (staging / "ferry.json").exists()
    with pytest.raises(CheckpointError):
        check_valid_checkpoint_dir(out)


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, tiny_bert, train_csv, capsys, monkeypatch):
    out = tmp_path / "c"
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1"), capsys)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(train_mod, "after_epoch", interrupt_after(1))
    assert main(finetune_argv(tiny_bert, train_csv, out, "--epochs", "2", "--overwrite", "--seed", "3")) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_while_writing_the_checkpoint_keeps_the_resume_state(tmp_path, tiny_bert, train_csv, capsys, monkeypatch):
    """The resume state is deleted only once the checkpoint is published: a failed write can be resumed."""
    import errno

    import finetune.checkpoint as ckpt_mod

    args = ("--epochs", "2", "--patience", "0")
    whole = tmp_path / "whole"
    run_ok(finetune_argv(tiny_bert, train_csv, whole, *args), capsys)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "c"
    monkeypatch.setattr(ckpt_mod, "write_json", full)
    run_fails(finetune_argv(tiny_bert, train_csv, out, *args), capsys, "No space left on device", "free disk space")
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".c.incomplete" / "resume" / "state.json").is_file()
    run_ok(finetune_argv(tiny_bert, train_csv, out, *args, "--resume"), capsys)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "whole"]  # no resume state, staging or lock left


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, tiny_bert, train_csv, capsys):
    import subprocess
    import sys

    out = tmp_path / "c"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom ferry.files import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n    print('in', flush=True)\n    sys.stdin.readline()\n"],
        cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "in\n"
        run_fails(finetune_argv(tiny_bert, train_csv, out), capsys, f"another ferry run (pid {holder.pid})")
    finally:
        holder.communicate("\n", timeout=30)
    assert not out.exists() and not (tmp_path / ".c.incomplete").exists()


def test_existing_output_is_refused_without_overwrite(trained, tiny_bert, train_csv, capsys):
    run_fails(finetune_argv(tiny_bert, train_csv, trained), capsys, f"--output {trained} already exists", "--overwrite")


def test_output_inside_the_training_data_is_refused(tmp_path, tiny_bert, rows, capsys):
    from tests.finetune.datafiles import write

    data = write(tmp_path / "data", rows, "dir")
    run_fails(finetune_argv(tiny_bert, data, data / "ckpt"), capsys, "is inside the input")


# --- precision -----------------------------------------------------------------------------------

def test_bf16_autocast_on_cpu_saves_fp32_weights(tmp_path, tiny_bert, train_csv, capsys):
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1", "--precision", "bf16"), capsys)
    weights = load_file(str(out / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    assert read_manifest(out)["settings"]["precision"] == "bf16"


def test_grad_accumulation_and_length_grouping(tmp_path, tiny_bert, train_csv, capsys):
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1", "--grad-accum-steps", "3",
                         "--group-by-length", "--scheduler", "cosine"), capsys)
    assert read_manifest(out)["settings"]["grad_accum_steps"] == 3


def test_length_grouped_batches_cover_every_example_once():
    from finetune.batching import batch_indices, epoch_order

    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    order = epoch_order(203, seed=1, epoch=2)
    assert order == epoch_order(203, seed=1, epoch=2) and order != epoch_order(203, seed=1, epoch=3)
    batches = batch_indices(order, 8, lengths, seed=1, epoch=2)
    assert sorted(i for b in batches for i in b) == list(range(203))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    plain = batch_indices(order, 8)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / 3


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(tmp_path, tiny_bert, train_csv, capsys, precision):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, train_csv, out, "--epochs", "1", "--precision", precision), capsys)
    weights = load_file(str(out / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    assert read_manifest(out)["metrics"]["test"]["examples"] == 12


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_freeze_all_trains_the_head_on_features_computed_once(tmp_path, train_csv, capsys, monkeypatch, arch):
    """--freeze all runs the frozen base once; with dropout off everywhere (so the base's
    train and eval modes agree) the head ends where the full forward every batch leads it."""
    from finetune import featurecache
    from tests.fixtures import base_model

    model = base_model(tmp_path / "base", arch)
    config = json.loads((model / "config.json").read_text())
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "seq_classif_dropout"):
        if key in config:
            config[key] = 0.0
    (model / "config.json").write_text(json.dumps(config))
    argv = ("--epochs", "3", "--freeze", "all", "--classifier-dropout", "0", "--patience", "0")

    cached = tmp_path / "cached"
    run_ok(finetune_argv(model, train_csv, cached, *argv), capsys)
    assert read_manifest(cached)["transfer"]["feature_cache"] is True

    built = []
    monkeypatch.setattr(featurecache, "build", lambda *a, **k: built.append(1))
    monkeypatch.setattr(featurecache, "usable", lambda *a, **k: False)
    plain = tmp_path / "plain"
    run_ok(finetune_argv(model, train_csv, plain, *argv), capsys)
    assert not built and "feature_cache" not in read_manifest(plain)["transfer"]

    a, b = load_file(str(cached / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys()
    head = [k for k in a if k.startswith(("classifier", "pre_classifier"))]
    assert head
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k
    ma, mb = read_manifest(cached)["metrics"], read_manifest(plain)["metrics"]
    assert [h["train_loss"] for h in read_jsonl(cached / "metrics.jsonl") if h["split"] == "validation"] == \
        pytest.approx([h["train_loss"] for h in read_jsonl(plain / "metrics.jsonl") if h["split"] == "validation"], abs=1e-5)
    assert ma["test"]["accuracy"] == mb["test"]["accuracy"]
