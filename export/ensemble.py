"""Ensembles: several fine-tuned checkpoints exported as one ONNX graph.

The graph feeds the same tokenizer inputs to every member, turns each member's logits
into probabilities (Softmax) and combines them:

- ``mean``: the mean of the members' probabilities;
- ``weighted``: their weighted mean (``--weights``, normalized to sum to 1);
- ``vote``: ``(votes + mean probability) / (members + 1)`` per class, where ``votes``
  counts the members whose top class it is. The class with most votes wins and the mean
  probability breaks ties (it differs between classes by less than one vote); the scores
  sum to 1.

The graph's output is ``logits`` = log(combined probabilities), floored at 1e-30, so
that the softmax every later stage applies (serving, parity, bench) gives back the
combined probabilities, and an ensemble artifact is served and benched like any other.
The PyTorch reference (:func:`torch_ensemble`) computes the same combination in
PyTorch from the members' own models; parity compares the two.

This version requires one tokenizer shared by all members (the same files), and the
same labels in the same order.

:class:`EnsembleExport` is the ensemble's part of `ferry export`: every way an ensemble's export
differs from a text checkpoint's, in one place.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from export.base import Calibration, Graph, Heldout, model_labels
from export.parity import Progress, Reference, build_reference, load_labelled_data, pytorch_accuracy, text_batches
from export.text import (
    StaticOptions, TextExport, calibration_texts, check_model_type, check_tokenizer, max_length_of, no_fp32_matmuls, onnx_export,
    optimize, place,
)
from export.writer import graph_info
from ferry.errors import CheckpointError, ConfigError

COMBINE = ("mean", "weighted", "vote")
FLOOR = 1e-30  # log(0) would make -inf logits


def weights_for(combine: str, weights: Sequence[float], members: int) -> list[float]:
    """The normalized weight of each member (equal unless ``weighted``).

    Raises:
        ConfigError: weights given for another rule, or not one positive number per member.
    """
    if combine != "weighted":
        if weights:
            raise ConfigError(f"--weights applies to --combine weighted only, not {combine}")
        return [1.0 / members] * members
    if len(weights) != members:
        raise ConfigError(f"--weights has {len(weights)} values for {members} --ensemble members; give one per member")
    if any(w <= 0 for w in weights):
        raise ConfigError("--weights must all be positive")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def tokenizer_signature(path: Path) -> dict[str, str]:
    """sha256 of each tokenizer file in a checkpoint (what "the same tokenizer" means here)."""
    from finetune.checkpoint import TOKENIZER_FILES
    from ferry.files import sha256_file

    names = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")
    return {n: sha256_file(path / n) for n in names if (path / n).is_file()}


def check_members(paths: Sequence[str]) -> list[Any]:
    """Check every member before any work: a checkpoint each, the same labels, one tokenizer.

    Raises:
        ConfigError: fewer than two members, or the same directory twice.
        CheckpointError: a member that is not a checkpoint, or that differs from the first.
    """
    from finetune.checkpoint import TEXT, check_valid_checkpoint_dir

    if len(paths) < 2:
        raise ConfigError(f"--ensemble needs at least 2 checkpoints, got {len(paths)}")
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise ConfigError("--ensemble names the same checkpoint twice")
    members = [check_valid_checkpoint_dir(p, "--ensemble") for p in paths]
    for m in members:
        if m.task != TEXT:
            raise CheckpointError(f"--ensemble {m.path}: a {m.task} checkpoint; ensembles combine text classifiers only")
    first = members[0]
    signature = tokenizer_signature(first.path)
    for m in members[1:]:
        if m.labels != first.labels:
            raise CheckpointError(
                f"--ensemble {m.path}: labels {m.labels} differ from {first.path}'s {first.labels}; members must share labels"
            )
        if tokenizer_signature(m.path) != signature:
            raise CheckpointError(
                f"--ensemble {m.path}: its tokenizer differs from {first.path}'s; members must share one tokenizer"
            )
    return members


def heldout_of(members: Sequence[Any], data: str | None) -> Path | None:
    """The members' common held-out split (None when they have none).

    Raises:
        CheckpointError: the members hold different held-out splits and no --data is given.
    """
    from ferry.files import sha256_file

    if data:
        return None
    splits = [m.heldout for m in members]
    if all(s is None for s in splits):
        return None
    if any(s is None for s in splits) or len({sha256_file(s) for s in splits}) > 1:
        names = ", ".join(str(m.path) for m in members)
        raise CheckpointError(
            f"--ensemble {names}: the members' held-out splits differ, so no common accuracy can be measured; pass --data FILE"
        )
    return splits[0]


def compose(member_files: Sequence[Path], out: Path, combine: str, weights: Sequence[float], num_labels: int) -> dict[str, Any]:
    """One ONNX graph running every member and combining their probabilities (module docstring).

    Returns:
        what the manifest records of the graph: the shared inputs, each member's inputs.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, compose as onnx_compose, helper, numpy_helper

    models = [onnx.load(str(p)) for p in member_files]
    inputs: dict[str, Any] = {}
    nodes: list[Any] = []
    initializers: list[Any] = []
    value_info: list[Any] = []
    opsets: dict[str, int] = {}
    member_inputs = []
    probs = []
    for i, model in enumerate(models):
        prefix = f"m{i}_"
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        names = [x.name for x in model.graph.input]
        member_inputs.append(names)
        for x in model.graph.input:
            inputs.setdefault(x.name, x)
        outputs = [o.name for o in model.graph.output]
        if "logits" not in outputs:
            raise CheckpointError(f"--ensemble member {i + 1}: its ONNX graph has outputs {outputs}, not logits")
        g = onnx_compose.add_prefix(model, prefix).graph
        # The shared input feeds the member's own (renamed) input.
        nodes += [helper.make_node("Identity", [n], [prefix + n], name=f"{prefix}input_{n}") for n in names]
        nodes += list(g.node)
        initializers += list(g.initializer)
        value_info += list(g.value_info)
        nodes.append(helper.make_node("Softmax", [prefix + "logits"], [prefix + "probs"], axis=-1, name=f"{prefix}softmax"))
        probs.append(prefix + "probs")

    def const(name: str, value: Any, dtype: Any = np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    scaled = []
    for i, (p, w) in enumerate(zip(probs, weights)):
        nodes.append(helper.make_node("Mul", [p, const(f"ens_w{i}", w)], [f"ens_scaled{i}"]))
        scaled.append(f"ens_scaled{i}")
    nodes.append(helper.make_node("Sum", scaled, ["ens_mean"]))
    combined = "ens_mean"
    if combine == "vote":
        hots = []
        for i, p in enumerate(probs):
            nodes.append(helper.make_node("ArgMax", [p], [f"ens_top{i}"], axis=-1, keepdims=0))
            nodes.append(helper.make_node(
                "OneHot", [f"ens_top{i}", const(f"ens_depth{i}", [num_labels], np.int64), const(f"ens_onoff{i}", [0.0, 1.0])],
                [f"ens_vote{i}"], axis=-1,
            ))
            hots.append(f"ens_vote{i}")
        nodes.append(helper.make_node("Sum", [*hots, "ens_mean"], ["ens_votes_plus_mean"]))
        nodes.append(helper.make_node("Mul", ["ens_votes_plus_mean", const("ens_vote_norm", 1.0 / (len(probs) + 1))], ["ens_vote"]))
        combined = "ens_vote"
    nodes.append(helper.make_node("Max", [combined, const("ens_floor", FLOOR)], ["ens_floored"]))
    nodes.append(helper.make_node("Log", ["ens_floored"], ["logits"]))

    first_out = models[0].graph.output[0]
    dims = [d.dim_param or d.dim_value for d in first_out.type.tensor_type.shape.dim]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)
    graph = helper.make_graph(nodes, "ferry_ensemble", list(inputs.values()), [output], initializer=initializers, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(m.ir_version for m in models)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return {"inputs": list(inputs), "member_inputs": member_inputs}


def combine_probs(probs: Sequence[Any], weights: Sequence[float], combine: str) -> Any:
    """log of the members' probabilities combined as the graph combines them (floored at FLOOR)."""
    import torch

    mean = sum(w * p for w, p in zip(weights, probs))
    if combine == "vote":
        votes = sum(torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float() for p in probs)
        mean = (votes + mean) / (len(probs) + 1)
    return torch.log(torch.clamp_min(mean, FLOOR))


def torch_ensemble(models: Sequence[Any], weights: Sequence[float], combine: str) -> Any:
    """The PyTorch reference: the members' own models, combined as the graph combines them."""
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(models)
            self.config = models[0].config  # vocabulary and positions: the shared tokenizer's
            self.accepts = [set(inspect.signature(m.forward).parameters) for m in models]
            self.weights, self.combine = list(weights), combine

        def member_probs(self, **feeds: Any) -> list[Any]:
            """Each member's probabilities; each member gets only the inputs it takes."""
            return [
                torch.softmax(m(**{k: v for k, v in feeds.items() if k in accepts}).logits.float(), dim=-1)
                for m, accepts in zip(self.members, self.accepts)
            ]

        def forward(self, **feeds: Any) -> Any:
            from types import SimpleNamespace

            return SimpleNamespace(logits=combine_probs(self.member_probs(**feeds), self.weights, self.combine))

    return Ensemble().eval()


def load_ensemble(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(first member's Checkpoint, PyTorch ensemble, tokenizer) from an artifact's ``ensemble`` block."""
    from finetune.checkpoint import load_model, load_tokenizer

    paths = [m["checkpoint"] for m in spec["members"]]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise CheckpointError(f"ensemble member {missing[0]} not found; the artifact's PyTorch reference needs every member")
    members = check_members(paths)
    models = [load_model(m) for m in members]
    weights = [float(m["weight"]) for m in spec["members"]]
    return members[0], torch_ensemble(models, weights, spec["combine"]), load_tokenizer(members[0].path)


def heldout_pass(ensemble: Any, tokenizer: Any, labelled: Any, max_length: int, input_names: Sequence[str],
                 progress: Any = None) -> tuple[Any, list[float]]:
    """One pass of the members over the held-out texts.

    Returns the ensemble's logits in text order (what ``parity.build_reference`` computes, by
    the same batches and the same :func:`combine_probs`) and each member's accuracy.
    """
    import numpy as np
    import torch

    batches, index = text_batches(tokenizer, labelled.texts, max_length, input_names)
    y = np.asarray(labelled.label_ids)
    logits = None
    pred = np.zeros((len(ensemble.members), len(y)), dtype=np.int64)
    wrap = progress or (lambda it, desc: it)
    with torch.inference_mode():
        for feeds, ix in zip(wrap(batches, "PyTorch members, held-out"), index):
            probs = ensemble.member_probs(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            out = combine_probs(probs, ensemble.weights, ensemble.combine).numpy()
            if logits is None:
                logits = np.zeros((len(y), out.shape[-1]), dtype=np.float32)
            logits[ix] = out
            for i, p in enumerate(probs):
                pred[i, ix] = p.argmax(-1).numpy()
    return logits, [float((row == y).mean()) for row in pred]


# ---------------------------------------------------------------- the ensemble's part of `ferry export`


def option_problems(members: Sequence[str], combine: str, weights: Sequence[float], variants: Sequence[str]) -> list[str]:
    """What `ferry export` refuses of the ensemble options (``members``: --ensemble's checkpoints)."""
    from runtime.artifact import VARIANTS

    problems = []
    if members and any(VARIANTS[v].device == "cuda" for v in variants):
        problems.append("--variants fp16, fp16-tensorrt: not available for an --ensemble in this version")
    if members:
        try:
            weights_for(combine, weights, len(members))
        except ConfigError as e:
            problems += e.problems
    elif weights or combine != "mean":
        problems.append("--combine and --weights apply to an --ensemble only")
    return problems


class EnsembleExport(TextExport):
    """Every difference an ensemble makes to a text export: each member exported and optimized, then
    one graph composed (:func:`compose`); int8-static keeps every MatMul quantized and no MHA split;
    the PyTorch reference is :func:`torch_ensemble`, its held-out logits and each member's accuracy
    computed in one pass (:func:`heldout_pass`); the manifest names the members."""

    def __init__(self, members: list[Any], weights: list[float], combine: str, **text: Any):
        super().__init__(members[0], **text)
        self.members, self.weights, self.combine = members, weights, combine
        self.accuracies: list[float | None] = [None] * len(members)

    @classmethod
    def load_members(
        cls, members: list[Any], variants: Sequence[str], *, combine: str, weights: Sequence[float], calibration: Calibration,
        heldout: Heldout, static: StaticOptions, opset: int | None, optimization: str, threads: int,
    ) -> EnsembleExport:
        """The weights, each member's model type and the shared tokenizer checked (:func:`check_members`
        checked the rest), then the members, the tokenizer and the data loaded (the members' common
        held-out split, or ``heldout.data``)."""
        from finetune.checkpoint import load_model, load_tokenizer

        normalized = weights_for(combine, weights, len(members))
        for m in members:
            check_model_type(m)
        first = members[0]
        tokenizer = load_tokenizer(first.path)
        check_tokenizer(first, tokenizer)
        models = [load_model(m).eval() for m in members]
        labels = model_labels(first, models[0])
        max_length = min(max_length_of(m, x, tokenizer) for m, x in zip(members, models))
        calib = calibration_texts(first, calibration, heldout.text_column) if "int8-static" in variants else []
        split = heldout_of(members, heldout.data)
        labelled = load_labelled_data(labels, split, heldout.data, heldout.text_column, heldout.label_column, heldout.max_examples)
        return cls(
            members, normalized, combine, model=torch_ensemble(models, normalized, combine), tokenizer=tokenizer,
            labels=labels, max_length=max_length, labelled=labelled, calib=calib, calibration=calibration, static=static,
            opset=opset, optimization=optimization, threads=threads,
        )

    def graph(self, work: Path, fp32: Path, say: Callable[..., None]) -> Graph:
        started = time.perf_counter()
        export_s, member_opt = 0.0, []
        for i, m in enumerate(self.members):
            say(f"exporting member {i + 1}/{len(self.members)} {m.path} ({m.model_type}) to ONNX and optimizing it ({self.optimization})",
                same_step=i > 0)
            t = time.perf_counter()
            onnx_export(m, work / f"m{i}" / "raw", self.opset)
            export_s += time.perf_counter() - t
            member_opt.append(optimize(work / f"m{i}" / "raw", work / f"m{i}" / "opt", self.optimization, m.model_type))
        say(f"composing the ensemble graph ({self.combine})")
        files = [work / f"m{i}" / "opt" / "model.onnx" for i in range(len(self.members))]
        graph = compose(files, work / "opt" / "model.onnx", self.combine, self.weights, len(self.labels))
        self.raw_dir, self.fp32 = work / "m0" / "raw", fp32
        self.opt_info = {"level": self.optimization, "members": member_opt, "ensemble": graph}
        opset, self.inputs, outputs = graph_info(work / "opt" / "model.onnx")
        entry = {"optimization": self.opt_info, **place(work / "opt" / "model.onnx", fp32)}
        # optimize_s: the members' optimization and the composition
        timings = {"export_s": export_s, "optimize_s": time.perf_counter() - started - export_s}
        return Graph(entry, timings, opset, self.inputs, outputs)

    def static_base(self, work: Path) -> tuple[Path, dict[str, Any]]:
        return self.fp32, self.opt_info

    def fp32_matmuls(self, quantizer: Any, base: Path, out: Path, work: Path) -> dict[str, Any]:
        return no_fp32_matmuls(quantizer, out, "an ensemble")

    def reference(self, inputs: list[str], batch_sizes: list[int], seq_lengths: list[int], seed: int,
                  progress: Progress | None) -> Reference:
        logits = None
        if self.labelled is not None:
            # the members run once: the reference's held-out logits and each member's accuracy
            logits, self.accuracies = heldout_pass(self.model, self.tokenizer, self.labelled, self.max_length, inputs, progress)
        return build_reference(self.model, self.tokenizer, self.labels, self.labelled, self.max_length, inputs,
                               batch_sizes=batch_sizes, seq_lengths=seq_lengths, seed=seed, progress=progress,
                               heldout_logits=logits)

    def source(self) -> dict[str, Any]:
        return {"ensemble": [str(m.path.resolve()) for m in self.members], "model_type": self.ckpt.model_type}

    def extra(self, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
        members = [
            {"checkpoint": str(m.path.resolve()), "manifest_sha256": m.manifest_sha256, "model_type": m.model_type,
             "weight": w, "heldout_accuracy": acc}
            for m, w, acc in zip(self.members, self.weights, self.accuracies)
        ]
        return {"ensemble": {
            "combine": self.combine,
            "members": members,
            "heldout_accuracy": pytorch_accuracy(variants),
            "heldout_source": self.labelled.source if self.labelled else None,
        }}

    def report(self, manifest: dict[str, Any]) -> None:
        for i, m in enumerate(manifest["ensemble"]["members"], 1):
            acc = m["heldout_accuracy"]
            print(f"member {i} {m['checkpoint']}: weight {m['weight']:.3f}, PyTorch accuracy " + ("-" if acc is None else f"{acc:.4f}"))
