"""`vtfuse ask IMAGE QUESTION...`: ask the running API about an image file and print the answers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import httpx

from serving.client.errors import ApiError


def ask(args: argparse.Namespace) -> int:
    """Send the questions over HTTP (or gRPC with --grpc) and print one answer per line."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.grpc:
            from serving.client.grpc_client import VtfuseGrpcClient

            with VtfuseGrpcClient(args.grpc, timeout=args.timeout) as g:
                resp = g.vqa(args.image, args.questions, top_k=args.top_k, model=args.model or "")
            answers = [
                {
                    "question": a.question,
                    "answer": a.answer,
                    "score": a.score,
                    "top_k": [{"answer": t.answer, "score": t.score} for t in a.top_k],
                }
                for a in resp.answers
            ]
        else:
            from serving.client.http_client import VtfuseClient

            with VtfuseClient(args.url, timeout=args.timeout) as c:
                answers = c.vqa(args.image, args.questions, top_k=args.top_k, model=args.model)["answers"]
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, httpx.HTTPError) as e:
        print(f"error: {e} (is the API running? start it with `make serve`)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answers, indent=2))
        return 0
    for a in answers:
        prefix = f"{a['question']}: " if len(answers) > 1 else ""
        extra = ", ".join(f"{t['answer']} {t['score']:.2f}" for t in a["top_k"][1:])
        print(f"{prefix}{a['answer']} ({a['score']:.2f}{'; ' + extra if extra else ''})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `ask` subcommand."""
    p = sub.add_parser("ask", help="ask the running API a question about an image file")
    p.add_argument("image", help="PNG, JPEG or WebP file")
    p.add_argument("questions", nargs="+", help="one or more questions")
    default_url = f"http://127.0.0.1:{os.environ.get('API_PORT', '8080')}"
    p.add_argument("--url", default=os.environ.get("VTFUSE_URL", default_url), help="API base URL (env VTFUSE_URL)")
    p.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC API at this address instead (e.g. 127.0.0.1:9000)")
    p.add_argument("--top-k", type=int, default=1, help="also print the next best answers")
    p.add_argument("--model", default=None, help="served model name (default: the server's default)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    p.set_defaults(func=ask)
