"""int8-static of a text model keeps its most sensitive MatMuls in fp32, chosen on validation text."""

from __future__ import annotations

import json
import shutil

from ferry.files import read_manifest
from tests.cli import EXPORT_FAST, run


def read_texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def quantized_and_fp32_matmuls(path):
    """(names of the linear MatMuls that read a quantized input, names of those that do not)."""
    import onnx

    model = onnx.load(str(path))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {t.name for t in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type == "MatMul" and (n.input[1] in dq or n.input[1] in weights)]
    return {n.name for n in linear if n.input[0] in dq}, {n.name for n in linear if n.input[0] not in dq}


def test_selection_reads_validation_only_and_writes_what_it_chose(bert_ckpt, tmp_path, capsys, monkeypatch):
    """With the gate out of reach (every try fails the doubled-error check) all five tries run;
    the variant written is the chosen try, with exactly its MatMuls in fp32; and the texts the
    selection measured are the validation texts and their first lines, never the test split."""
    from export import fallback, quantize

    seen: list[str] = []
    batches = fallback.batches
    monkeypatch.setattr(fallback, "batches", lambda tok, texts, *a: seen.extend(texts) or batches(tok, texts, *a))
    monkeypatch.setattr(quantize, "ERROR_SAFETY", 1e9)
    out = tmp_path / "art"
    rc, stdout, err = run(["export", str(bert_ckpt), "--output", str(out), *EXPORT_FAST, "--variants", "fp32,int8-static"], capsys)
    assert rc == 0, err
    validation, heldout = read_texts(bert_ckpt / "validation.jsonl"), read_texts(bert_ckpt / "heldout.jsonl")
    assert seen and set(seen) <= set(fallback.selection_texts(validation))
    assert not set(seen) & (set(heldout) - set(validation))
    q = read_manifest(out)["variants"]["int8-static"]["quantization"]
    sel = q["fp32_matmuls_selection"]
    assert sel["on"].startswith(str(bert_ckpt / "validation.jsonl"))
    assert [t["fp32_matmuls"] for t in sel["tried"]] == [0, 2, 4, 8, 12] and not sel["reached_gate"]
    assert len(sel["ranking"]["scores"]) == 12 and all(v >= 0 for v in sel["ranking"]["scores"].values())
    chosen = next(t for t in sel["tried"] if t["fp32_matmuls"] == sel["chosen"])
    assert q["fp32_matmuls"] == chosen["nodes"] == list(sel["ranking"]["scores"])[: sel["chosen"]]
    assert q["quantized_nodes"] == 12 - sel["chosen"]
    assert {"agreement", "flips", "mean_abs_diff", "fp32_flops_share"} <= set(chosen)
    assert len({t["mean_abs_diff"] for t in sel["tried"]}) > 1  # the tries differ: their MatMuls went back to fp32
    int8, fp32 = quantized_and_fp32_matmuls(out / "model_int8_static.onnx")
    assert fp32 == set(q["fp32_matmuls"]) and len(int8) == q["quantized_nodes"]
    assert "int8-static: " in stdout and "MatMuls kept in fp32" in stdout


def test_without_validation_every_matmul_is_quantized(bert_ckpt, tmp_path, capsys):
    """A checkpoint written before text checkpoints kept validation.jsonl: no selection (the
    test split is never used instead), and the manifest says why."""
    old = tmp_path / "old"
    shutil.copytree(bert_ckpt, old)
    (old / "validation.jsonl").unlink()
    out = tmp_path / "art"
    rc, _, err = run(["export", str(old), "--output", str(out), *EXPORT_FAST, "--variants", "fp32,int8-static"], capsys)
    assert rc == 0, err
    q = read_manifest(out)["variants"]["int8-static"]["quantization"]
    assert q["fp32_matmuls"] == [] and q["quantized_nodes"] == 12
    assert q["fp32_matmuls_selection"]["on"] is None and "no validation.jsonl" in q["fp32_matmuls_selection"]["note"]
    int8, fp32 = quantized_and_fp32_matmuls(out / "model_int8_static.onnx")
    assert len(int8) == 12 and not fp32


def test_default_export_records_the_selection(bert_artifact):
    q = read_manifest(bert_artifact)["variants"]["int8-static"]["quantization"]
    sel = q["fp32_matmuls_selection"]
    assert sel["tried"][0]["fp32_matmuls"] == 0 and sel["chosen"] in [t["fp32_matmuls"] for t in sel["tried"]]
    assert sel["gate"]["agreement"] == 0.995
    assert len(q["fp32_matmuls"]) == sel["chosen"] and q["quantized_nodes"] + sel["chosen"] == 12


def random_feeds(n=4, length=12, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        ids = rng.integers(5, 60, size=(1, length)).astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return feeds


def test_residual_stream_stays_fp32_without_smoothing(bert_artifact, tmp_path):
    """ONNX Runtime's QDQ quantizer rewires every reader of a quantized tensor to its
    DequantizeLinear: the LayerNorm output feeding the FFN MatMul also reached the next
    residual connection rounded to 8 bits. Only the quantized MatMuls may read DQ outputs."""
    import onnx

    from export import quantize

    quantizer = quantize.StaticQuantizer(bert_artifact / "model.onnx", tmp_path / "w", random_feeds(), "avx2", smooth=0)
    info = quantizer.quantize(tmp_path / "q.onnx")
    assert info["fp32_residual_inputs_restored"] >= 2 and "smoothing" not in info
    model = onnx.load(str(tmp_path / "q.onnx"))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert {n.op_type for n in model.graph.node if any(i in dq for i in n.input)} == {"MatMul"}


def test_unquantize_matmuls_restores_fp32(bert_artifact, tmp_path):
    """The FFN output MatMuls back in fp32 read their fp32 input and weight again; the Q/DQ
    nodes only they used are gone; the rest stay quantized; ONNX Runtime runs the result."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from export import quantize

    feeds = random_feeds()
    quantizer = quantize.StaticQuantizer(bert_artifact / "model.onnx", tmp_path / "w", feeds, "avx2", smooth=0.75)
    info = quantizer.quantize(tmp_path / "all.onnx")
    keep = [n for n in quantizer.linear if "output/dense" in n and "attention" not in n]  # the FFN outputs
    info2 = quantizer.keeping(tmp_path / "all.onnx", info, tmp_path / "some.onnx", keep)
    assert info2["quantized_nodes"] == info["quantized_nodes"] - len(keep) == len(quantizer.linear) - len(keep)
    int8, fp32 = quantized_and_fp32_matmuls(tmp_path / "some.onnx")
    assert fp32 == set(keep) and int8 == set(quantizer.linear) - set(keep)
    model = onnx.load(str(tmp_path / "some.onnx"))
    prepared = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(quantizer.model)).graph.initializer}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.name in keep:
            assert np.array_equal(inits[n.input[1]], prepared[n.input[1]])
    read = {i for n in model.graph.node for i in n.input}
    assert all(any(o in read for o in n.output) for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert all(t.name in read for t in model.graph.initializer)
    assert len(model.graph.node) < len(onnx.load(str(tmp_path / "all.onnx")).graph.node)

    def logits(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(["logits"], f)[0] for f in feeds])

    assert np.abs(logits(tmp_path / "some.onnx") - logits(bert_artifact / "model.onnx")).max() < 0.05


def test_ranking_puts_the_coarsest_matmul_first(bert_ckpt, bert_artifact, tmp_path):
    """Make one MatMul's activation scale 50x coarser in a QDQ graph: its int8 error, and so
    its first-order effect on the logit margin, dwarfs the others'; it must rank first."""
    import onnx
    from onnx import numpy_helper

    from export import fallback, quantize
    from export.inputs import read_jsonl_texts
    from finetune.checkpoint import check_valid_checkpoint_dir, load_model, load_tokenizer

    quantizer = quantize.StaticQuantizer(bert_artifact / "model.onnx", tmp_path / "w", random_feeds(), "avx2", smooth=0)
    quantizer.quantize(tmp_path / "q.onnx")
    target = "/bert/encoder/layer.0/output/dense/MatMul"
    model = onnx.load(str(tmp_path / "q.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == target)
    scale_name = producer[node.input[0]].input[1]  # the activation DequantizeLinear's scale
    scale = next(t for t in model.graph.initializer if t.name == scale_name)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 50, scale_name))  # its QuantizeLinear shares it
    onnx.save(model, str(tmp_path / "coarse.onnx"))
    ckpt = check_valid_checkpoint_dir(bert_ckpt)
    tok, torch_model = load_tokenizer(ckpt.path), load_model(ckpt)
    texts = read_jsonl_texts(ckpt.validation)[0]
    ranked, scores = fallback.rank_matmuls(torch_model, tmp_path / "coarse.onnx", fallback.batches(tok, texts, 64, ["input_ids", "attention_mask", "token_type_ids"]))
    assert ranked[0] == target and len(ranked) == len(quantizer.linear)
    assert scores[target] > sorted(scores.values())[-2] > 0
