"""The baseline of benchmarks/serve_load.py: a plain per-request PyTorch service.

A transformers ``pipeline`` behind a non-batched HTTP endpoint (Starlette on uvicorn):
each request is classified on its own, one request at a time, the way a classifier is
often first put online. Same request and response shape as ``ferry serve``'s /classify.

    python benchmarks/plain_pytorch_service.py CHECKPOINT --port 3100 [--max-length 128]
"""

from __future__ import annotations

import argparse
import os
import threading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Hugging Face sequence-classification directory (ferry finetune's output)")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-length", type=int, default=None, help="truncate to this many tokens (default: the checkpoint's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from transformers import pipeline

    from ferry.tasks import TEXT_TASK

    max_length = args.max_length
    if max_length is None:
        from finetune.checkpoint import check_valid_checkpoint_dir

        max_length = check_valid_checkpoint_dir(args.checkpoint).max_length
    pipe = pipeline(TEXT_TASK, model=args.checkpoint, device=-1)
    pipe(["warm-up"], truncation=True, max_length=max_length)
    one_at_a_time = threading.Lock()  # non-batched: requests never share a forward pass

    def run(texts: list[str]) -> list[dict]:
        with one_at_a_time:
            return pipe(texts, truncation=True, max_length=max_length)

    async def classify(request: Request) -> JSONResponse:
        texts = (await request.json())["texts"]
        out = await run_in_threadpool(run, texts)
        return JSONResponse({"results": [{"label": o["label"], "score": float(o["score"])} for o in out]})

    async def readyz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("\n")

    app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", readyz)])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
