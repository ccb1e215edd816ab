"""`ferry pipeline --config FILE`: finetune -> export (with its parity gate) -> bench, one summary.

One YAML file drives every stage: top-level keys are the pipeline's own options, and the
sections ``finetune:``, ``export:`` and ``bench:`` hold the options of those verbs, with
the same names and checks as on their command lines (unknown keys are errors, all of
them reported at once)::

    output: runs/pipeline-bbc      # checkpoint/, artifact/ and bench/ go inside
    finetune: {epochs: 2, ...}     # ferry finetune's options, minus output/overwrite
    export: {variants: [fp32, int8, int8-static]}
    bench: {batch_sizes: [1, 32], seq_lengths: [128]}

The parity step is the gate `ferry export` runs on every variant (PyTorch is loaded once);
the summary table puts each variant's accuracy, Δ, size and speedup side by side.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from ferry.config import opt, parse
from ferry.errors import ConfigError
from ferry.files import write_json
from ferry.tables import fmt, markdown_table, text_table
from ferry.tasks import task_named

SUMMARY_CELL = (32, 128)  # the batch x sequence length the summary reports speedups at, when benchmarked
# Options each stage gets from the pipeline, not from its section.
OWNED = {
    "finetune": ("output", "overwrite", "resume"),
    "export": ("checkpoint", "output", "overwrite"),
    "bench": ("artifact", "output", "overwrite", "compare"),
}


def _section_check(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a mapping of option: value (set it in the --config file)"


@dataclasses.dataclass
class PipelineArgs:
    """Options of `ferry pipeline`."""

    output: str = opt("runs/pipeline", "root directory: checkpoint/, artifact/ and bench/ are written inside", short="-o")
    overwrite: bool = opt(False, "replace the stages' existing outputs")
    checkpoint: str | None = opt(None, "use this checkpoint and skip fine-tuning")
    skip_bench: bool = opt(False, "stop after export and parity")
    finetune: dict[str, Any] = opt({}, "ferry finetune's options (a mapping in the --config file)", check=_section_check)
    export: dict[str, Any] = opt({}, "ferry export's options (a mapping in the --config file)", check=_section_check)
    bench: dict[str, Any] = opt({}, "ferry bench's options (a mapping in the --config file)", check=_section_check)


def _flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None:
        return "none"
    return str(value)


def stage_args(cls: type, section: str, values: dict[str, Any], fixed: dict[str, Any]) -> Any:
    """``cls`` (a verb's options) from a config section plus the values the pipeline sets.

    The section goes through the verb's own parser, so its checks and messages apply.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    usable = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in OWNED[section]:
            problems.append(f"'{section}.{key}' is set by the pipeline; set 'output'/'overwrite' at the top level")
        elif name not in fields:
            problems.append(f"unknown key '{section}.{key}' (valid keys: {', '.join(sorted(set(fields) - set(OWNED[section])))})")
        else:
            usable[name] = value
    argv: list[str] = []
    for key, value in {**usable, **fixed}.items():
        f = fields[key]
        if f.metadata.get("positional"):
            argv.append(_flag_value(value))
        elif isinstance(value, bool):
            argv.append(("--" if value else "--no-") + key.replace("_", "-"))
        elif isinstance(value, dict):
            raise ConfigError(f"'{section}.{key}' must be a single value or a list, not a mapping")
        else:
            argv += ["--" + key.replace("_", "-"), _flag_value(value)]
    try:
        args = parse(cls, argv, prog=f"ferry pipeline ({section})", description="")
    except ConfigError as e:
        raise ConfigError(problems + [f"section '{section}': {p}" for p in e.problems]) from None
    except SystemExit:  # argparse refused a value it could not read
        raise ConfigError(problems + [f"section '{section}': invalid values {values}"]) from None
    if problems:
        raise ConfigError(problems)
    return args


def summary_rows(artifact_manifest: dict[str, Any], bench_report: dict[str, Any] | None, served: str | None = None) -> tuple[list[str], list[list[str]], str]:
    """The summary table; ``served`` is the variant `ferry serve` chose on this CPU (else the export's default)."""
    cell = None
    speed: dict[str, float] = {}
    baseline = "PyTorch eager fp32"
    if bench_report:
        cpu = [r for r in bench_report["results"] if r["device"] == "cpu" and r.get("speedup")]
        cells = {(r["batch_size"], r["seq_length"]) for r in cpu}
        if SUMMARY_CELL in cells:
            cell = SUMMARY_CELL
        elif cells:
            cell = max(cells, key=lambda c: (c[0], c[1] if isinstance(c[1], int) else 0))
        for r in cpu:
            if (r["batch_size"], r["seq_length"]) == cell:
                speed[r["variant"] or "pytorch"] = r["speedup"]
                baseline = r.get("baseline") or baseline
    defaults = dict(artifact_manifest.get("default_variant") or {})
    if served:
        defaults["cpu"] = served
    rows = []
    for name, v in artifact_manifest["variants"].items():
        held = (v.get("parity") or {}).get("heldout") or {}
        marks = [dev for dev in ("cpu", "gpu") if defaults.get(dev) == name]
        rows.append([
            name, v["status"], fmt(held.get("onnx", {}).get("accuracy"), ".4f"), fmt(held.get("delta_accuracy_points"), "+.2f"),
            fmt(held.get("agreement"), ".2%"), f"{v['bytes'] / 1e6:.1f}", fmt(speed.get(name), ".2f", "-") + ("x" if name in speed else ""),
            {True: "yes", False: "no", None: "-"}[v.get("batch_invariant")], ",".join(marks) or "-",
        ])
    size = "image" if task_named(artifact_manifest.get("task")).image else "seq"
    where = f"speedup over the fastest PyTorch path ({baseline}) on CPU at batch {cell[0]} x {size} {cell[1]}" if cell else "no CPU bench"
    headers = ["variant", "status", "accuracy", "Δacc pts", "agreement", "MB", "speedup", "batch-invariant", "default for"]
    return headers, rows, where


def served_here(artifact: Path) -> Any:
    """The start-up choice `ferry serve` makes on this CPU (timed and re-checked here), for the summary."""
    from runtime.predictor import Runtime

    return Runtime(artifact, device="cpu").choice


def stage_options(args: PipelineArgs, ckpt_dir: Path, art_dir: Path, bench_dir: Path) -> dict[str, Any]:
    """Each stage's options, from its section and the directories the pipeline sets.

    Every section is checked before any stage runs (a typo in bench: must not cost a
    fine-tuning run), and all their problems are reported at once.
    """
    from bench.offline import BenchArgs
    from export.export import ExportArgs

    problems: list[str] = []
    built: dict[str, Any] = {}
    specs: list[tuple[str, Any, dict[str, Any]]] = [
        ("export", ExportArgs, {"checkpoint": str(args.checkpoint or ckpt_dir), "output": str(art_dir), "overwrite": args.overwrite}),
        ("bench", BenchArgs, {"artifact": str(art_dir), "output": str(bench_dir), "overwrite": args.overwrite}),
    ]
    if not args.checkpoint:
        from finetune.train import FinetuneArgs

        specs.insert(0, ("finetune", FinetuneArgs, {"output": str(ckpt_dir), "overwrite": args.overwrite}))
    elif args.finetune:
        print(f"note: --checkpoint {args.checkpoint}: fine-tuning skipped, the 'finetune' section is not used", file=sys.stderr)
    for section, cls, fixed in specs:
        values = getattr(args, section)
        if not isinstance(values, dict):
            problems.append(f"'{section}' must be a mapping of option: value in the --config file")
            continue
        try:
            built[section] = stage_args(cls, section, values, fixed)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return built


def pipeline(args: PipelineArgs) -> int:
    from bench.offline import bench
    from export.export import export

    started = time.perf_counter()
    root = Path(args.output)
    ckpt_dir, art_dir, bench_dir = root / "checkpoint", root / "artifact", root / "bench"
    built = stage_options(args, ckpt_dir, art_dir, bench_dir)

    def banner(text: str) -> None:
        print(f"\n== ferry pipeline: {text}", flush=True)

    timings: dict[str, float] = {}
    if "finetune" in built:
        from finetune.train import finetune

        banner(f"finetune -> {ckpt_dir}")
        t = time.perf_counter()
        rc = finetune(built["finetune"])
        timings["finetune_s"] = time.perf_counter() - t
        if rc:
            return rc
    banner(f"export and parity -> {art_dir}")
    t = time.perf_counter()
    export_rc = export(built["export"])
    timings["export_parity_s"] = time.perf_counter() - t
    manifest = json.loads((art_dir / "ferry.json").read_text(encoding="utf-8"))
    report = None
    if export_rc == 0 and not args.skip_bench:
        banner(f"bench -> {bench_dir}")
        t = time.perf_counter()
        bench(built["bench"])
        timings["bench_s"] = time.perf_counter() - t
        report = json.loads((bench_dir / "bench.json").read_text(encoding="utf-8"))
    image = task_named(manifest.get("task")).image
    served = served_here(art_dir) if export_rc == 0 and not image else None
    headers, rows, where = summary_rows(manifest, report, served.variant if served else None)
    held = next((((v.get("parity") or {}).get("heldout")) for v in manifest["variants"].values() if (v.get("parity") or {}).get("heldout")), None)
    unit = "images" if image else "texts"
    head = f"PyTorch accuracy {held['pytorch']['accuracy']:.4f} on {held['examples']} held-out {unit}; " if held else ""
    banner("summary")
    print(head + where)
    print(text_table(headers, rows))
    if served:
        for line in served.log_lines():
            print(line)
    serve_cmd = f"ferry serve {art_dir} --port 3000"
    print(f"serve it: {serve_cmd}")
    total = time.perf_counter() - started
    summary = {
        "checkpoint": str(args.checkpoint or ckpt_dir), "artifact": str(art_dir), "bench": str(bench_dir) if report else None,
        "timings": {**{k: round(v, 1) for k, v in timings.items()}, "total_s": round(total, 1)},
        "note": head + where, "headers": headers, "rows": rows,
        "served_here": served.as_dict() if served else None, "serve": serve_cmd,
    }
    write_json(root / "pipeline.json", summary)
    choice = "\n".join(["", "```", *served.log_lines(), "```"]) if served else ""
    (root / "summary.md").write_text(
        f"# ferry pipeline: {root}\n\n{head}{where}\n\n{markdown_table(headers, rows)}\n{choice}\n\nServe it: `{serve_cmd}`\n",
        encoding="utf-8")
    print(f"pipeline finished in {total:.0f}s; summary in {root / 'summary.md'}")
    if export_rc:
        print("ferry pipeline: error: the export's fp32 variant failed its parity gate; bench skipped", file=sys.stderr)
    return export_rc
