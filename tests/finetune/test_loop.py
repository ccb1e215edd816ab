"""The training recipe without the CLI: setup() and fit() on a tiny BERT, and fit() resumed from its saved state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune import loop, recipe
from finetune import state as resume_state
from finetune.args import FinetuneArgs
from finetune.distributed import Dist

TRAIN_ROWS = 96  # 120 rows, 10% held out for validation and 10% for test
BATCHES = 6  # per epoch, of 16


def start(tiny_bert: Path, train_csv: Path, tmp_path: Path) -> tuple[FinetuneArgs, Dist, recipe.Setup, dict]:
    """What `ferry finetune` does before its loop: the data, the model, the initial state."""
    args = FinetuneArgs(model=str(tiny_bert), train=str(train_csv), output=str(tmp_path / "ckpt"), epochs=3,
                        max_length=32, learning_rate=5e-3, patience=0, quiet=True)
    dist = Dist(device=torch.device("cpu"))
    task = recipe.task_recipe(args, dist)
    run = recipe.setup(args, dist, task, recipe.load_data(args, task, quiet=True))
    return args, dist, run, loop.initial_state(run, args, dist)


def staging(path: Path) -> Path:
    path.mkdir()
    return path


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "train_samples_per_second")} for row in history]


def test_fit_lowers_the_loss_and_advances_the_state(tmp_path, tiny_bert, train_csv):
    args, dist, run, state = start(tiny_bert, train_csv, tmp_path)
    assert (state["epoch"], state["history"], state["best"], state["scheduler"].last_epoch) == (0, [], None, 0)
    before = {k: v.clone() for k, v in run.net.state_dict().items()}
    saved = tmp_path / "staging"
    seen = []

    def after_epoch(epoch: int) -> None:
        seen.append((epoch, resume_state.read_info(saved)["epoch"]))

    assert loop.fit(run, state, args, dist, staging(saved), after_epoch) is state
    assert seen == [(1, 1), (2, 2)]  # the state is saved after every epoch but the last, before the hook
    assert state["epoch"] == 3 and [row["epoch"] for row in state["history"]] == [1, 2, 3]
    losses = [row["train_loss"] for row in state["history"]]
    assert losses[0] > losses[1] > losses[2], losses
    assert state["scheduler"].last_epoch == 3 * BATCHES  # one optimizer step per batch
    assert state["trained_samples"] == 3 * TRAIN_ROWS
    assert len(state["loss_log"]) == 3  # every LOG_EVERY (10) batches and at the end of an epoch: once per epoch here
    best = state["history"][state["best_epoch"] - 1]
    assert best["accuracy"] == state["best_metric"] > 0.5  # 3 balanced classes: chance is 1/3
    assert any(not torch.equal(before[k], v) for k, v in run.net.state_dict().items())
    assert run.evaluate("test")["examples"] == 12


class Interrupted(Exception):
    pass


def test_fit_resumed_from_its_saved_state_ends_like_an_uninterrupted_fit(tmp_path, tiny_bert, train_csv):
    args, dist, run, whole = start(tiny_bert, train_csv, tmp_path)
    loop.fit(run, whole, args, dist, staging(tmp_path / "whole"))
    expected = {k: v.clone() for k, v in run.net.state_dict().items()}

    args, dist, run, state = start(tiny_bert, train_csv, tmp_path)
    saved = staging(tmp_path / "interrupted")

    def interrupt(epoch: int) -> None:
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        loop.fit(run, state, args, dist, saved, interrupt)

    torch.manual_seed(1234)  # dropout must draw from the restored RNG state, not from whatever came before
    args, dist, run, resumed = start(tiny_bert, train_csv, tmp_path)
    info = resume_state.check(saved, Path(args.output), resume_state.identity(args, run.data.sources, dist.world_size))
    resume_state.restore(resumed, saved, info, dist, run.task.generators)
    assert resumed["epoch"] == 1 and resumed["scheduler"].last_epoch == BATCHES
    loop.fit(run, resumed, args, dist, saved)

    weights = run.net.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert without_timing(resumed["history"]) == without_timing(whole["history"])
    assert resumed["loss_log"] == whole["loss_log"]
    assert (resumed["best_epoch"], resumed["trained_samples"]) == (whole["best_epoch"], whole["trained_samples"])
