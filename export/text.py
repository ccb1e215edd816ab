"""The text classification part of `ferry export` (:class:`TextExport`).

1. optimum's exporter on the checkpoint directory (dynamic batch and sequence axes, the
   architecture's own inputs, external data above 2 GB);
2. ONNX Runtime's transformer fusions through optimum's ORTOptimizer (O1-O3, for the CPU
   variants; the fp16 variant gets the GPU fusions with exact GELU, then float16, see
   :func:`fp16_graph`);
3. the variants (see :mod:`export.quantize`): int8 (dynamic), int8-static (calibrated on the
   checkpoint's calibration texts, its most sensitive MatMuls kept in fp32 on its validation
   texts, see :mod:`export.fallback`), fp16 and fp16-tensorrt;
4. parity on random tokens and the held-out texts, and ``reference.jsonl``: PyTorch's logits on
   held-out texts, which `ferry serve` re-checks variants against on the machine it runs on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from export import quantize
from export.base import Calibration, Graph, Heldout, Maker, TaskExport, model_labels
from export.parity import Labelled, Progress, Reference, build_reference, load_labelled_data, text_batches, torch_logits, usable_length
from export.writer import graph_info
from ferry.errors import CheckpointError, DataError, FerryError, first_line
from ferry.files import sha256_file
from ferry.tasks import TEXT

VERSIONS = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime", "openvino", "numpy")
# Held-out texts whose PyTorch logits the artifact keeps, so `ferry serve` can re-check a
# variant on the machine it runs on (kernels differ between CPUs), at this many tokens.
REFERENCE_TEXTS = 256
REFERENCE_TOKENS = 128
REFERENCE_FILE = "reference.jsonl"


def supported_model_types() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(TEXT.name, exporter="onnx"))


def fusable_model_types() -> set[str]:
    from optimum.onnxruntime.utils import ORTConfigManager

    return set(ORTConfigManager._conf)


def check_model_type(ckpt: Any) -> None:
    supported = supported_model_types()
    if ckpt.model_type not in supported:
        raise CheckpointError(
            f"{ckpt.path}: model type '{ckpt.model_type}' is not supported by the ONNX exporter for {TEXT}; "
            f"supported: {', '.join(supported)}"
        )


def check_tokenizer(ckpt: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer that produces ids the model's embedding matrix does not have."""
    vocab = ckpt.config.get("vocab_size")
    size = len(tokenizer)
    if vocab is not None and size > int(vocab):
        raise CheckpointError(
            f"{ckpt.path}: the tokenizer has {size} tokens but the model's embedding matrix has {vocab} rows; "
            "the tokenizer does not belong to this model: save the model's own tokenizer beside it"
        )


def calibration_texts(ckpt: Any, calibration: Calibration, text_column: str) -> list[str]:
    """The texts int8-static calibrates on: ``calibration.source``, else the checkpoint's calibration split."""
    from export.inputs import read_jsonl_texts, read_texts

    if calibration.source:
        texts = read_texts(calibration.source, text_column, "--calibration")
    elif ckpt.calibration is not None:
        texts, _ = read_jsonl_texts(ckpt.calibration)
    elif ckpt.heldout is not None:
        raise DataError(
            f"{ckpt.path}: no calibration.jsonl for int8-static (the held-out split is not used: it measures accuracy); "
            "pass --calibration FILE with training texts"
        )
    else:
        raise DataError(f"{ckpt.path}: no calibration.jsonl for int8-static; pass --calibration FILE with training texts")
    return texts[: calibration.samples]


def onnx_export(ckpt: Any, work: Path, opset: int | None) -> Path:
    """optimum's exporter on the checkpoint directory: ``work/model.onnx`` and its config."""
    from optimum.exporters.onnx import main_export

    try:
        main_export(
            str(ckpt.path), work, task=TEXT.name, opset=opset, do_validation=False, library_name="transformers",
            framework="pt", local_files_only=True,
        )
    except Exception as e:  # the exporter raises many types for an architecture it cannot trace
        text = first_line(e)
        raise FerryError(f"{ckpt.path}: the ONNX export failed ({type(e).__name__}: {text[:300]})") from None
    return work / "model.onnx"


def optimize(raw_dir: Path, out_dir: Path, level: str, model_type: str, split_qkv: bool = False) -> dict[str, Any]:
    """ORT transformer fusions through optimum's ORTOptimizer (O0-O3, for the CPU variants).

    ``split_qkv`` fuses attention as MultiHeadAttention with the Q, K and V projections
    left as MatMuls (static quantization can then quantize them; it cannot enter the
    packed Attention op).
    """
    from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

    if level == "O0" or model_type not in fusable_model_types():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw_dir / "model.onnx", out_dir / "model.onnx")
        ext = quantize.external_data_file(raw_dir / "model.onnx")
        if ext:
            shutil.copy(ext, out_dir / ext.name)
        reason = "none requested" if level == "O0" else f"ONNX Runtime has no fusions for {model_type}"
        return {"level": "O0", "fusions": False, "note": reason}
    source = raw_dir
    if quantize.external_data_file(raw_dir / "model.onnx"):
        # ORTOptimizer deletes its input's external data file after saving; give it a copy,
        # so the raw export can be optimized again (the fp16 and int8-static graphs).
        source = out_dir.with_name(out_dir.name + "-input")
        shutil.copytree(raw_dir, source)
    optimizer = ORTOptimizer.from_pretrained(source, file_names=["model.onnx"])
    # Shape inference cannot see through every exported op; the exporter disables it too
    # (and a failed symbolic inference would leave a temp file in the working directory).
    extra: dict[str, Any] = {"disable_shape_inference": True}
    if split_qkv:
        extra["use_multi_head_attention"] = True
    config = AutoOptimizationConfig.with_optimization_level(level, **extra)
    try:
        optimizer.optimize(config, out_dir, file_suffix="")
    finally:
        if source != raw_dir:
            shutil.rmtree(source, ignore_errors=True)
    info: dict[str, Any] = {"level": level, "fusions": level != "O1"}
    if split_qkv:
        info["attention"] = "MultiHeadAttention, Q/K/V projections as MatMul"
    return info


def fp16_graph(raw_dir: Path, out_dir: Path, model_type: str) -> dict[str, Any]:
    """The fp16 variant: ONNX Runtime's transformer fusions for GPU with exact GELU, then
    float16 weights and compute with fp32 inputs and outputs.

    Not optimum's O4: O4 builds on O3, whose approximate GELU (FastGelu) and offline
    level-2 pass cost accuracy and speed on CUDA (measured on an H100 with the demo
    checkpoint, random-token and held-out inputs: max |Δlogit| 1.7e-2 with O4, failing the
    1e-2 gate, against 9.3e-3 here; and 3x fewer sequences/s at batch 32 x 128). No offline ONNX Runtime pass runs (opt_level 0): the session applies
    its own on the provider it gets, so exporting on a machine without a GPU is safe.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out_dir.mkdir(parents=True, exist_ok=True)
    src, dst = raw_dir / "model.onnx", out_dir / "model.onnx"
    large = quantize.model_bytes(src) > 1_800_000_000  # protobuf's 2 GB limit, with margin
    if model_type not in fusable_model_types():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst), save_as_external_data=large, location=dst.name + "_data")
        return {"level": "fp16 conversion", "fusions": False, "note": f"ONNX Runtime has no fusions for {model_type}"}
    from onnxruntime.transformers.optimizer import optimize_model
    from optimum.onnxruntime.utils import ORTConfigManager

    config = json.loads((raw_dir / "config.json").read_text(encoding="utf-8"))
    heads = int(config.get("num_attention_heads") or config.get("n_heads") or 0)
    hidden = int(config.get("hidden_size") or config.get("dim") or 0)
    graph = optimize_model(str(src), model_type=ORTConfigManager.get_model_ort_type(model_type),
                           num_heads=heads, hidden_size=hidden, opt_level=0, use_gpu=True)
    graph.convert_float_to_float16(keep_io_types=True)
    graph.save_model_to_file(str(dst), use_external_data_format=large)
    return {"level": "GPU fusions (exact GELU) + fp16", "fusions": True, "for_gpu": True}


def place(src: Path, dst: Path) -> dict[str, Any]:
    """Move a model file (and its external data, renamed to ``<dst>_data``) into the artifact."""
    ext = quantize.external_data_file(src)
    if ext is None:
        shutil.move(src, dst)
        return {}
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + "_data", size_threshold=1024)
    data = dst.with_name(dst.name + "_data")
    return {"external_data": {"file": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size}}


def max_length_of(ckpt: Any, model: Any, tokenizer: Any) -> int:
    """The tokens per text the graph is checked and served at: the checkpoint's training length (a
    plain Hugging Face directory: the tokenizer's, at most 512), within the model's positions."""
    return usable_length(model.config, ckpt.max_length if ckpt.manifest else min(512, tokenizer.model_max_length or 512))


def write_reference(path: Path, model: Any, tokenizer: Any, labelled: Labelled, tokens: int, input_names: Sequence[str]) -> dict[str, Any]:
    """PyTorch's logits on up to :data:`REFERENCE_TEXTS` held-out texts cut at ``tokens``, with
    their token ids, written as JSON lines; `ferry serve` re-checks variants against them."""
    from export.inputs import encode

    texts = labelled.texts[:REFERENCE_TEXTS]
    batches, index = text_batches(tokenizer, texts, tokens, input_names)
    logits: list[Any] = [None] * len(texts)
    for feeds, ix in zip(batches, index):
        for i, row in zip(ix, torch_logits(model, feeds)):
            logits[i] = row
    ids = encode(tokenizer, texts, tokens)
    rows = [{"input_ids": i, "logits": [float(x) for x in row]} for i, row in zip(ids, logits)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"file": path.name, "sha256": sha256_file(path), "texts": len(rows), "max_tokens": tokens,
            "source": labelled.source, "model": "PyTorch fp32 (the export's reference)"}


@dataclasses.dataclass(frozen=True)
class StaticOptions:
    """How int8-static of a text model is made, beyond its calibration."""

    smooth: float
    """SmoothQuant strength alpha: activation outliers moved into the weight scales (0: off)."""
    select_agreement: float
    """Validation label agreement (also at twice the error) that the fp32 fallback aims for (0: no fallback)."""
    select_length: int
    """Tokens per validation text when choosing the fp32 fallback."""


class TextExport(TaskExport):
    """A text checkpoint's part of the export: the PyTorch model and tokenizer, the labelled texts
    parity compares on, the calibration texts, and how the graphs are made."""

    task = TEXT
    graph_steps = 2
    versions = VERSIONS

    def __init__(
        self, ckpt: Any, model: Any, tokenizer: Any, *, labels: list[str], max_length: int, labelled: Labelled | None,
        calib: list[str], calibration: Calibration, static: StaticOptions, opset: int | None, optimization: str,
        threads: int,
    ):
        self.ckpt, self.model, self.tokenizer = ckpt, model, tokenizer
        self.labels, self.max_length, self.labelled, self.calib = labels, max_length, labelled, calib
        self.calibration, self.static, self.opset, self.optimization, self.threads = calibration, static, opset, optimization, threads
        # set by graph(): the exporter's output (the fp16 and int8-static graphs start from it), the fp32 graph
        self.raw_dir = Path()
        self.fp32 = Path()
        self.opt_info: dict[str, Any] = {}
        self.inputs: list[str] = []

    @classmethod
    def load(
        cls, ckpt: Any, variants: Sequence[str], *, calibration: Calibration, heldout: Heldout, static: StaticOptions,
        opset: int | None, optimization: str, threads: int,
    ) -> TextExport:
        """Check ``ckpt`` (model type, tokenizer), then load its model, tokenizer and data."""
        from finetune.checkpoint import load_model, load_tokenizer

        check_model_type(ckpt)
        tokenizer = load_tokenizer(ckpt.path)
        check_tokenizer(ckpt, tokenizer)
        model = load_model(ckpt).eval()
        labels = model_labels(ckpt, model)
        max_length = max_length_of(ckpt, model, tokenizer)
        calib = calibration_texts(ckpt, calibration, heldout.text_column) if "int8-static" in variants else []
        labelled = load_labelled_data(labels, ckpt.heldout, heldout.data, heldout.text_column, heldout.label_column, heldout.max_examples)
        return cls(ckpt, model, tokenizer, labels=labels, max_length=max_length, labelled=labelled, calib=calib,
                   calibration=calibration, static=static, opset=opset, optimization=optimization, threads=threads)

    # ------------------------------------------------------------ the graph

    def graph(self, work: Path, fp32: Path, say: Callable[..., None]) -> Graph:
        t = time.perf_counter()
        say(f"exporting {self.ckpt.path} ({self.ckpt.model_type}) to ONNX")
        self.raw_dir, self.fp32 = work / "raw", fp32
        opset, self.inputs, outputs = graph_info(onnx_export(self.ckpt, self.raw_dir, self.opset))
        timings = {"export_s": time.perf_counter() - t}
        t = time.perf_counter()
        say(f"optimizing the graph ({self.optimization})")
        self.opt_info = optimize(self.raw_dir, work / "opt", self.optimization, self.ckpt.model_type)
        entry = {"optimization": self.opt_info, **place(work / "opt" / "model.onnx", fp32)}
        timings["optimize_s"] = time.perf_counter() - t
        return Graph(entry, timings, opset, self.inputs, outputs)

    # ------------------------------------------------------------ the variants

    def makers(self) -> dict[str, Maker]:
        return {"int8": self.int8, "int8-static": self.int8_static, "fp16": self.fp16, "fp16-tensorrt": self.fp16_tensorrt}

    def int8(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        q = quantize.quantize_dynamic_int8(self.fp32, work / "int8.onnx", isa)
        return {"optimization": self.opt_info, "quantization": q, **place(work / "int8.onnx", dst)}

    def static_base(self, work: Path) -> tuple[Path, dict[str, Any]]:
        """(the graph int8-static quantizes, its optimization): with O2/O3 fusions, attention as
        MultiHeadAttention so that the Q, K and V projections can be quantized."""
        if self.optimization in ("O2", "O3") and self.ckpt.model_type in fusable_model_types():
            info = optimize(self.raw_dir, work / "opt-mha", self.optimization, self.ckpt.model_type, split_qkv=True)
            return work / "opt-mha" / "model.onnx", info
        return self.fp32, self.opt_info

    def fp32_matmuls(self, quantizer: quantize.StaticQuantizer, base: Path, out: Path, work: Path) -> dict[str, Any]:
        """int8-static written to ``out``, its most sensitive MatMuls kept in fp32 as chosen on the
        checkpoint's validation texts (:mod:`export.fallback`), when it has them."""
        if self.ckpt.validation is None:
            return no_fp32_matmuls(quantizer, out, f"{self.ckpt.path} has no validation.jsonl")
        from export import fallback
        from export.inputs import read_jsonl_texts

        q = fallback.select_fp32_matmuls(
            quantizer, base, out, work, self.model, self.tokenizer, read_jsonl_texts(self.ckpt.validation)[0],
            min(self.max_length, self.static.select_length), self.inputs, self.static.select_agreement, self.threads,
            str(self.ckpt.validation),
        )
        print(fallback.summary(q), flush=True)
        return q

    def int8_static(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        from export.inputs import encode, pad_id
        from runtime.tokens import collate

        ids = encode(self.tokenizer, self.calib, self.max_length)
        feeds = [collate([x], pad_id(self.tokenizer), self.inputs) for x in ids]
        base, static_opt = self.static_base(work)
        quantizer = quantize.StaticQuantizer(base, work / "int8s", feeds, isa, self.calibration.method, smooth=self.static.smooth)
        q = self.fp32_matmuls(quantizer, base, work / "int8s.onnx", work / "int8s")
        q["calibration"]["source"] = str(self.calibration.source or self.ckpt.calibration)
        return {"optimization": static_opt, "quantization": q, **place(work / "int8s.onnx", dst)}

    def fp16(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        info = fp16_graph(self.raw_dir, work / "fp16", self.ckpt.model_type)
        return {"optimization": info, **place(work / "fp16" / "model.onnx", dst)}

    def fp16_tensorrt(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        # TensorRT builds its own fused fp16 engine from plain ONNX ops; ORT's contrib
        # fusions (Attention, SkipLayerNormalization) would fall back to the CUDA provider.
        plain = {"level": "none (TensorRT fuses and casts to fp16 itself: trt_fp16_enable)", "fusions": False}
        return {"optimization": plain, **place(self.raw_dir / "model.onnx", dst)}

    # ------------------------------------------------------------ files, parity, manifest

    def save_files(self, staging: Path) -> None:
        shutil.copy(self.raw_dir / "config.json", staging / "config.json")
        self.tokenizer.save_pretrained(staging)

    def heldout_line(self) -> str:
        if self.labelled is None:
            return " (no labelled data)"
        return f" on {self.labelled.source} ({len(self.labelled.texts)} texts)"

    def reference(self, inputs: list[str], batch_sizes: list[int], seq_lengths: list[int], seed: int,
                  progress: Progress | None) -> Reference:
        return build_reference(self.model, self.tokenizer, self.labels, self.labelled, self.max_length, inputs,
                               batch_sizes=batch_sizes, seq_lengths=seq_lengths, seed=seed, progress=progress)

    def fields(self) -> dict[str, Any]:
        return {"max_length": self.max_length}

    def write_after_parity(self, staging: Path, timings: dict[str, float]) -> dict[str, Any]:
        if self.labelled is None:
            return {"reference": None}
        t = time.perf_counter()
        reference = write_reference(staging / REFERENCE_FILE, self.model, self.tokenizer, self.labelled,
                                    min(self.max_length, REFERENCE_TOKENS), self.inputs)
        timings["reference_s"] = time.perf_counter() - t
        return {"reference": reference}


def no_fp32_matmuls(quantizer: quantize.StaticQuantizer, out: Path, why: str) -> dict[str, Any]:
    """int8-static written to ``out`` with every linear MatMul quantized (``why``: no fp32 fallback was chosen)."""
    q = quantizer.quantize(out)
    q["fp32_matmuls"] = []
    q["fp32_matmuls_selection"] = {"on": None, "note": f"{why}: every linear MatMul quantized"}
    return q
