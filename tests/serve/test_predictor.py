"""The serving runtime without a server: grouping, batch invariance, integrity, the CUDA path (faked), no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.engines import CPU, CUDA, create_session
from ferry.errors import ArtifactError, ConfigError, FerryError
from ferry.files import sha256_file
from runtime import engines as engines_module
from runtime.predictor import Runtime, TextInputs, resolve_device
from runtime.tokens import encode, length_groups
from serve.settings import ServeSettings, worker_split
from tests.artifacts import copy_artifact, write_manifest
from tests.server import ROOT

TEXTS = [
    "pizza",
    "the match team goal player score win league coach game " * 8,  # truncated at max_length
    "",
    "computer software chip phone internet code data network cloud robot app",
    "soup and bread",
    "the coach was very good today",
]


def test_length_groups_pad_each_group_to_its_own_longest_text():
    assert length_groups([5, 50, 6, 48, 7]) == [[0, 2, 4], [3, 1]]
    assert length_groups([5, 50, 6, 48, 7], max_group=2) == [[0, 2], [4], [3, 1]]
    assert length_groups([]) == []
    assert sorted(i for g in length_groups([3, 9, 1, 40, 2, 2, 17]) for i in g) == list(range(7))


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_groups_never_pass_the_budget(seed):
    """Random lengths and budgets: every group's padded tokens (texts x its longest) stay within the
    budget unless the group is one text longer than the budget; every index appears exactly once."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 300, size=int(rng.integers(1, 80)))]
    budget = int(rng.integers(16, 2048))
    groups = length_groups(lengths, max_group=32, max_tokens=budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert padded <= budget or len(g) == 1, (g, padded, budget)
        assert len(g) <= 32


def test_a_text_longer_than_the_token_budget_is_still_served():
    assert length_groups([10, 500, 12], max_tokens=64) == [[0, 2], [1]]


class FakeTokenizer:
    """A text's tokens are its words (ids = word lengths); no overflow."""

    class Encoding:
        def __init__(self, text):
            self.ids = [len(w) for w in text.split()]
            self.type_ids = [0] * len(self.ids)
            self.overflowing = []

    def encode_batch(self, texts):
        return [self.Encoding(t) for t in texts]


class FakeEngine:
    """Logits from each row's real tokens only (so padding cannot change an answer); records the feeds."""

    input_names = ["input_ids", "attention_mask"]

    def __init__(self):
        self.feeds = []

    def run(self, feed):
        self.feeds.append(feed["input_ids"].shape)
        ids, mask = feed["input_ids"], feed["attention_mask"]
        real = (ids * mask).sum(axis=1)
        return np.stack([real % 3, real % 5, mask.sum(axis=1)], axis=1).astype(np.float32)


def test_the_token_budget_batcher_restores_order_on_a_fake_engine():
    """Texts of mixed lengths through Runtime.run_batch with a budget: no engine call passes it (but
    the one text longer than it, alone), and each text's answer sits at its own index, equal to its
    answer alone."""
    rt = Runtime.__new__(Runtime)
    rt.inputs, rt.engine, rt.labels = TextInputs(FakeTokenizer(), 512, 0), FakeEngine(), ["a", "b", "c"]
    rt.input_names, rt.one_per_run, rt.max_group, rt.max_tokens = FakeEngine.input_names, False, 32, 24
    rng = np.random.default_rng(1)
    texts = [" ".join("w" * int(rng.integers(1, 9)) for _ in range(int(rng.integers(1, 12)))) for _ in range(40)]
    texts.append(" ".join(["word"] * 30))  # 30 tokens: over the budget of 24, alone
    batched = rt.run_batch(texts)
    assert all(n * width <= 24 or n == 1 for n, width in rt.engine.feeds)
    assert (1, 30) in rt.engine.feeds and batched.runs == len(rt.engine.feeds) > 2
    alone = np.concatenate([rt.run_batch([t]).probs for t in texts])
    np.testing.assert_allclose(batched.probs, alone)


def test_batched_answers_equal_answers_alone_in_input_order(served_artifact):
    rt = Runtime(served_artifact, variant="fp32", device="cpu")
    batch = rt.run_batch(TEXTS)
    assert batch.runs > 1  # grouped by length, not padded all to the longest
    assert batch.padded_tokens < max(batch.tokens) * len(TEXTS)
    for i, text in enumerate(TEXTS):
        alone = rt.run_batch([text])
        assert np.abs(alone.probs[0] - batch.probs[i]).max() <= 1e-6, text
    assert batch.truncated == [False, True, False, False, False, False]
    assert batch.tokens[1] == rt.inputs.max_length and batch.tokens[2] == 2  # [CLS] [SEP] for the empty text
    out = rt.classify(TEXTS, return_all_scores=True)
    assert [o["label"] for o in out] == [rt.labels[int(np.argmax(p))] for p in batch.probs]
    assert all(abs(sum(o["scores"].values()) - 1) < 1e-9 for o in out)
    assert rt.classify(["soup"])[0].keys() == {"label", "score", "truncated"}


def test_texts_tokenized_by_the_caller_run_as_the_texts_do(served_artifact):
    """run_encoded (ferry predict tokenizes a chunk once, to sort it) makes the groups and the
    answers run_batch makes of the same texts, bit for bit."""
    rt = Runtime(served_artifact, variant="fp32", device="cpu", max_group=4, max_tokens=4096)
    texts = TEXTS * 3
    want = rt.run_batch(texts)
    got = rt.run_encoded(encode(rt.inputs.tokenizer, texts))
    assert got.groups == want.groups and got.runs > 1
    assert got.tokens == want.tokens and got.truncated == want.truncated
    assert np.array_equal(got.probs, want.probs)


def test_a_batch_dependent_variant_runs_one_text_per_call(served_artifact):
    """Dynamic int8 scales activations per batch; served one text per call, it answers as alone."""
    manifest = json.loads((served_artifact / "ferry.json").read_text())
    assert manifest["variants"]["int8"]["batch_invariant"] is False
    rt = Runtime(served_artifact, variant="int8", device="cpu")
    assert rt.one_per_run and rt.info()["batch_invariance"].startswith("one text per inference call")
    assert rt.info()["batch_invariant"] is True and rt.info()["batch_invariant_variant"] is False
    batch = rt.run_batch(TEXTS)
    assert batch.runs == len(TEXTS)
    for i, text in enumerate(TEXTS):
        assert np.array_equal(rt.run_batch([text]).probs[0], batch.probs[i])
    fast = Runtime(served_artifact, variant="int8", device="cpu", enforce_invariance=False)
    assert not fast.one_per_run and fast.info()["batch_invariant"] is False
    assert fast.run_batch(TEXTS).runs < len(TEXTS)


def test_a_modified_model_file_is_refused(served_artifact, tmp_path):
    art, _ = copy_artifact(served_artifact, tmp_path / "a")
    with open(art / "model_int8_static.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model_int8_static.onnx: sha256 .* does not match the manifest"):
        Runtime(art, variant="int8-static", device="cpu")
    Runtime(art, variant="fp32", device="cpu")  # the other files are intact


def test_a_variant_that_failed_parity_is_not_served(served_artifact, tmp_path):
    art, m = copy_artifact(served_artifact, tmp_path / "a")
    m["variants"]["int8"]["status"] = "fail"
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="variant 'int8' failed its parity gate"):
        Runtime(art, variant="int8", device="cpu")


def test_a_tokenizer_larger_than_the_model_is_refused(served_artifact, tmp_path):
    art, m = copy_artifact(served_artifact, tmp_path / "a")
    config = json.loads((art / "config.json").read_text())
    config["vocab_size"] = 100
    (art / "config.json").write_text(json.dumps(config))
    write_manifest(art, m)  # as a re-export would seal it: the vocabulary check, not the seal, refuses it
    with pytest.raises(ArtifactError, match="vocab_size is 100"):
        Runtime(art, variant="fp32", device="cpu")


# --- the CUDA path, with ONNX Runtime's provider list and session faked -------------------------
def test_device_resolution():
    assert resolve_device("auto", [CUDA, CPU], gpu_present=True) == "cuda"
    assert resolve_device("auto", [CUDA, CPU], gpu_present=False) == "cpu"  # onnxruntime-gpu on a machine without GPU
    assert resolve_device("auto", [CPU]) == "cpu"
    assert resolve_device("cpu", [CUDA, CPU], gpu_present=True) == "cpu"
    assert resolve_device("cuda", [CUDA, CPU], gpu_present=True) == "cuda"
    with pytest.raises(FerryError, match="--device cuda: ONNX Runtime here has no CUDAExecutionProvider"):
        resolve_device("cuda", [CPU], gpu_present=True)
    with pytest.raises(FerryError, match="--device cuda: no NVIDIA GPU"):
        resolve_device("cuda", [CUDA, CPU], gpu_present=False)


class DeviceValue:
    def __init__(self, array):
        self.array, self.device = array, "cuda"


class FakeBinding:
    def __init__(self, session):
        self.session, self.inputs, self.outputs, self.ran = session, {}, {}, False

    def bind_ortvalue_input(self, name, value):
        assert isinstance(value, DeviceValue), "inputs must be bound as device OrtValues"
        self.inputs[name] = value

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.outputs[name] = device_type

    def copy_outputs_to_cpu(self):
        assert self.ran
        feed = {k: v.array for k, v in self.inputs.items()}
        return self.session.cpu.run(list(self.outputs), feed)


class FakeCudaSession:
    """Reports the CUDA provider and answers through IO binding, computing on a real CPU session."""

    log: list = []

    def __init__(self, path, providers):
        self.path, self.providers = path, providers
        self.cpu = create_session(path, device="cpu")
        self.bindings = []
        FakeCudaSession.log.append(self)

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return self.cpu.get_inputs()

    def get_outputs(self):
        return self.cpu.get_outputs()

    def io_binding(self):
        self.bindings.append(FakeBinding(self))
        return self.bindings[-1]

    def run_with_iobinding(self, binding):
        binding.ran = True

    def run(self, *a, **k):
        raise AssertionError("on CUDA the runtime must use IO binding, not session.run")


def fake_factory(active):
    def factory(path, device, threads, optimization, available):
        return FakeCudaSession(path, [active, CPU] if device == "cuda" else [CPU])

    return factory


@pytest.fixture
def gpu_artifact(served_artifact, tmp_path):
    """The artifact with an fp16 variant declared as the GPU default (the fp32 graph stands in for it)."""
    art, m = copy_artifact(served_artifact, tmp_path / "gpu")
    shutil.copy(art / "model.onnx", art / "model_fp16.onnx")
    m["variants"]["fp16"] = {**m["variants"]["fp32"], "file": "model_fp16.onnx", "precision": "fp16", "device": "cuda",
                             "sha256": sha256_file(art / "model_fp16.onnx"), "batch_invariant": True}
    m["default_variant"] = {**m["default_variant"], "gpu": "fp16"}
    write_manifest(art, m)
    return art


def test_cuda_serves_the_fp16_default_through_io_binding(gpu_artifact, monkeypatch):
    monkeypatch.setattr(engines_module, "device_value", lambda array, device_id=0: DeviceValue(array))
    rt = Runtime(gpu_artifact, available=[CUDA, CPU], gpu_present=True, session_factory=fake_factory(CUDA))
    assert (rt.device, rt.provider, rt.variant.name, rt.io_binding) == ("cuda", CUDA, "fp16", True)
    assert rt.info()["provider"] == CUDA and rt.info()["variant"] == "fp16"
    got = rt.run_batch(TEXTS)
    binding = rt.engine.session.bindings[-1]
    assert set(binding.inputs) == {i.name for i in rt.engine.session.get_inputs()}
    assert binding.outputs == {"logits": "cuda"}
    cpu = Runtime(gpu_artifact, variant="fp32", device="cpu")
    assert np.abs(cpu.run_batch(TEXTS).probs - got.probs).max() <= 1e-6


def test_cuda_listed_but_unusable_falls_back_to_the_cpu_variant(gpu_artifact):
    rt = Runtime(gpu_artifact, available=[CUDA, CPU], gpu_present=True, session_factory=fake_factory(CPU))
    manifest = json.loads((gpu_artifact / "ferry.json").read_text())
    assert (rt.device, rt.provider, rt.io_binding) == ("cpu", CPU, False)
    assert rt.variant.name == manifest["default_variant"]["cpu"]
    assert "fell back" in rt.describe() and rt.info()["fallback"]
    with pytest.raises(FerryError, match="could not use the GPU"):
        Runtime(gpu_artifact, device="cuda", available=[CUDA, CPU], gpu_present=True, session_factory=fake_factory(CPU))


def test_cpu_default_is_the_artifacts_batch_invariant_cpu_variant(gpu_artifact):
    rt = Runtime(gpu_artifact, available=[CUDA, CPU], gpu_present=False, choose=False)
    manifest = json.loads((gpu_artifact / "ferry.json").read_text())
    assert rt.device == "cpu" and rt.variant.name == manifest["default_variant"]["cpu"]
    assert rt.batch_invariant_variant is True
    # With the start-up choice: one of the passing, batch-invariant CPU variants, never the GPU's fp16.
    rt = Runtime(gpu_artifact, available=[CUDA, CPU], gpu_present=False)
    assert rt.variant.name in ("fp32", "int8-static") and rt.choice.variant == rt.variant.name
    assert set(rt.choice.timings) == {"fp32", "int8-static"} and rt.info()["parity_here"]["status"] == "pass"
    assert rt.choice.skipped["fp16"] == "runs on cuda" and "batch-invariant" in rt.choice.skipped["int8"]


# --- settings --------------------------------------------------------------------------------
def test_settings_round_trip_and_errors():
    s = ServeSettings(artifact="/a", variant="int8", threads=2, max_batch_size=16, max_texts=10)
    assert ServeSettings.from_env(s.to_env()) == s
    assert ServeSettings().batching("cpu") == (32, 10_000) and ServeSettings().batching("cuda") == (128, 2_000)
    with pytest.raises(ConfigError, match="FERRY_MAX_TEXTS='many' must be an integer"):
        ServeSettings.from_env({"FERRY_MAX_TEXTS": "many"})
    with pytest.raises(ConfigError, match="FERRY_WORKERS='0' must be >= 1"):
        ServeSettings.from_env({"FERRY_WORKERS": "0"})


# --- no PyTorch on the serving path ------------------------------------------------------------
def test_workers_and_threads_per_device():
    """CPU: a worker per physical core up to 4, the cores shared out as engine threads; GPU: 4
    workers, the engine's own threads; whatever is given is kept."""
    assert worker_split("cpu", None, None, cores=2)[:2] == (2, 1)
    assert worker_split("cpu", None, None, cores=1)[:2] == (1, 1)
    assert worker_split("cpu", None, None, cores=16)[:2] == (4, 4)
    assert worker_split("cpu", 1, None, cores=8)[:2] == (1, 8)
    assert worker_split("cpu", None, 3, cores=8)[:2] == (4, 3)
    workers, threads, why = worker_split("cpu", 2, 2, cores=8)
    assert (workers, threads, why) == (2, 2, "given")
    assert worker_split("cuda", None, None, cores=16)[:2] == (4, None)
    assert "2 workers x 1 engine thread" in worker_split("cpu", None, None, cores=2)[2]


def test_the_serving_path_imports_no_torch(served_artifact):
    """Every module of runtime/ and serve/ imports with torch, transformers and optimum blocked, and pulls in no finetune/ or export/ module."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "sys.modules['transformers'] = None\n"
        "sys.modules['optimum'] = None\n"
        "from runtime.predictor import Runtime\n"
        "rt = Runtime(sys.argv[1], device='cpu')\n"
        "assert rt.classify(['pizza'])[0]['label'] and rt.choice.variant\n"
        "import pkgutil, importlib, runtime, serve\n"
        "for pkg in (runtime, serve):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "stages = sorted(m for m in sys.modules if m.split('.')[0] in ('finetune', 'export'))\n"
        "assert not stages, stages\n"
        "print('ok')\n"
    )
    env = {**os.environ, "FERRY_ARTIFACT": str(served_artifact), "BENTOML_DO_NOT_TRACK": "True"}
    p = subprocess.run([sys.executable, "-c", code, str(served_artifact)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().endswith("ok")


def test_a_lone_surrogate_does_not_fail_the_batch(served_artifact):
    rt = Runtime(served_artifact, variant="fp32", device="cpu")
    out = rt.classify(["soup \ud800 bread", "pizza"])
    assert [o["label"] for o in out] == [o["label"] for o in rt.classify(["soup \ufffd bread", "pizza"])]


def test_ready_only_after_the_warm_up_inference(served_artifact):
    rt = Runtime(served_artifact, variant="fp32", device="cpu")
    assert rt.ready is False and rt.info()["ready"] is False
    rt.warm_up()
    assert rt.ready is True


@pytest.mark.gpu
def test_real_cuda_serves_fp16_through_io_binding(tmp_path):
    """On a real GPU: the exported fp16 variant is verified there, served by default through
    IO binding, and answers like the fp32 graph on CPU (labels equal, probabilities close)."""
    from runtime.engines import cuda_usable
    from ferry.cli import main
    from tests.fixtures import text_checkpoint

    if not cuda_usable():
        pytest.skip("needs a CUDA GPU")
    art = tmp_path / "artifact"
    assert main(["export", str(text_checkpoint(tmp_path / "ckpt")), "--output", str(art),
                 "--variants", "fp32,fp16", "--quiet"]) == 0
    assert json.loads((art / "ferry.json").read_text())["variants"]["fp16"]["status"] == "pass"
    rt = Runtime(art)
    assert (rt.device, rt.provider, rt.variant.name, rt.io_binding) == ("cuda", CUDA, "fp16", True)
    got = rt.run_batch(TEXTS)
    cpu = Runtime(art, variant="fp32", device="cpu").run_batch(TEXTS)
    assert (got.probs.argmax(1) == cpu.probs.argmax(1)).all()
    assert np.abs(got.probs - cpu.probs).max() <= 1e-2
    alone = np.concatenate([rt.run_batch([t]).probs for t in TEXTS])
    assert np.abs(alone - got.probs).max() <= 1e-2


def test_a_bad_ferry_device_under_bentoml_is_one_line():
    """`bentoml serve` imports the service with FERRY_* from the environment: a bad device is one line, status 2."""
    env = {**os.environ, "FERRY_DEVICE": "gpu", "FERRY_ARTIFACT": "/nonexistent", "BENTOML_DO_NOT_TRACK": "True"}
    p = subprocess.run([sys.executable, "-c", "import serve.service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "ferry: refusing to start: FERRY_DEVICE 'gpu' is not one of: auto, cpu, cuda"
