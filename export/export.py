"""`ferry export`: a checkpoint becomes an artifact directory of ONNX variants, with a parity gate.

The steps are written once, for every task, after optimum-onnx's ``exporters/onnx/convert.py``
(each prints one numbered line); what differs between tasks is the task's part, a
:class:`export.base.TaskExport` chosen by the checkpoint's task (:mod:`export.text`,
:mod:`export.image`), or an ensemble's (:mod:`export.ensemble`):

1. check the options, the checkpoint and the output before any work (:func:`check_options`,
   :func:`open_part`: model type, weights, tokenizer, data);
2. export the fp32 graph (the part's :meth:`~export.base.TaskExport.graph`: optimum's exporter and
   ONNX Runtime's fusions for texts, ``torch.onnx.export`` for images);
3. make the variants (:func:`make_variants`; the part's makers, see :mod:`export.quantize`);
4. run the parity gate on every variant (:func:`gate`, see :mod:`export.parity`), measure batch
   invariance, choose the default variant for CPU and for GPU;
5. write ``ferry.json`` last (:func:`write_manifest`, see :mod:`export.writer`) and publish the
   directory atomically.

A variant that fails its gate is written and recorded as "fail" (never served), so the
failure can be inspected; when fp32 fails the export exits with status 1.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from export import ensemble, quantize
from export.base import Calibration, Graph, Heldout, TaskExport
from export.ensemble import COMBINE, EnsembleExport
from export.image import ImageExport
from export.parity import GateArgs, default_threads, progress_bar, run_parity, use_threads
from export.text import StaticOptions, TextExport
from export.writer import NEEDS, Steps, choose_defaults, manifest_common, quiet_libraries, summarize, variant_entry
from ferry.config import opt, positive, to_dict
from ferry.errors import ConfigError, FerryError
from ferry.files import MANIFEST, atomic_dir, check_output_dir, write_json
from ferry.tasks import IMAGE, TEXT, task_named
from runtime.artifact import FAIL, STAGE, VARIANT_FILES, VARIANTS, seal

CPU_LEVELS = ("O0", "O1", "O2", "O3")


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


def check_options(args: ExportArgs) -> list[str]:
    """The variants asked for (fp32 alone when none: the default set needs the checkpoint).

    Raises:
        ConfigError: every problem of the options at once.
    """
    problems = []
    if not args.output:
        problems.append("--output is required (the artifact directory to write)")
    variants = list(dict.fromkeys(args.variants)) or ["fp32"]
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
    problems += ensemble.option_problems(args.ensemble, args.combine, args.weights, variants)
    if problems:
        raise ConfigError(problems)
    return variants


def resolve_variants(args: ExportArgs, variants: list[str], ckpt: Any) -> list[str]:
    """``variants``, or without --variants the default set for ``ckpt`` on this machine."""
    if args.variants:
        return variants
    from runtime.engines import OPENVINO, engine_installed

    variants = default_variants(bool(args.calibration) or ckpt.calibration is not None, engine_installed(OPENVINO))
    if args.cpu_default and args.cpu_default not in variants:
        raise ConfigError([f"--cpu-default {args.cpu_default} is not among the default variants ({', '.join(variants)}); add --variants"])
    return variants


def shared_options(args: ExportArgs) -> dict[str, Any]:
    """The options every task's part takes, as plain values."""
    return {
        "calibration": Calibration(args.calibration, args.calibration_samples, args.calibration_method),
        "heldout": Heldout(args.data, args.parity_max_examples, args.text_column, args.label_column),
        "threads": args.threads or default_threads(),
    }


def open_text(args: ExportArgs, members: list[Any], variants: list[str]) -> TaskExport:
    """The part of a text checkpoint, or of an --ensemble of them, checked and loaded."""
    options = {
        **shared_options(args), "opset": args.opset, "optimization": args.optimization,
        "static": StaticOptions(args.int8_smooth, args.int8_select_agreement, args.int8_select_length),
    }
    if args.ensemble:
        return EnsembleExport.load_members(members, variants, combine=args.combine, weights=args.weights, **options)
    return TextExport.load(members[0], variants, **options)


def open_image(args: ExportArgs, members: list[Any], variants: list[str]) -> TaskExport:
    """The part of an image checkpoint, checked and loaded."""
    return ImageExport.load(members[0], variants, gate=args.int8_min_agreement, **shared_options(args))


# The part of each task: ExportArgs' options passed on as plain values.
PARTS = {TEXT: open_text, IMAGE: open_image}


def open_part(args: ExportArgs, members: list[Any], variants: list[str]) -> TaskExport:
    """The part of the checkpoints' task (an ensemble's members are text checkpoints), checked and loaded."""
    return PARTS[task_named(members[0].task)](args, members, variants)


def make_variants(part: TaskExport, variants: list[str], fp32: dict[str, Any], staging: Path, work: Path,
                  isa: str) -> dict[str, dict[str, Any]]:
    """The manifest entry of each variant, its graph made by the part (the OpenVINO variants read a
    graph made for ONNX Runtime)."""
    entries = {"fp32": fp32}
    makers = part.makers()
    for name in VARIANTS:  # in this order, a graph is made before a variant that needs it
        if name == "fp32" or name not in variants:
            continue
        if VARIANTS[name].engine == "openvino":
            entries[name] = {k: v for k, v in entries[NEEDS.get(name, "fp32")].items() if k != "external_data"}
        else:
            entries[name] = makers[name](staging / VARIANT_FILES[name], work, isa)
    return entries


def gate(part: TaskExport, paths: dict[str, Path], inputs: list[str], args: ExportArgs) -> dict[str, dict[str, Any]]:
    """The parity block of every variant, against the part's PyTorch reference computed once."""
    progress = None if args.quiet else progress_bar
    use_threads(args.threads)
    ref = part.reference(inputs, args.parity_batch_sizes, args.parity_seq_lengths, args.seed, progress)
    return run_parity(paths, ref, args.gates(), threads=args.threads, seed=args.seed, progress=progress)


def write_manifest(part: TaskExport, graph: Graph, variants: dict[str, dict[str, Any]], args: ExportArgs, isa: str,
                   staging: Path, timings: dict[str, float]) -> dict[str, Any]:
    """Write ``ferry.json`` (and the part's own files, e.g. ``reference.jsonl``), sealed: every file's sha256."""
    cpu_default = args.cpu_default
    if cpu_default and variants[cpu_default]["status"] == FAIL:
        print(f"warning: --cpu-default {cpu_default} failed its parity gate; no CPU default recorded", file=sys.stderr)
        cpu_default = None
    defaults = choose_defaults(variants, cpu_default)
    manifest = {
        "stage": STAGE,
        "source": part.source(),
        "task": part.task.name,
        "labels": part.labels,
        **part.fields(),
        "opset": graph.opset,
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        **part.write_after_parity(staging, timings),
    }
    settings = {**to_dict(args), "int8_isa_used": isa, "threads_used": args.threads or default_threads()}
    manifest.update(manifest_common(variants, defaults, forced_cpu=bool(args.cpu_default), settings=settings,
                                    timings=timings, versions=part.versions))
    manifest.update(part.extra(variants))
    manifest = seal(staging, manifest)  # every file's sha256 and the content hash the readers check
    write_json(staging / MANIFEST, manifest)
    return manifest


def export(args: ExportArgs) -> int:
    """Export ``args.checkpoint`` (or ``args.ensemble``) to an artifact directory; returns 1 when fp32 fails its gate."""
    from finetune.checkpoint import check_valid_checkpoint_dir

    started = time.perf_counter()
    variants = check_options(args)
    members = ensemble.check_members(args.ensemble) if args.ensemble else [check_valid_checkpoint_dir(args.checkpoint)]
    variants = resolve_variants(args, variants, members[0])
    output = Path(args.output)  # type: ignore[arg-type]
    sources = [m.path for m in members]
    check_writable(output)
    check_output_dir(output, args.overwrite, sources)
    quiet_libraries()
    part = open_part(args, members, variants)
    isa = quantize.detect_isa() if args.int8_isa == "auto" else args.int8_isa
    say = Steps(part.graph_steps + 2, args.quiet)

    with atomic_dir(output, args.overwrite, sources) as staging:
        work = staging / ".work"
        graph = part.graph(work, staging / VARIANT_FILES["fp32"], say)
        t = time.perf_counter()
        say(f"making variants: {', '.join(variants)} (int8 for {isa})")
        entries = make_variants(part, variants, graph.entry, staging, work, isa)
        timings = {**graph.timings, "variants_s": time.perf_counter() - t}
        part.save_files(staging)
        shutil.rmtree(work)

        t = time.perf_counter()
        say("parity with PyTorch" + part.heldout_line())
        order = [v for v in VARIANTS if v in variants]
        paths = {name: staging / VARIANT_FILES[name] for name in order}
        results = gate(part, paths, graph.inputs, args)
        timings["parity_s"] = time.perf_counter() - t
        manifest_variants = {name: variant_entry(name, paths[name], results[name], entries[name]) for name in order}
        manifest = write_manifest(part, graph, manifest_variants, args, isa, staging, timings)

    part.report(manifest)
    return summarize(manifest_variants, manifest["default_variant"], output, started)
