"""int8-static of a text model with its most sensitive MatMuls kept in fp32, chosen on validation text.

1. Calibrate once (:class:`export.quantize.StaticQuantizer`) and quantize every linear MatMul.
2. Rank the quantized MatMuls by how much each one's quantization error moves the fp32 logit
   margin (top label minus runner-up), to first order: PyTorch runs the checkpoint with each
   MatMul's output replaced by ``y + t * e``, where ``e`` is what the integer kernel would
   add (the same scales, zero points and integer weights as the QDQ graph), and autograd gives
   d(margin)/dt per text and per MatMul in one forward and one backward pass.
3. Keep the top 0, 2, 4, 8, 12 in fp32 in turn, each try compared with fp32 on the validation
   texts (ONNX Runtime), until one reaches the gate (:func:`export.quantize.choose_fp32_matmuls`).

The validation texts are the checkpoint's ``validation.jsonl`` (never its test split), each
at up to ``length`` tokens, plus the first line of each text when it differs from the whole:
int8 errors depend on the length and form of the input, and a short form of the same text is
data the model never saw in that form.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export import quantize

BATCH = 16
RANKING_TEXTS = 64  # validation texts (and as many first lines) the ranking's backward pass sees
RANKING_LENGTH = 128  # ... at up to this many tokens


def first_lines(texts: Sequence[str]) -> list[str]:
    """The first non-empty line of each text that has more than one (a headline, a subject)."""
    out = []
    for t in texts:
        lines = [s.strip() for s in t.splitlines() if s.strip()]
        if len(lines) > 1:
            out.append(lines[0])
    return out


def selection_texts(texts: Sequence[str]) -> list[str]:
    """The texts every try is measured on: the validation texts and their first lines."""
    return list(texts) + first_lines(texts)


def batches(tokenizer: Any, texts: Sequence[str], length: int, inputs: Sequence[str]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """(row indices, padded feeds) of ``texts`` at up to ``length`` tokens, similar lengths together."""
    from export.inputs import encode, pad_id
    from runtime.tokens import collate

    ids = encode(tokenizer, texts, length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [(ix, collate([ids[i] for i in ix], pad_id(tokenizer), inputs)) for ix in (order[i : i + BATCH] for i in range(0, len(order), BATCH))]


def onnx_logits(path: Path, feeds: list[tuple[list[int], dict[str, np.ndarray]]], threads: int | None) -> np.ndarray:
    from runtime.engines import create_session

    session = create_session(path, "cpu", threads)
    rows = sum(len(ix) for ix, _ in feeds)
    out = None
    for ix, feed in feeds:
        (logits,) = session.run(["logits"], feed)
        if out is None:
            out = np.zeros((rows, logits.shape[-1]), dtype=np.float32)
        out[ix] = logits
    assert out is not None
    return out


def _module_of(modules: dict[str, Any], node: str) -> Any:
    """The nn.Linear an exported MatMul came from: '/bert/encoder/layer.0/output/dense/MatMul'
    is module 'bert.encoder.layer.0.output.dense' (the exporter names nodes by module scope)."""
    import torch

    module = modules.get(node.strip("/").rsplit("/", 1)[0].replace("/", "."))
    return module if isinstance(module, torch.nn.Linear) else None


def rank_matmuls(model: Any, qdq: Path, feeds: list[tuple[list[int], dict[str, np.ndarray]]]) -> tuple[list[str], dict[str, float]]:
    """The quantized MatMuls of ``qdq``, most sensitive first, and each one's mean
    |d(margin)| over the texts of ``feeds`` (see the module docstring). MatMuls that map to no
    nn.Linear of ``model`` come last, unscored."""
    import inspect

    import torch

    params = quantize.qdq_matmul_params(qdq)
    modules = dict(model.named_modules())
    accepted = set(inspect.signature(model.forward).parameters)
    mapped = {}
    for name, p in params.items():
        m = _module_of(modules, name)
        if m is not None and tuple(m.weight.shape) == tuple(p["weight"].T.shape):
            mapped[name] = (m, p, torch.from_numpy(np.ascontiguousarray(p["weight"].T)),
                            None if p["inv_scale"] is None else torch.from_numpy(np.array(p["inv_scale"])))
    total = {name: 0.0 for name in mapped}
    count = 0
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # only d(margin)/dt is wanted: no weight gradients
        p.requires_grad_(False)
    try:
        for _, feed in feeds:
            count += _accumulate(model, mapped, feed, accepted, total)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    scores = {name: total[name] / max(count, 1) for name in mapped}
    ranked = sorted(scores, key=lambda n: -scores[n]) + [n for n in params if n not in scores]
    return ranked, scores


def _accumulate(model: Any, mapped: dict[str, Any], feed: dict[str, np.ndarray], accepted: set[str], total: dict[str, float]) -> int:
    """Add one batch's |d(margin)/dt| per MatMul to ``total``; returns the batch size."""
    import torch

    knobs, hooks = {}, []
    batch = len(next(iter(feed.values())))
    for name, (m, p, weight, inv) in mapped.items():
        t = torch.zeros(batch, requires_grad=True)
        knobs[name] = t

        def hook(mod: Any, args: Any, y: Any, p: dict = p, weight: Any = weight, inv: Any = inv, t: Any = t) -> Any:
            x = args[0] if inv is None else args[0] * inv
            q = torch.clamp(torch.round(x / p["scale"]) + p["zero_point"], p["qmin"], p["qmax"])
            err = torch.nn.functional.linear((q - p["zero_point"]) * p["scale"], weight, mod.bias) - y
            return y + t.view(-1, *([1] * (y.dim() - 1))) * err.detach()

        hooks.append(m.register_forward_hook(hook))
    try:
        logits = model(**{k: torch.from_numpy(v) for k, v in feed.items() if k in accepted}).logits
    finally:
        for h in hooks:
            h.remove()
    top2 = logits.detach().topk(2, dim=-1).indices
    margin = logits.gather(1, top2[:, :1]) - logits.gather(1, top2[:, 1:])
    grads = torch.autograd.grad(margin.sum(), list(knobs.values())) if knobs else []
    for name, g in zip(knobs, grads):
        total[name] += float(g.abs().sum())
    return batch


def matmul_flops(path: Path) -> dict[str, int]:
    """Multiply-adds per token of each MatMul with a constant weight (its weight's size)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return {n.name: dims[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dims}


def select_fp32_matmuls(quantizer: quantize.StaticQuantizer, fp32: Path, dst: Path, work: Path, model: Any, tokenizer: Any,
                        texts: Sequence[str], length: int, inputs: Sequence[str], gate: float, threads: int | None,
                        source: str) -> dict[str, Any]:
    """Write int8-static to ``dst`` with the fp32 MatMuls chosen on ``texts`` (validation only);
    returns the quantization settings with ``fp32_matmuls`` and ``fp32_matmuls_selection``."""
    import torch

    if not texts:
        info = quantizer.quantize(dst)
        return {**info, "fp32_matmuls": [], "fp32_matmuls_selection": {"on": None, "note": f"{source} has no texts: every linear MatMul quantized"}}
    clock = {"started": time.perf_counter()}

    def lap(name: str) -> None:
        now = time.perf_counter()
        clock[name], clock["last"] = round(now - clock.get("last", clock["started"]), 2), now

    every = selection_texts(texts)
    feeds = batches(tokenizer, every, length, inputs)
    reference = onnx_logits(fp32, feeds, threads)
    flops = matmul_flops(fp32)
    lap("reference_s")
    quantized: dict[int, dict[str, Any]] = {}

    def path(k: int) -> Path:
        return work / f"int8s-fp32matmuls{k}.onnx"

    quantized[0] = quantizer.quantize(path(0))
    lap("calibrate_quantize_s")
    ranked: list[str] = []
    scores: dict[str, float] = {}
    measured: dict[int, dict[str, Any]] = {}

    def quantize_keeping(k: int) -> None:
        if k not in quantized:
            quantized[k] = quantizer.keeping(path(0), quantized[0], path(k), ranked[:k])

    def measure(k: int) -> dict[str, Any]:
        if k not in measured:
            t = time.perf_counter()
            m = quantize.compare_logits(reference, onnx_logits(path(k), feeds, threads))
            m["fp32_flops_share"] = round(sum(flops.get(n, 0) for n in ranked[:k]) / max(sum(flops.get(n, 0) for n in quantizer.linear), 1), 4)
            m["seconds"] = round(time.perf_counter() - t, 2)
            measured[k] = m
        return measured[k]

    sample: list[str] = []
    if not quantize.reaches_gate(measure(0), gate):  # plain int8 falls short: rank, then try
        # the ranking sees a spread of validation texts (the file is ordered by label) and their first lines
        step = max(1, len(texts) // RANKING_TEXTS)
        sample = list(texts)[::step][:RANKING_TEXTS]
        with torch.enable_grad():
            ranked, scores = rank_matmuls(model, path(0), batches(tokenizer, selection_texts(sample), min(length, RANKING_LENGTH), inputs))
        lap("ranking_s")
    k, tried = quantize.choose_fp32_matmuls(quantize_keeping, measure, ranked or list(quantizer.linear), gate)
    _move(path(k), dst)
    chosen = next(t for t in tried if t["fp32_matmuls"] == k)
    selection = {
        "on": f"{source}: {len(texts)} texts at up to {length} tokens and {len(every) - len(texts)} first lines",
        "gate": {"agreement": gate, f"agreement_at_{quantize.ERROR_SAFETY:g}x_error": gate},
        "ranking": {
            "method": "mean |d(logit margin)| from each MatMul's int8 error, first order (PyTorch autograd)",
            "texts": len(sample) + len(first_lines(sample)),
            "scores": {n: round(scores[n], 6) for n in ranked if n in scores},
        } if ranked else None,
        "tried": tried,
        "chosen": k,
        "reached_gate": quantize.reaches_gate(chosen, gate),
        "seconds": round(time.perf_counter() - clock["started"], 1),
        "seconds_in": {k: v for k, v in clock.items() if k.endswith("_s")},
    }
    return {**quantized[k], "fp32_matmuls": ranked[:k], "fp32_matmuls_selection": selection}


def _move(src: Path, dst: Path) -> None:
    """Rename a model file, and its external data (renamed ``<dst>_data``) if it has one."""
    if quantize.external_data_file(src) is None:
        src.replace(dst)
        return
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + "_data")


def summary(q: dict[str, Any]) -> str:
    """One line: what the selection kept in fp32 and what it measured."""
    sel = q["fp32_matmuls_selection"]
    if not sel.get("tried"):
        return f"int8-static: {sel.get('note')}"
    chosen = next(t for t in sel["tried"] if t["fp32_matmuls"] == sel["chosen"])
    key = f"agreement_at_{quantize.ERROR_SAFETY:g}x_error"
    verdict = "reached the gate" if sel["reached_gate"] else f"gate {sel['gate']['agreement']:.1%} not reached: best of {len(sel['tried'])} tries"
    return (
        f"int8-static: {sel['chosen']} of {q['quantized_nodes'] + sel['chosen']} MatMuls kept in fp32 "
        f"({chosen['fp32_flops_share']:.0%} of their FLOPs); validation agreement {chosen['agreement']:.2%}, "
        f"{chosen[key]:.2%} at {quantize.ERROR_SAFETY:g}x error, mean |Δlogit| {chosen['mean_abs_diff']:.3g}; {verdict} ({sel['seconds']:.0f}s)"
    )
