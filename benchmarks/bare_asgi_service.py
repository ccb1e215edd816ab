"""The floor of benchmarks/serve_load.py: a bare ASGI endpoint with no model at all.

Starlette on uvicorn (with uvicorn's defaults, which pick uvloop and httptools when they
are installed), the same request and response shape as ``ferry serve``'s /classify: POST
/classify reads ``{"texts": [...]}`` and answers ``{"results": [{"label": "x", "score":
1.0}]}``, one result per text, and GET /readyz answers 200. What a server on this machine
costs per request before any tokenizer, batcher or model runs, so a near-free model served
by ``ferry serve`` can be compared with it.

    python benchmarks/bare_asgi_service.py --port 3200
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3200)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def classify(request: Request) -> JSONResponse:
        texts = (await request.json())["texts"]
        return JSONResponse({"results": [{"label": "x", "score": 1.0} for _ in texts]})

    async def readyz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("\n")

    app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", readyz)])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
