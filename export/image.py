"""`ferry export` and `ferry parity` for image-classification checkpoints.

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
from typing import Any, Sequence

import numpy as np

from export import quantize
from runtime.artifact import FAIL, STAGE, VARIANT_FILES, VARIANTS, seal
from export.parity import (
    HELDOUT_BATCH, INVARIANCE_TEXTS, Labelled, Reference, _progress, check_variant, default_threads, torch_logits,
)
from ferry.tasks import IMAGE_TASK
from ferry.errors import DataError, FerryError, first_line

TASK = IMAGE_TASK
INPUT = "pixel_values"
OPSET = 17
EXPORTER = f"torch.onnx.export (TorchScript), opset {OPSET}"


def image_size(processor: dict[str, Any]) -> tuple[int, int]:
    size = processor.get("size") or {}
    return int(size["height"]), int(size["width"])


def load_pixels(folder: Path, labels: Sequence[str], processor: dict[str, Any], max_examples: int, flag: str) -> tuple[np.ndarray, list[int]]:
    """Pixels and label ids of a ``<label>/<image>`` folder, through the shared preprocessing."""
    from finetune.images import read_image_folder
    from runtime.pixels import open_image, preprocess

    files, names = read_image_folder(folder, flag)
    known = {label: i for i, label in enumerate(labels)}
    unknown = sorted({y for y in names if y not in known})
    if unknown:
        raise DataError(f"{folder}: class folder '{unknown[0]}' is not one of the model's labels ({', '.join(labels)})")
    if max_examples and len(files) > max_examples:
        files, names = files[:max_examples], names[:max_examples]
    pixels = preprocess([open_image(f, str(f)) for f in files], processor)
    return pixels, [known[y] for y in names]


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
    model: Any, labels: Sequence[str], heldout: tuple[np.ndarray, list[int], str] | None, height: int, width: int,
    args: Any,
) -> Reference:
    """PyTorch's logits on random pixel batches and on the held-out images."""
    progress = None if args.quiet else _progress
    wrap = progress or (lambda it, desc: it)
    rng = np.random.default_rng(args.seed)
    # Random pixels in the normalized range (a standard normal covers what preprocess yields).
    cases = [{INPUT: rng.standard_normal((int(b), 3, height, width)).astype(np.float32)} for b in args.parity_batch_sizes]
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


def run_image_parity(
    paths: dict[str, Path], model: Any, labels: Sequence[str], heldout: tuple[np.ndarray, list[int], str] | None,
    height: int, width: int, args: Any, device: str = "auto",
) -> dict[str, dict[str, Any]]:
    """The parity block of each variant, PyTorch computed once (the text gates and checks)."""
    import torch

    torch.set_num_threads(args.threads or default_threads())
    model.eval()
    ref = build_image_reference(model, labels, heldout, height, width, args)
    progress = None if args.quiet else _progress
    return {name: check_variant(name, path, ref, args, device, None, progress) for name, path in paths.items()}


def heldout_pixels(ckpt: Any, labels: Sequence[str], processor: dict[str, Any], data: str | None, max_examples: int) -> tuple[np.ndarray, list[int], str] | None:
    """The labelled images parity measures accuracy on: ``--data DIR`` or the checkpoint's ``heldout/``."""
    folder, flag = (Path(data), "--data") if data else (ckpt.heldout, "held-out images")
    if folder is None:
        return None
    pixels, ids = load_pixels(folder, labels, processor, max_examples, flag)
    return pixels, ids, str(folder)


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


def static_int8(fp32: Path, dst: Path, work: Path, calib: list[dict[str, np.ndarray]], isa: str, args: Any,
                validation: np.ndarray | None) -> dict[str, Any]:
    """int8-static (QDQ, Conv and MatMul) of an image graph, choosing on ``validation`` pixels
    (never on the held-out images parity judges) which leading convolutions stay fp32."""
    import onnx

    from runtime.engines import create_session

    convs = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.op_type == "Conv"]

    def path(k: int) -> Path:
        return work / f"int8s-fp32convs{k}.onnx"

    quantized: dict[int, dict[str, Any]] = {}

    def quantize_keeping(k: int) -> None:
        quantized[k] = quantize.quantize_static_int8(fp32, path(k), calib, isa, args.calibration_method, conv=True, keep_fp32=convs[:k])

    if validation is None:
        k, selection = 0, {"on": None, "note": "no validation images: every Conv quantized"}
        quantize_keeping(0)
    else:
        threads = args.threads or default_threads()

        def predict(model_path: Path) -> np.ndarray:
            session = create_session(model_path, "cpu", threads)
            return np.concatenate([session.run(["logits"], {INPUT: validation[i : i + HELDOUT_BATCH]})[0].argmax(-1)
                                   for i in range(0, len(validation), HELDOUT_BATCH)])

        reference = predict(fp32)
        k, tried = choose_fp32_convs(quantize_keeping, lambda k: float((predict(path(k)) == reference).mean()), convs,
                                     args.int8_min_agreement)
        selection = {"on": f"validation/ ({len(validation)} images)", "gate": args.int8_min_agreement, "tried": tried}
    shutil.move(str(path(k)), str(dst))
    return {**quantized[k], "fp32_convs": convs[:k], "fp32_convs_selection": selection}


def export_image(args: Any, ckpt: Any, output: Path, variants: list[str]) -> int:
    """`ferry export` of an image checkpoint (options already checked by :func:`export.export.export`)."""
    from export.writer import NEEDS, choose_defaults, graph_info, manifest_common, quiet_libraries, step, summarize, variant_entry
    from finetune.checkpoint import load_model
    from runtime.pixels import PROCESSOR_FILE, load_processor
    from ferry.files import MANIFEST, atomic_dir, write_json

    started = time.perf_counter()
    if "fp16-tensorrt" in variants:
        raise DataError("--variants fp16-tensorrt: not available for image checkpoints in this version (fp16 is)")
    if args.calibration and not Path(args.calibration).is_dir():
        raise DataError(f"--calibration {args.calibration}: an image checkpoint calibrates on a <label>/<image> folder; no such directory")
    processor = load_processor(ckpt.path)
    height, width = image_size(processor)
    quiet_libraries()
    model = load_model(ckpt)
    model.eval()
    labels = ckpt.labels or [str(i) for i in range(int(model.config.num_labels))]
    calib = None
    if "int8-static" in variants:
        folder = Path(args.calibration) if args.calibration else ckpt.calibration
        if folder is None:
            raise DataError(f"{ckpt.path}: no calibration/ images for int8-static; pass --calibration DIR with training images")
        from finetune.images import read_image_folder
        from runtime.pixels import open_image, preprocess

        files, _ = read_image_folder(folder, "--calibration" if args.calibration else "calibration images")
        files = files[: args.calibration_samples]
        calib = [{"pixel_values": preprocess([open_image(f, str(f))], processor)} for f in files]
    heldout = heldout_pixels(ckpt, labels, processor, args.data, args.parity_max_examples)
    validation = None
    if "int8-static" in variants and ckpt.validation is not None:
        validation = load_pixels(ckpt.validation, labels, processor, args.parity_max_examples, "validation images")[0]
    isa = quantize.detect_isa() if args.int8_isa == "auto" else args.int8_isa

    with atomic_dir(output, args.overwrite, [ckpt.path]) as staging:
        work = staging / ".work"
        t = time.perf_counter()
        step(args, f"[1/3] exporting {ckpt.path} ({ckpt.model_type}) to ONNX with {EXPORTER}")
        raw = work / "model.onnx"
        torch_export(model, raw, height, width)
        opset, inputs, outputs = graph_info(raw)
        timings = {"export_s": time.perf_counter() - t}
        fp32 = staging / VARIANT_FILES["fp32"]
        shutil.copy(raw, fp32)
        none = {"level": "O0", "fusions": False, "note": "ONNX Runtime optimizes the graph when it loads it"}
        entries: dict[str, dict[str, Any]] = {"fp32": {"optimization": none}}

        t = time.perf_counter()
        step(args, f"[2/3] making variants: {', '.join(variants)} (int8 for {isa})")
        if "int8" in variants:
            # MatMul/Gemm only: ORT's dynamic ConvInteger is slow on CPU and loses a CNN's accuracy
            # (EfficientNet-Lite0 on MNIST: 71% agreement, held-out pass 17 s vs 2.5 s fp32); int8-static is the CNN int8.
            q = quantize.quantize_dynamic_int8(fp32, staging / VARIANT_FILES["int8"], isa, op_types=["MatMul", "Gemm"])
            q["note"] = "dynamic quantization of MatMul/Gemm only: a CNN's convolutions stay fp32"
            entries["int8"] = {"optimization": none, "quantization": q}
        if "int8-static" in variants:
            assert calib is not None
            q = static_int8(fp32, staging / VARIANT_FILES["int8-static"], work, calib, isa, args, validation)
            q["calibration"]["source"] = str(args.calibration or ckpt.calibration)
            q["fp32_kept"] = "normalization, activations, attention core, classifier head and the convolutions in fp32_convs"
            entries["int8-static"] = {"optimization": none, "quantization": q}
        if "fp16" in variants:
            entries["fp16"] = {"optimization": fp16_image_graph(raw, staging / VARIANT_FILES["fp16"])}
        for name in variants:  # the OpenVINO variants read a graph made above
            if VARIANTS[name].engine == "openvino":
                entries[name] = entries[NEEDS.get(name, "fp32")]
        timings["variants_s"] = time.perf_counter() - t
        model.config.to_json_file(str(staging / "config.json"))
        shutil.copy(ckpt.path / PROCESSOR_FILE, staging / PROCESSOR_FILE)
        shutil.rmtree(work)

        t = time.perf_counter()
        source = f" on {heldout[2]} ({len(heldout[1])} images)" if heldout else " (no held-out images)"
        step(args, "[3/3] parity with PyTorch" + source)
        order = [v for v in VARIANTS if v in variants]
        paths = {name: staging / VARIANT_FILES[name] for name in order}
        results = run_image_parity(paths, model, labels, heldout, height, width, args)
        timings["parity_s"] = time.perf_counter() - t
        manifest_variants = {name: variant_entry(name, paths[name], results[name], entries[name]) for name in order}
        forced = args.cpu_default if args.cpu_default and manifest_variants[args.cpu_default]["status"] != FAIL else None
        defaults = choose_defaults(manifest_variants, forced)
        manifest = {
            "stage": STAGE,
            "source": {"checkpoint": str(ckpt.path.resolve()), "manifest_sha256": ckpt.manifest_sha256, "model_type": ckpt.model_type},
            "task": TASK,
            "labels": labels,
            "image_size": {"height": height, "width": width},
            "processor": PROCESSOR_FILE,
            "exporter": EXPORTER,
            "opset": opset,
            "inputs": inputs,
            "outputs": outputs,
            **manifest_common(args, manifest_variants, defaults, isa, timings, ("torch", "onnx", "onnxruntime", "numpy", "pillow")),
        }
        manifest = seal(staging, manifest)  # every file's sha256 and the content hash the readers check
        write_json(staging / MANIFEST, manifest)

    return summarize(manifest_variants, defaults, output, started)


def parity_image(args: Any, artifact: Any, ckpt: Any, model: Any) -> dict[str, dict[str, Any]]:
    """`ferry parity` of an image artifact: the results per checked variant."""
    from runtime.pixels import load_processor

    processor = load_processor(artifact.path)
    height, width = image_size(processor)
    names = artifact.select(args.variants)
    heldout = heldout_pixels(ckpt, artifact.labels, processor, args.data, args.parity_max_examples)
    paths = {n: artifact.variants[n].path for n in names}
    return run_image_parity(paths, model, artifact.labels, heldout, height, width, args, args.device)
