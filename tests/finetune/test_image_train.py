"""`ferry finetune --task image-classification` end to end on tiny models and tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ferry.cli import main
from ferry.tasks import IMAGE_TASK
from finetune import checkpoint as ck
from finetune.images import read_image_folder
from tests import fixtures, tiny
from tests.cli import run_fails, run_ok

FAST = ["--task", IMAGE_TASK, "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-2",
        "--image-size", "32", "--calibration-samples", "4", "--patience", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny.image_folder(tmp_path_factory.mktemp("imgtrain") / "data", per_class=12)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: fixtures.image_model(root / arch, arch) for arch in ("effnet", "resnet", "vit")}


def finetune(base: Path, train: Path | str, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(base), "--train", str(train), "--output", str(out), *FAST, *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("arch,freeze", [("effnet", "all"), ("effnet", "2"), ("effnet", "none"),
                                         ("resnet", "1"), ("vit", "all")])
def test_image_finetune_freeze_modes(tmp_path, data, bases, arch, freeze, capsys):
    out = tmp_path / "ckpt"
    stdout = run_ok(finetune(bases[arch], data, out, "--freeze", freeze), capsys)
    assert "test accuracy" in stdout
    c = ck.check_valid_checkpoint_dir(out)
    assert c.task == ck.IMAGE and c.image_size == 32 and c.labels == ["blue", "green", "red"]
    manifest = json.loads((out / "ferry.json").read_text())
    assert manifest["task"] == IMAGE_TASK and manifest["settings"]["image_size"] == 32
    assert len(read_image_folder(c.heldout)[0]) == manifest["split"]["sizes"]["test"]
    assert len(read_image_folder(c.validation)[0]) == manifest["split"]["sizes"]["validation"]
    assert len(read_image_folder(c.calibration)[0]) == 4
    before, after = weights(bases[arch]), weights(out)
    head = ("_fc." if arch == "effnet" else "classifier.")
    changed = {k for k in after if k in before and not k.startswith(head) and before[k].shape == after[k].shape
               and not torch.equal(before[k], after[k])}
    if freeze == "all":
        # every backbone tensor, BatchNorm running statistics included, is unchanged
        assert not changed
    elif freeze == "none":
        assert changed
    else:
        assert changed and not any(k.startswith(("_conv_stem", "_bn0.", "_blocks.0.", "resnet.embedder", "resnet.encoder.stages.0."))
                                   for k in changed)
        if arch == "effnet":  # stages 0 and 1 are blocks 0..2
            assert not any(k.startswith(("_blocks.1.", "_blocks.2.")) for k in changed)
            assert any(k.startswith("_blocks.3.") for k in changed)
    assert any(k.startswith(head) and v.ndim == 2 and v.shape[0] == 3 for k, v in after.items())  # a new 3-label head


def test_image_finetune_learns_and_unfreezes_top(tmp_path, data, bases, capsys):
    out = tmp_path / "ckpt"
    stdout = run_ok(finetune(bases["effnet"], data, out, "--freeze", "all", "--epochs", "6", "--unfreeze-top", "1",
                             "--unfreeze-after", "4", "--learning-rate", "3e-2",
                             "--validation-fraction", "0"), capsys)  # no validation: the last epoch is the checkpoint
    manifest = json.loads((out / "ferry.json").read_text())
    assert manifest["transfer"]["unfreeze"]["top_stages"] == 1
    before, after = weights(bases["effnet"]), weights(out)
    changed = {k for k in after if not k.startswith("_fc.") and not torch.equal(before[k], after[k])}
    # the last stage (block 3) and the head convolution trained; everything below did not
    assert changed and all(k.startswith(("_blocks.3.", "_conv_head", "_bn1.")) for k in changed)
    assert "test accuracy" in stdout
    # ferry evaluate reads the image checkpoint and its heldout/ folder, and agrees with the manifest
    acc = manifest["metrics"]["test"]["accuracy"]
    assert f"accuracy {acc:.4f}" in run_ok(["evaluate", str(out), "--quiet"], capsys)
    assert "on 36 examples" in run_ok(["evaluate", str(out), "--data", str(data), "--quiet"], capsys)



def test_patience_counts_within_a_phase_and_the_best_checkpoint_over_all(tmp_path, data, bases, capsys):
    # A learning rate too small to change any prediction: the validation metric is the same every epoch.
    # Patience 2 would stop after epoch 3 if it counted across phases; unfreezing at epoch 3 starts a
    # new phase, so all 4 epochs run, and epoch 1 (first reached the best value) stays the checkpoint.
    out = tmp_path / "ckpt"
    run_ok(finetune(bases["vit"], data, out, "--freeze", "all", "--epochs", "4", "--unfreeze-top", "1",
                    "--unfreeze-after", "2", "--learning-rate", "1e-12", "--patience", "2"), capsys)
    metrics = json.loads((out / "ferry.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({r["accuracy"] for r in rows if r["split"] == "validation"}) == 1  # the premise: a flat metric
    assert metrics["epochs_run"] == 4 and not metrics["stopped_early"] and metrics["best_epoch"] == 1


def test_image_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, data, bases, capsys, monkeypatch):
    """The augmentation generator is part of the resume state: 1 epoch + --resume == 2 epochs."""
    from finetune import train as train_mod

    args = ("--freeze", "none", "--epochs", "2", "--augment", "--hflip", "--validation-fraction", "0")  # the last epoch is the checkpoint
    whole = tmp_path / "whole"
    run_ok(finetune(bases["effnet"], data, whole, *args), capsys)

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(train_mod, "after_epoch", interrupt)
    assert main(finetune(bases["effnet"], data, out, *args)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    run_ok(finetune(bases["effnet"], data, out, *args, "--resume"), capsys)
    a, b = weights(whole), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_batchnorm_stays_in_eval_mode(bases):
    from finetune import imagemodel
    from finetune.efficientnet_lite import EfficientNetLiteForImageClassification

    net = EfficientNetLiteForImageClassification.from_pretrained(bases["effnet"])
    imagemodel.apply_freeze(net, "2")
    imagemodel.train_mode(net)
    assert not net._bn0.training and not net._blocks[0]._bn1.training and not net._blocks[2]._bn2.training
    assert net._blocks[3]._bn1.training and net._bn1.training
    stats = net._bn0.running_mean.clone()
    net(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(stats, net._bn0.running_mean)


def test_image_finetune_from_a_csv(tmp_path, data, bases, capsys):
    files, labels = read_image_folder(data)
    csv = data.parent / "list.csv"
    csv.write_text("file,label\n" + "".join(f"{f.relative_to(data.parent)},{y}\n" for f, y in zip(files, labels)))
    run_ok(finetune(bases["effnet"], csv, tmp_path / "ckpt", "--image-column", "file", "--freeze", "all",
                    "--epochs", "1"), capsys)
    assert ck.check_valid_checkpoint_dir(tmp_path / "ckpt").task == ck.IMAGE


def test_image_finetune_bad_inputs(tmp_path, data, bases, capsys):
    b = bases["effnet"]
    run_fails(finetune(b, tmp_path / "none", tmp_path / "o"), capsys, "none: file not found")
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "b").mkdir()
    for n in range(3):
        (bad / "a" / f"x{n}.png").write_bytes(b"not a png at all")
        tiny.image("red", seed=n).save(bad / "b" / f"{n}.png")
    err = run_fails(finetune(b, bad, tmp_path / "o"), capsys)
    assert "/a/x" in err and ".png: not an image" in err
    small = tiny.image_folder(tmp_path / "small", per_class=2)
    assert "needs at least 3 per class" in run_fails(finetune(b, small, tmp_path / "o"), capsys)
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\nx.png,a\n")
    assert "columns are: path, label" in run_fails(finetune(b, csv, tmp_path / "o"), capsys)
    test_dir = tiny.image_folder(tmp_path / "t", per_class=1)
    (test_dir / "purple").mkdir()
    tiny.image("red").save(test_dir / "purple" / "0.png")
    err = run_fails(finetune(b, data, tmp_path / "o", "--test", str(test_dir)), capsys)
    assert "label 'purple'" in err and "absent from the training data" in err
