"""A PyTorch reference for the parity and engine tests of export."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def reference(bert_ckpt: Path) -> tuple[Any, Any]:
    """The PyTorch reference of the tiny BERT checkpoint (its held-out texts, batch 2, 16 random tokens)
    and the gate options it was built with."""
    from export.parity import GateArgs, build_reference, load_labelled_data, load_source

    ckpt, model, tok = load_source(bert_ckpt, "CHECKPOINT")
    args = GateArgs(parity_batch_sizes=[2], parity_seq_lengths=[16], threads=1)
    labelled = load_labelled_data(ckpt.labels, ckpt.heldout, None, "text", "label", 0)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    ref = build_reference(model, tok, ckpt.labels, labelled, 64, names, batch_sizes=args.parity_batch_sizes,
                          seq_lengths=args.parity_seq_lengths, seed=args.seed)
    return ref, args
