"""`ferry export`: a checkpoint becomes an artifact directory of ONNX variants, with a parity gate.

Steps, in order (each prints one line):

1. check the checkpoint (model type, weights, tokenizer) before any work;
2. export to ONNX with optimum's exporter (dynamic batch and sequence axes, the
   architecture's own inputs, external data above 2 GB);
3. optimize the graph with ONNX Runtime's transformer fusions through optimum's
   ORTOptimizer (O1-O3 for the CPU variants; the fp16 variant gets the GPU fusions with
   exact GELU, then float16, see :func:`fp16_graph`);
4. make the variants (see :mod:`export.quantize`);
5. run the parity gate on every variant (see :mod:`export.parity`), measure batch
   invariance, choose the default variant for CPU and for GPU;
6. write ``ferry.json`` last and publish the directory atomically.

A variant that fails its gate is written and recorded as "fail" (never served), so the
failure can be inspected; when fp32 fails the export exits with status 1.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from export import ensemble, quantize
from export.ensemble import COMBINE
from runtime.artifact import FAIL, STAGE, VARIANT_FILES, VARIANTS, seal
from export.parity import GateArgs, default_threads, load_labelled_data, pytorch_accuracy, run_parity, usable_length
from export.writer import NEEDS, choose_defaults, graph_info, manifest_common, quiet_libraries, step, summarize, variant_entry
from ferry.tasks import IMAGE_TASK, TEXT_TASK
from ferry.config import opt, positive
from ferry.errors import CheckpointError, ConfigError, DataError, FerryError, first_line
from ferry.files import MANIFEST, atomic_dir, check_output_dir, sha256_file, write_json

TASK = TEXT_TASK
CPU_LEVELS = ("O0", "O1", "O2", "O3")
VERSIONS = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime", "openvino", "numpy")
# Held-out texts whose PyTorch logits the artifact keeps, so `ferry serve` can re-check a
# variant on the machine it runs on (kernels differ between CPUs), at this many tokens.
REFERENCE_TEXTS = 256
REFERENCE_TOKENS = 128
REFERENCE_FILE = "reference.jsonl"


@dataclasses.dataclass
class ExportArgs(GateArgs):
    """Options of `ferry export`."""

    checkpoint: str | None = opt(None, "checkpoint directory written by ferry finetune (or any HF sequence-classification directory)", positional=True, required=False)
    ensemble: list[str] = opt([], "instead of CHECKPOINT: two or more checkpoints (one shared tokenizer, the same labels) exported as one ensemble graph", many=True)
    combine: str = opt("mean", "how an --ensemble combines its members' probabilities: mean, weighted (by --weights), vote (most votes; mean probability breaks ties)", choices=COMBINE)
    weights: list[float] = opt([], "with --combine weighted: one positive weight per --ensemble member (normalized)")
    output: str | None = opt(None, "artifact directory to write", short="-o")
    overwrite: bool = opt(False, "replace an existing --output")
    variants: list[str] = opt([], "variants to write, each a graph file run by one engine at one precision (fp32 is always one): fp32, int8 (dynamic), int8-static, fp16 (CUDA) and fp16-tensorrt (CUDA, TensorRT provider) in ONNX Runtime; openvino-fp32, openvino-bf16 (CPUs with AVX512-BF16 or AMX), openvino-int8-static (int8-static's graph) in OpenVINO (default: fp32, int8-static when there are calibration texts, openvino-fp32 and openvino-bf16 when openvino is installed)", choices=tuple(VARIANTS))
    opset: int | None = opt(None, "ONNX opset (default: optimum's for the architecture)", check=positive)
    optimization: str = opt("O2", "ONNX Runtime graph optimization of the CPU variants: O0 none, O1 basic, O2 transformer fusions, O3 O2 with approximate GELU", choices=CPU_LEVELS)
    int8_isa: str = opt("auto", "instruction set the int8 variants are tuned for (auto: this CPU's)", choices=("auto", *quantize.ISAS))
    calibration: str | None = opt(None, "texts to calibrate int8-static on (default: the checkpoint's calibration.jsonl)")
    calibration_samples: int = opt(256, "calibration texts used by int8-static", check=positive)
    calibration_method: str = opt("minmax", "how int8-static sets activation ranges", choices=("minmax", "percentile", "entropy"))
    int8_smooth: float = opt(0.75, "int8-static of a text model: SmoothQuant strength alpha, moving activation outliers into the weight scales (0: off)", check=lambda v: None if 0 <= v <= 1 else "must be between 0 and 1")
    int8_select_agreement: float = opt(0.995, "int8-static of a text model: validation label agreement (also at twice the error) that its fp32 fallback aims for; 0: no fallback", check=lambda v: None if 0 <= v <= 1 else "must be between 0 and 1")
    int8_select_length: int = opt(128, "int8-static of a text model: tokens per validation text when choosing the fp32 fallback (held-out parity still runs at the full length)", check=positive)
    text_column: str = opt("text", "text column of --calibration and --data")
    label_column: str = opt("label", "label column of --data")
    data: str | None = opt(None, "labelled data for the parity gate (default: the checkpoint's heldout.jsonl)")
    cpu_default: str | None = opt(None, "force the default CPU variant (e.g. int8, which is not batch-invariant)", choices=tuple(VARIANTS))


def default_variants(calibration: bool, openvino: bool) -> list[str]:
    """The variants made when --variants is not given: the batch-invariant candidates for serving
    on a CPU (ferry serve times the ones that pass and serves the fastest)."""
    names = ["fp32"]
    if calibration:
        names.append("int8-static")
    if openvino:
        names += ["openvino-fp32", "openvino-bf16"]
    return names


def supported_model_types() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(TASK, exporter="onnx"))


def fusable_model_types() -> set[str]:
    from optimum.onnxruntime.utils import ORTConfigManager

    return set(ORTConfigManager._conf)


def check_model_type(ckpt: Any) -> None:
    supported = supported_model_types()
    if ckpt.model_type not in supported:
        raise CheckpointError(
            f"{ckpt.path}: model type '{ckpt.model_type}' is not supported by the ONNX exporter for {TASK}; "
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


def check_writable(output: Path) -> None:
    """An unwritable --output fails before any work, with the reason."""
    parent = output.resolve().parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FerryError(f"--output {output}: {blocker} is a file, not a directory; choose another --output")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{output.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FerryError(f"--output {output}: cannot write in {parent} ({e.strerror or e}); choose a writable directory") from None


def calibration_texts(args: ExportArgs, ckpt: Any) -> list[str]:
    from export.inputs import read_jsonl_texts, read_texts

    if args.calibration:
        texts = read_texts(args.calibration, args.text_column, "--calibration")
    elif ckpt.calibration is not None:
        texts, _ = read_jsonl_texts(ckpt.calibration)
    elif ckpt.heldout is not None:
        raise DataError(
            f"{ckpt.path}: no calibration.jsonl for int8-static (the held-out split is not used: it measures accuracy); "
            "pass --calibration FILE with training texts"
        )
    else:
        raise DataError(f"{ckpt.path}: no calibration.jsonl for int8-static; pass --calibration FILE with training texts")
    return texts[: args.calibration_samples]


def onnx_export(ckpt: Any, work: Path, opset: int | None) -> Path:
    """optimum's exporter on the checkpoint directory: ``work/model.onnx`` and its config."""
    from optimum.exporters.onnx import main_export

    try:
        main_export(
            str(ckpt.path), work, task=TASK, opset=opset, do_validation=False, library_name="transformers",
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


def write_reference(path: Path, model: Any, tokenizer: Any, labelled: Any, tokens: int, input_names: Sequence[str]) -> dict[str, Any]:
    """PyTorch's logits on up to :data:`REFERENCE_TEXTS` held-out texts cut at ``tokens``, with
    their token ids, written as JSON lines; `ferry serve` re-checks variants against them."""
    from export.parity import text_batches, torch_logits

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


def export(args: ExportArgs) -> int:
    """Export ``args.checkpoint`` to an artifact directory; returns 1 when fp32 fails its gate."""
    from finetune.checkpoint import check_valid_checkpoint_dir, load_model, load_tokenizer

    started = time.perf_counter()
    problems = []
    if not args.output:
        problems.append("--output is required (the artifact directory to write)")
    variants = list(dict.fromkeys(args.variants)) or ["fp32"]  # (the default set is resolved once the checkpoint is read)
    if "fp32" not in variants:
        problems.append("--variants must include fp32: it is the reference every other variant is made from")
    if args.cpu_default and args.variants and args.cpu_default not in variants:
        problems.append(f"--cpu-default {args.cpu_default} is not among --variants ({', '.join(variants)})")
    if args.cpu_default and VARIANTS[args.cpu_default].device == "cuda":
        problems.append(f"--cpu-default {args.cpu_default}: it runs on CUDA only")
    for name, needed in NEEDS.items():
        if name in variants and needed not in variants:
            problems.append(f"--variants {name} runs {needed}'s graph: add {needed} to --variants")
    if bool(args.checkpoint) == bool(args.ensemble):
        problems.append("give CHECKPOINT, or --ensemble CKPT_A CKPT_B ... for an ensemble (not both)")
    if args.ensemble and any(VARIANTS[v].device == "cuda" for v in variants):
        problems.append("--variants fp16, fp16-tensorrt: not available for an --ensemble in this version")
    if not args.ensemble and (args.weights or args.combine != "mean"):
        problems.append("--combine and --weights apply to an --ensemble only")
    if problems:
        raise ConfigError(problems)
    output = Path(args.output)  # type: ignore[arg-type]

    # 1. Check everything before any work.
    if args.ensemble:
        weights = ensemble.weights_for(args.combine, args.weights, len(args.ensemble))
        members = ensemble.check_members(args.ensemble)
    else:
        members = [check_valid_checkpoint_dir(args.checkpoint)]
    ckpt = members[0]
    sources = [m.path for m in members]
    if not args.variants:
        from runtime.engines import OPENVINO, engine_installed

        variants = default_variants(bool(args.calibration) or ckpt.calibration is not None, engine_installed(OPENVINO))
        if args.cpu_default and args.cpu_default not in variants:
            raise ConfigError([f"--cpu-default {args.cpu_default} is not among the default variants ({', '.join(variants)}); add --variants"])
    if not args.ensemble and ckpt.task == IMAGE_TASK:
        from export.image import export_image

        check_writable(output)
        check_output_dir(output, args.overwrite, sources)
        return export_image(args, ckpt, output, variants)
    for m in members:
        check_model_type(m)
    check_writable(output)
    check_output_dir(output, args.overwrite, sources)
    quiet_libraries()
    tokenizer = load_tokenizer(ckpt.path)
    check_tokenizer(ckpt, tokenizer)
    models = [load_model(m).eval() for m in members]
    model = ensemble.torch_ensemble(models, weights, args.combine) if args.ensemble else models[0]
    labels = ckpt.labels or [str(i) for i in range(int(model.config.num_labels))]
    max_length = min(
        usable_length(x.config, m.max_length if m.manifest else min(512, tokenizer.model_max_length or 512))
        for m, x in zip(members, models)
    )
    calib = calibration_texts(args, ckpt) if "int8-static" in variants else []
    heldout = ensemble.heldout_of(members, args.data) if args.ensemble else ckpt.heldout
    labelled = load_labelled_data(labels, heldout, args.data, args.text_column, args.label_column, args.parity_max_examples)
    isa = quantize.detect_isa() if args.int8_isa == "auto" else args.int8_isa

    with atomic_dir(output, args.overwrite, sources) as staging:
        work = staging / ".work"
        # 2. ONNX export, 3. graph optimization (each member's, then one ensemble graph).
        t = time.perf_counter()
        timings = {}
        if args.ensemble:
            member_opt = []
            export_s = 0.0
            for i, m in enumerate(members):
                step(args, f"[1/4] exporting member {i + 1}/{len(members)} {m.path} ({m.model_type}) to ONNX and optimizing it ({args.optimization})")
                t_member = time.perf_counter()
                onnx_export(m, work / f"m{i}" / "raw", args.opset)
                export_s += time.perf_counter() - t_member
                member_opt.append(optimize(work / f"m{i}" / "raw", work / f"m{i}" / "opt", args.optimization, m.model_type))
            timings["export_s"] = export_s
            t += export_s  # optimize_s: the members' optimization and the composition
            step(args, f"[2/4] composing the ensemble graph ({args.combine})")
            graph = ensemble.compose([work / f"m{i}" / "opt" / "model.onnx" for i in range(len(members))], work / "opt" / "model.onnx", args.combine, weights, len(labels))
            raw_dir = work / "m0" / "raw"
            opt_info = {"level": args.optimization, "members": member_opt, "ensemble": graph}
            opset, inputs, outputs = graph_info(work / "opt" / "model.onnx")
        else:
            step(args, f"[1/4] exporting {ckpt.path} ({ckpt.model_type}) to ONNX")
            raw_dir = work / "raw"
            opset, inputs, outputs = graph_info(onnx_export(ckpt, raw_dir, args.opset))
            timings["export_s"] = time.perf_counter() - t
            t = time.perf_counter()
            step(args, f"[2/4] optimizing the graph ({args.optimization})")
            opt_info = optimize(raw_dir, work / "opt", args.optimization, ckpt.model_type)
        entries: dict[str, dict[str, Any]] = {}
        fp32 = staging / VARIANT_FILES["fp32"]
        extra = place(work / "opt" / "model.onnx", fp32)
        entries["fp32"] = {"optimization": opt_info, **extra}
        timings["optimize_s"] = time.perf_counter() - t

        # 4. Variants.
        t = time.perf_counter()
        step(args, f"[3/4] making variants: {', '.join(variants)} (int8 for {isa})")
        if "int8" in variants:
            dst = staging / VARIANT_FILES["int8"]
            entries["int8"] = {"optimization": opt_info, "quantization": quantize.quantize_dynamic_int8(fp32, work / "int8.onnx", isa)}
            entries["int8"].update(place(work / "int8.onnx", dst))
        if "int8-static" in variants:
            from export.inputs import collate, encode

            ids = encode(tokenizer, calib, max_length)
            feeds = [collate([x], tokenizer.pad_token_id or 0, inputs) for x in ids]
            dst = staging / VARIANT_FILES["int8-static"]
            base, static_opt = fp32, opt_info
            if not args.ensemble and args.optimization in ("O2", "O3") and ckpt.model_type in fusable_model_types():
                static_opt = optimize(work / "raw", work / "opt-mha", args.optimization, ckpt.model_type, split_qkv=True)
                base = work / "opt-mha" / "model.onnx"
            quantizer = quantize.StaticQuantizer(base, work / "int8s", feeds, isa, args.calibration_method, smooth=args.int8_smooth)
            if not args.ensemble and ckpt.validation is not None:
                from export import fallback
                from export.inputs import read_jsonl_texts

                q = fallback.select_fp32_matmuls(
                    quantizer, base, work / "int8s.onnx", work / "int8s", model, tokenizer, read_jsonl_texts(ckpt.validation)[0],
                    min(max_length, args.int8_select_length), inputs, args.int8_select_agreement, args.threads or default_threads(),
                    str(ckpt.validation),
                )
                print(fallback.summary(q), flush=True)
            else:
                q = quantizer.quantize(work / "int8s.onnx")
                q["fp32_matmuls"] = []
                why = "an ensemble" if args.ensemble else f"{ckpt.path} has no validation.jsonl"
                q["fp32_matmuls_selection"] = {"on": None, "note": f"{why}: every linear MatMul quantized"}
            q["calibration"]["source"] = str(args.calibration or ckpt.calibration)
            entries["int8-static"] = {"optimization": static_opt, "quantization": q, **place(work / "int8s.onnx", dst)}
        if "fp16" in variants:
            fp16_info = fp16_graph(work / "raw", work / "fp16", ckpt.model_type)
            entries["fp16"] = {"optimization": fp16_info, **place(work / "fp16" / "model.onnx", staging / VARIANT_FILES["fp16"])}
        if "fp16-tensorrt" in variants:
            # TensorRT builds its own fused fp16 engine from plain ONNX ops; ORT's contrib
            # fusions (Attention, SkipLayerNormalization) would fall back to the CUDA provider.
            plain = {"level": "none (TensorRT fuses and casts to fp16 itself: trt_fp16_enable)", "fusions": False}
            entries["fp16-tensorrt"] = {"optimization": plain, **place(work / "raw" / "model.onnx", staging / VARIANT_FILES["fp16-tensorrt"])}
        for name in variants:  # the OpenVINO variants read a graph made above
            if VARIANTS[name].engine == "openvino":
                base = NEEDS.get(name, "fp32")
                entries[name] = {k: v for k, v in entries[base].items() if k != "external_data"}
        timings["variants_s"] = time.perf_counter() - t

        shutil.copy(raw_dir / "config.json", staging / "config.json")
        tokenizer.save_pretrained(staging)
        shutil.rmtree(work)

        # 5. Parity.
        t = time.perf_counter()
        step(args, "[4/4] parity with PyTorch" + (f" on {labelled.source} ({len(labelled.texts)} texts)" if labelled else " (no labelled data)"))
        order = [v for v in VARIANTS if v in variants]
        paths = {name: staging / VARIANT_FILES[name] for name in order}
        heldout_logits, accuracies = None, [None] * len(members)
        if args.ensemble and labelled:
            import torch

            from export.parity import _progress

            torch.set_num_threads(args.threads or default_threads())
            # the members run once: the reference's held-out logits and each member's accuracy
            heldout_logits, accuracies = ensemble.heldout_pass(
                model, tokenizer, labelled, max_length, inputs, None if args.quiet else _progress
            )
        results = run_parity(paths, model, tokenizer, labels, labelled, max_length, inputs, args, heldout_logits=heldout_logits)
        timings["parity_s"] = time.perf_counter() - t
        reference = None
        if labelled is not None:
            t = time.perf_counter()
            reference = write_reference(staging / REFERENCE_FILE, model, tokenizer, labelled, min(max_length, REFERENCE_TOKENS), inputs)
            timings["reference_s"] = time.perf_counter() - t

        manifest_variants = {name: variant_entry(name, paths[name], results[name], entries[name]) for name in order}
        if args.cpu_default and manifest_variants[args.cpu_default]["status"] == FAIL:
            print(f"warning: --cpu-default {args.cpu_default} failed its parity gate; no CPU default recorded", file=sys.stderr)
        defaults = choose_defaults(manifest_variants, args.cpu_default if args.cpu_default and manifest_variants[args.cpu_default]["status"] != FAIL else None)
        manifest = {
            "stage": STAGE,
            "source": {
                "checkpoint": None if args.ensemble else str(ckpt.path.resolve()),
                "manifest_sha256": ckpt.manifest_sha256,
                "model_type": ckpt.model_type,
            },
            "task": TASK,
            "labels": labels,
            "max_length": max_length,
            "opset": opset,
            "inputs": inputs,
            "outputs": outputs,
            "reference": reference,
            **manifest_common(args, manifest_variants, defaults, isa, timings, VERSIONS),
        }
        if args.ensemble:
            manifest["source"] = {"ensemble": [str(m.path.resolve()) for m in members], "model_type": ckpt.model_type}
            manifest["ensemble"] = {
                "combine": args.combine,
                "members": [
                    {"checkpoint": str(m.path.resolve()), "manifest_sha256": m.manifest_sha256, "model_type": m.model_type,
                     "weight": w, "heldout_accuracy": acc}
                    for m, w, acc in zip(members, weights, accuracies)
                ],
                "heldout_accuracy": pytorch_accuracy(manifest_variants),
                "heldout_source": labelled.source if labelled else None,
            }
        manifest = seal(staging, manifest)  # every file's sha256 and the content hash the readers check
        write_json(staging / MANIFEST, manifest)

    if args.ensemble:
        for i, m in enumerate(manifest["ensemble"]["members"], 1):
            acc = m["heldout_accuracy"]
            print(f"member {i} {m['checkpoint']}: weight {m['weight']:.3f}, PyTorch accuracy " + ("-" if acc is None else f"{acc:.4f}"))
    return summarize(manifest_variants, defaults, output, started)


