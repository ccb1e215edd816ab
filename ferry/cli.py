"""The `ferry` command: maps each verb to a plain function in a stage package.

Stage modules are imported only when their verb runs, so `ferry --help` is instant and
the serving image needs no PyTorch.
"""

from __future__ import annotations

import importlib
import os
import sys

from ferry import __version__
from ferry.config import parse
from ferry.errors import FerryError, describe_os_error, one_line

# verb: (module, options dataclass, function, one-line description)
VERBS: dict[str, tuple[str, str, str, str]] = {
    "finetune": ("finetune.train", "FinetuneArgs", "finetune", "fine-tune a pretrained model on labelled data"),
    "evaluate": ("finetune.evaluate", "EvaluateArgs", "evaluate", "evaluate a checkpoint on a labelled file"),
    "export": ("export.export", "ExportArgs", "export", "export a checkpoint to ONNX (fp32, int8, fp16) with a parity gate"),
    "parity": ("export.verify", "ParityArgs", "parity", "compare an artifact's ONNX variants with PyTorch"),
    "bench": ("bench.offline", "BenchArgs", "bench", "benchmark an artifact offline, or a live server with --url"),
    "pipeline": ("ferry.pipeline", "PipelineArgs", "pipeline", "finetune, export, parity and bench in one run"),
    "serve": ("serve.cli", "ServeArgs", "serve", "serve an artifact over HTTP with BentoML"),
    "store": ("serve.cli", "StoreArgs", "store", "register an artifact in the BentoML model store"),
    "predict": ("predict.cli", "PredictArgs", "predict", "score a whole file with an artifact, here or on Ray Data"),
}
# `ferry bench --url` measures a live server instead of an artifact.
LOAD_BENCH = ("bench.load", "LoadBenchArgs", "loadbench", "load-test a live ferry server")


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {spec[3]}" for verb, spec in VERBS.items()]
    return (
        "usage: ferry [--version] [--help] [--debug] VERB [options]\n\n"
        "Fine-tune a transformer, export it to ONNX, prove parity, serve it.\n\nverbs:\n"
        + "\n".join(lines)
        + "\n\n'ferry VERB --help' lists a verb's options; --debug (or FERRY_DEBUG=1) shows the traceback of an internal error."
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
    debug = os.environ.get("FERRY_DEBUG", "") not in ("", "0")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
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
        print(f"ferry {verb}: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"ferry {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # OSError: the environment (a file, the disk); anything else: a bug
        if debug:
            raise
        if isinstance(e, OSError):
            print(f"ferry {verb}: error: {describe_os_error(e)}", file=sys.stderr)
            return 2
        first = one_line(str(e).strip().split("\n")[0]) or "(no message)"
        print(f"ferry {verb}: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
