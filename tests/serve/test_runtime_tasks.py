"""One Runtime for both tasks, without a server: an image artifact gets the variant plumbing, batch
invariance, /info and readiness of a text one, with its own inputs; and the task helpers it uses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferry.cli import main
from ferry.errors import ArtifactError, DataError
from ferry.tasks import IMAGE
from runtime import pixels
from runtime.predictor import ImageInputs, Runtime, check_startup
from runtime.tokens import collate
from tests import fixtures, tiny
from tests.artifacts import copy_artifact, write_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_artifact(tmp_path_factory, resnet_ckpt):
    out = tmp_path_factory.mktemp("runtime-image") / "artifact"
    assert main(["export", str(resnet_ckpt), "--output", str(out), "--variants", "fp32", "--quiet", "--threads", "1"]) == 0
    return out


def batch_of(rt: Runtime, n: int) -> np.ndarray:
    pics = [tiny.image(tiny.IMAGE_LABELS[i % len(tiny.IMAGE_LABELS)], seed=700 + i) for i in range(n)]
    return pixels.preprocess(pics, rt.inputs.processor)


def test_an_image_artifact_is_served_by_the_same_runtime(image_artifact):
    rt = Runtime(image_artifact, device="cpu", max_group=2)
    assert rt.task is IMAGE and isinstance(rt.inputs, ImageInputs)
    assert rt.choice is None and rt.local_parity is None  # no reference token ids: the export-time default
    assert rt.variant.name == json.loads((image_artifact / "ferry.json").read_text())["default_variant"]["cpu"]
    x = batch_of(rt, 5)
    batch = rt.run_batch(x)
    assert batch.runs == 3 and batch.truncated is None and batch.tokens is None  # groups of max_group, in order
    alone = np.concatenate([rt.run_batch(x[i : i + 1]).probs for i in range(5)])
    np.testing.assert_allclose(batch.probs, alone, atol=1e-6)
    assert np.array_equal(rt.run_batch(list(x)).probs, batch.probs)  # a list of [3, H, W], as the batch endpoint merges them
    out = rt.classify(x, return_all_scores=True)
    assert [o["label"] for o in out] == [rt.labels[int(i)] for i in batch.probs.argmax(1)]
    assert out[0].keys() == {"label", "score", "scores"}  # no "truncated" for an image
    info = rt.info()
    assert info["image_size"] == {"height": fixtures.IMAGE_SIZE, "width": fixtures.IMAGE_SIZE} and "max_length" not in info
    assert info["variant"] == rt.variant.name and info["ready"] is False and rt.describe().startswith(f"serving {image_artifact}")
    rt.warm_up()
    assert rt.ready


def test_a_batch_dependent_image_variant_runs_one_image_per_call(image_artifact, tmp_path):
    art, m = copy_artifact(image_artifact, tmp_path / "a")
    m["variants"]["fp32"]["batch_invariant"] = False
    write_manifest(art, m)
    rt = Runtime(art, variant="fp32", device="cpu")
    assert rt.one_per_run and rt.info()["batch_invariance"].startswith("one image per inference call")
    assert rt.run_batch(batch_of(rt, 3)).runs == 3
    assert Runtime(art, variant="fp32", device="cpu", enforce_invariance=False).run_batch(batch_of(rt, 3)).runs == 1


def test_a_damaged_image_processor_is_refused_at_start(image_artifact, tmp_path):
    art, m = copy_artifact(image_artifact, tmp_path / "a")
    (art / pixels.PROCESSOR_FILE).write_text(json.dumps({"size": {"height": 0, "width": 8}}))
    write_manifest(art, m)  # as a re-export would seal it: the processor check, not the seal, refuses it
    with pytest.raises(ArtifactError, match=r"preprocessor_config.json: size must be"):
        check_startup(art, "fp32", "cpu")


def test_an_unknown_task_is_one_line_naming_the_manifest(image_artifact, tmp_path):
    art, _ = copy_artifact(image_artifact, tmp_path / "a", task="audio-classification")
    with pytest.raises(ArtifactError, match=r"ferry.json: unknown task 'audio-classification'; ferry knows "):
        Runtime(art, device="cpu")


# --- the task helpers ----------------------------------------------------------------------------
def test_collate_pads_right_and_builds_the_inputs_asked_for():
    feed = collate([[5, 6, 7], [8]], 0, ["input_ids", "attention_mask", "token_type_ids", "position_ids"], type_ids=[[0, 1, 1], [0]])
    assert feed["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert feed["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert feed["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert feed["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    fixed = collate([[5], [8]], 1, ["input_ids", "attention_mask"], length=4)
    assert set(fixed) == {"input_ids", "attention_mask"} and fixed["input_ids"].tolist() == [[5, 1, 1, 1], [8, 1, 1, 1]]


def test_load_pixels_equals_preprocess_in_chunks(tmp_path):
    processor = pixels.processor_dict(fixtures.IMAGE_SIZE, [0.5] * 3, [0.25] * 3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(tiny.png_bytes(tiny.image(tiny.IMAGE_LABELS[i % len(tiny.IMAGE_LABELS)], seed=i)))
    whole = pixels.preprocess([pixels.open_image(p, str(p)) for p in paths], processor)
    assert np.array_equal(pixels.load_pixels(paths, processor, chunk=2), whole)
    assert pixels.load_pixels([], processor).shape == (0, 3, fixtures.IMAGE_SIZE, fixtures.IMAGE_SIZE)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png: not an image"):
        pixels.load_pixels([*paths, tmp_path / "bad.png"], processor)
