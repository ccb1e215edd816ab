"""The `ferry` command: maps each verb to a plain function in a stage package.

Stage modules are imported only when their verb runs, so `ferry --help` is instant and
the serving image needs no PyTorch.
"""

from __future__ import annotations

import importlib
import sys

from ferry import __version__
from ferry.config import parse
from ferry.errors import FerryError

# verb: (module, options dataclass, function, one-line description)
VERBS: dict[str, tuple[str, str, str, str]] = {
    "finetune": ("finetune.train", "FinetuneArgs", "finetune", "fine-tune a pretrained model on labelled data"),
    "evaluate": ("finetune.evaluate", "EvaluateArgs", "evaluate", "evaluate a checkpoint on a labelled file"),
    "export": ("export.export", "ExportArgs", "export", "export a checkpoint to ONNX (fp32, int8, fp16) with a parity gate"),
    "parity": ("export.parity", "ParityArgs", "parity", "compare an artifact's ONNX variants with PyTorch"),
    "bench": ("export.bench", "BenchArgs", "bench", "benchmark an artifact offline, or a live server with --url"),
    "pipeline": ("export.pipeline", "PipelineArgs", "pipeline", "finetune, export, parity and bench in one run"),
    "serve": ("serve.cli", "ServeArgs", "serve", "serve an artifact over HTTP with BentoML"),
    "store": ("serve.cli", "StoreArgs", "store", "register an artifact in the BentoML model store"),
}
# `ferry bench --url` measures a live server instead of an artifact.
LOAD_BENCH = ("serve.loadbench", "LoadBenchArgs", "loadbench", "load-test a live ferry server")


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {spec[3]}" for verb, spec in VERBS.items()]
    return (
        "usage: ferry [--version] [--help] VERB [options]\n\n"
        "Fine-tune a transformer, export it to ONNX, prove parity, serve it.\n\nverbs:\n"
        + "\n".join(lines)
        + "\n\n'ferry VERB --help' lists a verb's options."
    )


def run(verb: str, argv: list[str]) -> int:
    spec = VERBS[verb]
    if verb == "bench" and any(a == "--url" or a.startswith("--url=") for a in argv):
        spec = LOAD_BENCH
    module_name, args_name, fn_name, description = spec
    module = importlib.import_module(module_name)
    args = parse(getattr(module, args_name), argv, prog=f"ferry {verb}", description=description)
    result = getattr(module, fn_name)(args)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"ferry {__version__}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        print(f"ferry: error: unknown verb '{verb}'; verbs are: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        return run(verb, argv[1:])
    except FerryError as e:
        print(f"ferry {verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"ferry {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
