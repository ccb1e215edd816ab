"""The image classification part of `ferry export` (:class:`ImageExport`), and its parity inputs.

The ONNX graph takes ``pixel_values`` float32 ``[batch, 3, H, W]`` (dynamic batch, H and W
fixed at the checkpoint's image size) and returns ``logits``. It is made by
``torch.onnx.export`` (opset 17) for every architecture, including ferry's own
EfficientNet-Lite that optimum does not know; the manifest records the exporter.

Variants:

- fp32: the exported graph (ONNX Runtime applies its own CPU optimizations at load);
- int8-static: QDQ, Conv and constant-weight MatMul quantized, calibrated on the
  checkpoint's ``calibration/`` images (the usual int8 for CNNs); while its label agreement
  with fp32 on the checkpoint's ``validation/`` images is under the int8 gate, the first 1, 2,
  4, then 8 Convs stay fp32 (:func:`choose_fp32_convs`);
- int8: dynamic quantization limited to MatMul/Gemm (ONNX Runtime's default would also make
  Conv a ConvInteger, slow and inaccurate on CNNs): meaningful for a ViT, while a CNN keeps its
  convolutions in fp32 (only its classifier is quantized);
  written when asked for, and judged by the same gate;
- fp16: float16 graph with fp32 inputs and outputs, verified on CUDA only (as for text).

Parity reuses :mod:`export.parity`: random pixel batches (``--parity-batch-sizes``; the
sequence lengths do not apply) and the held-out images, each preprocessed by
``runtime.pixels.preprocess`` (the one implementation shared with training and serving).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from export import quantize
from export.base import Calibration, Graph, Heldout, Maker, TaskExport, model_labels
from export.parity import HELDOUT_BATCH, INVARIANCE_TEXTS, Labelled, Progress, Reference, torch_logits
from export.writer import graph_info
from ferry.errors import DataError, FerryError, first_line
from ferry.tasks import IMAGE

INPUT = "pixel_values"
OPSET = 17
EXPORTER = f"torch.onnx.export (TorchScript), opset {OPSET}"
VERSIONS = ("torch", "onnx", "onnxruntime", "numpy", "pillow")
NO_OPTIMIZATION = {"level": "O0", "fusions": False, "note": "ONNX Runtime optimizes the graph when it loads it"}


def image_size(processor: dict[str, Any]) -> tuple[int, int]:
    size = processor.get("size") or {}
    return int(size["height"]), int(size["width"])


def labelled_pixels(folder: Path, labels: Sequence[str], processor: dict[str, Any], max_examples: int, flag: str) -> tuple[np.ndarray, list[int]]:
    """Pixels and label ids of a ``<label>/<image>`` folder, through the runtime's preprocessing."""
    from finetune.images import read_image_folder
    from runtime.pixels import load_pixels

    files, names = read_image_folder(folder, flag)
    known = {label: i for i, label in enumerate(labels)}
    unknown = sorted({y for y in names if y not in known})
    if unknown:
        raise DataError(f"{folder}: class folder '{unknown[0]}' is not one of the model's labels ({', '.join(labels)})")
    if max_examples and len(files) > max_examples:
        files, names = files[:max_examples], names[:max_examples]
    return load_pixels(files, processor), [known[y] for y in names]


def calibration_feeds(folder: Path, processor: dict[str, Any], samples: int, flag: str) -> list[dict[str, np.ndarray]]:
    """One feed per image of a ``<label>/<image>`` folder (at most ``samples``), for int8-static."""
    from finetune.images import read_image_folder
    from runtime.pixels import open_image, preprocess

    files, _ = read_image_folder(folder, flag)
    return [{INPUT: preprocess([open_image(f, str(f))], processor)} for f in files[:samples]]


def heldout_pixels(split: Path | None, labels: Sequence[str], processor: dict[str, Any], data: str | None,
                   max_examples: int) -> tuple[np.ndarray, list[int], str] | None:
    """The labelled images parity measures accuracy on: ``data`` (--data DIR), else the checkpoint's
    held-out ``split``; None when there are none."""
    folder, flag = (Path(data), "--data") if data else (split, "held-out images")
    if folder is None:
        return None
    pixels, ids = labelled_pixels(folder, labels, processor, max_examples, flag)
    return pixels, ids, str(folder)


def torch_export(model: Any, dst: Path, height: int, width: int) -> None:
    """The model as ONNX: ``pixel_values`` [batch, 3, H, W] -> ``logits``, dynamic batch."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: Any) -> Any:
            return self.inner(pixel_values=pixel_values).logits

    dst.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, height, width)
    try:
        torch.onnx.export(
            Logits(model).eval(), (example,), str(dst), input_names=[INPUT], output_names=["logits"],
            dynamic_axes={INPUT: {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )
    except Exception as e:  # the exporter raises many types for a model it cannot trace
        text = first_line(e)
        raise FerryError(f"the ONNX export failed ({type(e).__name__}: {text[:300]})") from None


def fp16_image_graph(src: Path, dst: Path) -> dict[str, Any]:
    """float16 weights and compute, fp32 inputs and outputs (no transformer fusions apply)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return {"level": "fp16 conversion", "fusions": False, "for_gpu": True}


def build_image_reference(
    model: Any, labels: Sequence[str], heldout: tuple[np.ndarray, list[int], str] | None, height: int, width: int, *,
    batch_sizes: Sequence[int], seed: int, progress: Progress | None = None,
) -> Reference:
    """PyTorch's logits on random pixel batches (``batch_sizes``, drawn from ``seed``) and on the held-out images."""
    wrap = progress or (lambda it, desc: it)
    rng = np.random.default_rng(seed)
    # Random pixels in the normalized range (a standard normal covers what preprocess yields).
    cases = [{INPUT: rng.standard_normal((int(b), 3, height, width)).astype(np.float32)} for b in batch_sizes]
    case_logits = [torch_logits(model, c) for c in wrap(cases, "PyTorch, random pixels")]
    batches, index, logits, labelled = [], [], None, None
    if heldout is not None:
        pixels, label_ids, source = heldout
        labelled = Labelled([str(i) for i in range(len(label_ids))], label_ids, source)
        index = [list(range(i, min(i + HELDOUT_BATCH, len(pixels)))) for i in range(0, len(pixels), HELDOUT_BATCH)]
        batches = [{INPUT: pixels[ix]} for ix in index]
        logits = np.zeros((len(pixels), len(labels)), dtype=np.float32)
        for feeds, ix in zip(wrap(batches, "PyTorch, held-out"), index):
            logits[ix] = torch_logits(model, feeds)
        inv = list(pixels[:INVARIANCE_TEXTS])
    else:
        inv = list(rng.standard_normal((INVARIANCE_TEXTS, 3, height, width)).astype(np.float32))
    return Reference(
        cases, case_logits, batches, index, labelled, logits, inv, len(labels), list(labels), 0, [INPUT],
        batch_of=lambda items: {INPUT: np.stack(items)},
    )


# int8-static of a CNN: how many leading convolutions (graph order) to keep in fp32, tried in turn
KEEP_FP32_STEPS = (0, 1, 2, 4, 8)


def choose_fp32_convs(quantize_keeping: Any, agreement: Any, convs: Sequence[str], gate: float) -> tuple[int, list[dict[str, Any]]]:
    """How many leading convolutions int8-static keeps in fp32, and every try.

    ``quantize_keeping(k)`` writes the variant with the first ``k`` of ``convs`` in fp32;
    ``agreement(k)`` is its label agreement with fp32 on the validation images. The first ``k``
    of :data:`KEEP_FP32_STEPS` that reaches ``gate`` wins; if none does, the best agreement
    (the smallest ``k`` among equals). The early layers of a CNN are the usual int8 casualties.
    """
    tried: list[dict[str, Any]] = []
    for k in KEEP_FP32_STEPS:
        if k > len(convs):
            break
        quantize_keeping(k)
        tried.append({"fp32_convs": k, "agreement": agreement(k)})
        if tried[-1]["agreement"] >= gate:
            return k, tried
    best = max(tried, key=lambda t: (t["agreement"], -t["fp32_convs"]))
    return best["fp32_convs"], tried


def static_int8(fp32: Path, dst: Path, work: Path, calib: list[dict[str, np.ndarray]], isa: str, *, method: str,
                validation: np.ndarray | None, gate: float, threads: int) -> dict[str, Any]:
    """int8-static (QDQ, Conv and MatMul, activation ranges set by ``method``) of an image graph,
    choosing on ``validation`` pixels (never on the held-out images parity judges) which leading
    convolutions stay fp32: the fewest whose label agreement with fp32 reaches ``gate``."""
    import onnx

    from runtime.engines import create_session

    convs = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.op_type == "Conv"]

    def path(k: int) -> Path:
        return work / f"int8s-fp32convs{k}.onnx"

    quantized: dict[int, dict[str, Any]] = {}

    def quantize_keeping(k: int) -> None:
        quantized[k] = quantize.quantize_static_int8(fp32, path(k), calib, isa, method, conv=True, keep_fp32=convs[:k])

    if validation is None:
        k, selection = 0, {"on": None, "note": "no validation images: every Conv quantized"}
        quantize_keeping(0)
    else:
        def predict(model_path: Path) -> np.ndarray:
            session = create_session(model_path, "cpu", threads)
            return np.concatenate([session.run(["logits"], {INPUT: validation[i : i + HELDOUT_BATCH]})[0].argmax(-1)
                                   for i in range(0, len(validation), HELDOUT_BATCH)])

        reference = predict(fp32)
        k, tried = choose_fp32_convs(quantize_keeping, lambda k: float((predict(path(k)) == reference).mean()), convs, gate)
        selection = {"on": f"validation/ ({len(validation)} images)", "gate": gate, "tried": tried}
    shutil.move(str(path(k)), str(dst))
    return {**quantized[k], "fp32_convs": convs[:k], "fp32_convs_selection": selection}


class ImageExport(TaskExport):
    """An image checkpoint's part of the export: the PyTorch model, its image processor, the
    held-out, calibration and validation images, and how the graphs are made."""

    task = IMAGE
    graph_steps = 1
    versions = VERSIONS

    def __init__(
        self, ckpt: Any, model: Any, processor: dict[str, Any], *, labels: list[str],
        heldout: tuple[np.ndarray, list[int], str] | None, calib: list[dict[str, np.ndarray]],
        validation: np.ndarray | None, calibration: Calibration, gate: float, threads: int,
    ):
        self.ckpt, self.model, self.processor, self.labels = ckpt, model, processor, labels
        self.height, self.width = image_size(processor)
        self.heldout, self.calib, self.validation = heldout, calib, validation
        self.calibration, self.gate, self.threads = calibration, gate, threads
        self.raw = Path()  # set by graph(): the exported graph, which the fp16 graph starts from
        self.fp32 = Path()

    @classmethod
    def load(
        cls, ckpt: Any, variants: Sequence[str], *, calibration: Calibration, heldout: Heldout, gate: float, threads: int,
    ) -> ImageExport:
        """Check the options that images take, then load the model, its processor and the images
        (``gate``: the label agreement int8-static's fp32 convolutions are chosen for)."""
        from finetune.checkpoint import load_model
        from runtime.pixels import load_processor

        if "fp16-tensorrt" in variants:
            raise DataError("--variants fp16-tensorrt: not available for image checkpoints in this version (fp16 is)")
        if calibration.source and not Path(calibration.source).is_dir():
            raise DataError(f"--calibration {calibration.source}: an image checkpoint calibrates on a <label>/<image> folder; no such directory")
        processor = load_processor(ckpt.path)
        model = load_model(ckpt).eval()
        labels = model_labels(ckpt, model)
        calib, validation = [], None
        if "int8-static" in variants:
            folder = Path(calibration.source) if calibration.source else ckpt.calibration
            if folder is None:
                raise DataError(f"{ckpt.path}: no calibration/ images for int8-static; pass --calibration DIR with training images")
            flag = "--calibration" if calibration.source else "calibration images"
            calib = calibration_feeds(folder, processor, calibration.samples, flag)
        pixels = heldout_pixels(ckpt.heldout, labels, processor, heldout.data, heldout.max_examples)
        if "int8-static" in variants and ckpt.validation is not None:
            validation = labelled_pixels(ckpt.validation, labels, processor, heldout.max_examples, "validation images")[0]
        return cls(ckpt, model, processor, labels=labels, heldout=pixels, calib=calib, validation=validation,
                   calibration=calibration, gate=gate, threads=threads)

    def graph(self, work: Path, fp32: Path, say: Callable[..., None]) -> Graph:
        t = time.perf_counter()
        say(f"exporting {self.ckpt.path} ({self.ckpt.model_type}) to ONNX with {EXPORTER}")
        self.raw, self.fp32 = work / "model.onnx", fp32
        torch_export(self.model, self.raw, self.height, self.width)
        opset, inputs, outputs = graph_info(self.raw)
        timings = {"export_s": time.perf_counter() - t}
        shutil.copy(self.raw, fp32)
        return Graph({"optimization": NO_OPTIMIZATION}, timings, opset, inputs, outputs)

    def makers(self) -> dict[str, Maker]:
        return {"int8": self.int8, "int8-static": self.int8_static, "fp16": self.fp16}

    def int8(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        # MatMul/Gemm only: ORT's dynamic ConvInteger is slow on CPU and loses a CNN's accuracy
        # (EfficientNet-Lite0 on MNIST: 71% agreement, held-out pass 17 s vs 2.5 s fp32); int8-static is the CNN int8.
        q = quantize.quantize_dynamic_int8(self.fp32, dst, isa, op_types=["MatMul", "Gemm"])
        q["note"] = "dynamic quantization of MatMul/Gemm only: a CNN's convolutions stay fp32"
        return {"optimization": NO_OPTIMIZATION, "quantization": q}

    def int8_static(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        q = static_int8(self.fp32, dst, work, self.calib, isa, method=self.calibration.method, validation=self.validation,
                        gate=self.gate, threads=self.threads)
        q["calibration"]["source"] = str(self.calibration.source or self.ckpt.calibration)
        q["fp32_kept"] = "normalization, activations, attention core, classifier head and the convolutions in fp32_convs"
        return {"optimization": NO_OPTIMIZATION, "quantization": q}

    def fp16(self, dst: Path, work: Path, isa: str) -> dict[str, Any]:
        return {"optimization": fp16_image_graph(self.raw, dst)}

    def save_files(self, staging: Path) -> None:
        from runtime.pixels import PROCESSOR_FILE

        self.model.config.to_json_file(str(staging / "config.json"))
        shutil.copy(self.ckpt.path / PROCESSOR_FILE, staging / PROCESSOR_FILE)

    def heldout_line(self) -> str:
        if self.heldout is None:
            return " (no held-out images)"
        return f" on {self.heldout[2]} ({len(self.heldout[1])} images)"

    def reference(self, inputs: list[str], batch_sizes: list[int], seq_lengths: list[int], seed: int,
                  progress: Progress | None) -> Reference:
        return build_image_reference(self.model, self.labels, self.heldout, self.height, self.width,
                                     batch_sizes=batch_sizes, seed=seed, progress=progress)

    def fields(self) -> dict[str, Any]:
        from runtime.pixels import PROCESSOR_FILE

        return {"image_size": {"height": self.height, "width": self.width}, "processor": PROCESSOR_FILE, "exporter": EXPORTER}
