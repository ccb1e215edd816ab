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
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

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

    from export.parity import text_batches

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
