"""How often int8 variants keep PyTorch fp32's answers: on the test split and on a short form of it.

For each ONNX file given (an artifact's variants, or loose files made from the same
checkpoint), the label agreement with the PyTorch fp32 checkpoint, the flips, the agreement
with each file's error doubled (how close the rest came to flipping), and the mean |Δlogit|,
on two labelled sets the model never trained on:

- ``heldout``: the checkpoint's ``heldout.jsonl`` (the test split) at ``--max-length`` tokens;
- ``first lines``: the first non-empty line of each held-out text (for BBC News, the headline),
  same labels: texts that differ in form from everything the model and the export saw.

PyTorch runs once per set; each ONNX file runs in this process with ``--threads`` threads
(accuracy only: time it with `ferry bench` or ``probe.py``, each variant in its own process).

    python benchmarks/int8_agreement.py runs/bbc runs/bbc-onnx --output runs/int8-agreement.json
    python benchmarks/int8_agreement.py runs/bbc runs/bbc-onnx/model_int8_static.onnx /tmp/other.onnx
    python benchmarks/int8_agreement.py runs/bbc runs/bbc-onnx --write-first-lines runs/headlines.jsonl
    ferry parity runs/bbc-onnx --data runs/headlines.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GATE = 0.995


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint directory (PyTorch fp32 reference, heldout.jsonl)")
    ap.add_argument("onnx", nargs="+", help="artifact directories (every variant but fp16) or .onnx files")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per held-out text (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="also write the results to this JSON file")
    ap.add_argument("--write-first-lines", default=None, metavar="FILE.jsonl",
                    help="also write the first-lines set (text, label) to this file, for `ferry parity --data`")
    args = ap.parse_args()

    import torch

    from export.fallback import batches, first_lines, onnx_logits
    from export.inputs import read_jsonl_texts
    from export.quantize import compare_logits
    from finetune.checkpoint import check_valid_checkpoint_dir, load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    ckpt = check_valid_checkpoint_dir(args.checkpoint)
    tokenizer, model = load_tokenizer(ckpt.path), load_model(ckpt).eval()
    length = args.max_length or ckpt.max_length
    texts, labels = read_jsonl_texts(ckpt.heldout)
    heads = [next((s.strip() for s in t.splitlines() if s.strip()), t) for t in texts]
    sets = {"heldout": (texts, labels), "first lines": (heads, labels)}
    if args.write_first_lines:
        with open(args.write_first_lines, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in zip(heads, labels))
        print(f"wrote {len(heads)} first lines to {args.write_first_lines}")
    print(f"{len(texts)} held-out texts at up to {length} tokens; {len(first_lines(texts))} have a first line shorter than the text")

    files = []
    for item in map(Path, args.onnx):
        if item.is_dir():
            manifest = json.loads((item / "ferry.json").read_text(encoding="utf-8"))
            files += [(f"{item.name}:{name}", item / v["file"]) for name, v in manifest["variants"].items() if name != "fp16"]
        else:
            files.append((item.name, item))

    label_ids = {y: i for i, y in enumerate(ckpt.labels)}
    results = {}
    for set_name, (set_texts, set_labels) in sets.items():
        names = None
        feeds = None
        reference = None
        for name, path in files:
            if feeds is None:
                import onnx

                names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
                feeds = batches(tokenizer, set_texts, length, names)
                reference = np.zeros((len(set_texts), len(ckpt.labels)), dtype=np.float32)
                with torch.inference_mode():
                    for ix, feed in feeds:
                        reference[ix] = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
            logits = onnx_logits(path, feeds, args.threads)
            r = compare_logits(reference, logits)
            truth = np.array([label_ids[y] for y in set_labels])
            r["accuracy"] = round(float((logits.argmax(-1) == truth).mean()), 4)
            r["pytorch_accuracy"] = round(float((reference.argmax(-1) == truth).mean()), 4)
            results.setdefault(name, {})[set_name] = r

    print(f"| file | heldout agreement (flips) | first lines agreement (flips) | both >= {GATE:.1%} | heldout mean abs Δlogit | first lines mean abs Δlogit |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        h, f = r["heldout"], r["first lines"]
        ok = "yes" if min(h["agreement"], f["agreement"]) >= GATE else "no"
        print(f"| {name} | {h['agreement']:.2%} ({h['flips']}) | {f['agreement']:.2%} ({f['flips']}) | {ok} | {h['mean_abs_diff']:.3f} | {f['mean_abs_diff']:.3f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"checkpoint": str(ckpt.path), "max_length": length, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
