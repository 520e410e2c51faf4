"""`vtfuse ask|match|retrieve|embed|models`: call the running API from the command line and print JSON.

Every command takes the same connection options: `--url` (HTTP, the default) or `--grpc
HOST:PORT`, `--api-key` (env VTFUSE_API_KEY), `--tls` / `--ca-cert PEM`, `--timeout` and
`--retries`. Needs only the client's dependencies (httpx, grpcio, protobuf).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from serving.client.errors import ApiConnectionError, ApiError
from serving.client.retry import Retry

COMMANDS = ("ask", "match", "retrieve", "embed", "models")


def _client(args: argparse.Namespace) -> Any:
    """The sync HTTP or gRPC client the options describe."""
    retry = Retry(max_retries=args.retries)
    if args.grpc:
        from serving.client.grpc_client import VtfuseGrpcClient

        return VtfuseGrpcClient(
            args.grpc, timeout=args.timeout, api_key=args.api_key, retry=retry, tls=args.tls, ca_cert=args.ca_cert
        )
    from serving.client.http_client import VtfuseClient

    url = args.url
    if (args.tls or args.ca_cert) and url.startswith("http://"):
        url = "https://" + url[len("http://") :]
    return VtfuseClient(url, timeout=args.timeout, api_key=args.api_key, retry=retry, ca_cert=args.ca_cert)


def _call(args: argparse.Namespace) -> Any:
    with _client(args) as c:
        if args.command == "ask":
            return c.vqa(args.image, args.questions, top_k=args.top_k, model=args.model)
        if args.command == "match":
            return c.match(args.image, args.texts, model=args.model)
        if args.command == "retrieve":
            if args.text is not None:
                return c.retrieve_images(args.text, args.candidates, top_k=args.top_k, model=args.model)
            if not args.candidates:
                raise SystemExit("vtfuse retrieve: give IMAGE TEXT... (rank texts), or --text TEXT IMAGE... (images)")
            image, *texts = args.candidates
            return c.retrieve_texts(image, texts, top_k=args.top_k, model=args.model)
        if args.command == "embed":
            if not args.images and not args.texts:
                raise SystemExit("vtfuse embed: give --image FILE and/or --text TEXT (each repeatable)")
            return c.embed(images=args.images or None, texts=args.texts or None, model=args.model)
        return c.models()


def run(args: argparse.Namespace) -> int:
    """Make the call and print its result as JSON (`ask` prints one line per answer unless --json)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result = _call(args)
    except ApiConnectionError as e:
        print(f"error: {e.message} (start the API with `make serve`, or point --url / --grpc at it)", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unreadable image or CA file
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "ask" and not args.json:
        for a in result.answers:
            prefix = f"{a.question}: " if len(result.answers) > 1 else ""
            extra = ", ".join(f"{t.answer} {t.score:.2f}" for t in a.top_k[1:])
            print(f"{prefix}{a.answer} ({a.score:.2f}{'; ' + extra if extra else ''})")
        return 0
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    default_url = os.environ.get("VTFUSE_URL", f"http://127.0.0.1:{os.environ.get('API_PORT', '8080')}")
    g.add_argument("--url", default=default_url, help="HTTP API base URL (env VTFUSE_URL; default %(default)s)")
    g.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        default=os.environ.get("VTFUSE_GRPC") or None,
        help="use the gRPC API at this address instead of HTTP, e.g. 127.0.0.1:9000 (env VTFUSE_GRPC)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("VTFUSE_API_KEY") or None,
        help="API key, sent as X-API-Key (gRPC: x-api-key metadata); env VTFUSE_API_KEY",
    )
    g.add_argument("--tls", action="store_true", help="TLS: https for --url, a TLS channel for --grpc")
    g.add_argument("--ca-cert", metavar="PEM", help="trust this CA file instead of the system's (implies --tls)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per try (default %(default)s)")
    g.add_argument(
        "--retries", type=int, default=3, help="retries of 429/503 and failed connections (default %(default)s)"
    )
    g.add_argument("--model", default=None, help="served model name (default: the server's default)")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client subcommands: ask, match, retrieve, embed, models."""
    common = [_connection_options()]
    p = sub.add_parser("ask", parents=common, help="ask the running API questions about an image file (VQA)")
    p.add_argument("image", help="PNG, JPEG or WebP file")
    p.add_argument("questions", nargs="+", help="one or more questions")
    p.add_argument("--top-k", type=int, default=1, help="also return the next best answers")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.set_defaults(func=run, command="ask")

    p = sub.add_parser("match", parents=common, help="ITM probability of each text for an image (JSON)")
    p.add_argument("image", help="PNG, JPEG or WebP file")
    p.add_argument("texts", nargs="+", help="one or more texts")
    p.set_defaults(func=run, command="match")

    p = sub.add_parser(
        "retrieve",
        parents=common,
        help="rank texts for an image (IMAGE TEXT...) or images for a text (--text TEXT IMAGE...) (JSON)",
    )
    p.add_argument("candidates", nargs="*", metavar="IMAGE TEXT... | IMAGE...", help="the image, then the texts")
    p.add_argument("--text", help="rank the IMAGE files for this text instead")
    p.add_argument("--top-k", type=int, default=1, help="how many best candidates to return")
    p.set_defaults(func=run, command="retrieve")

    p = sub.add_parser("embed", parents=common, help="embeddings of images and/or texts (JSON)")
    p.add_argument("--image", dest="images", action="append", default=[], metavar="FILE", help="repeatable")
    p.add_argument("--text", dest="texts", action="append", default=[], metavar="TEXT", help="repeatable")
    p.set_defaults(func=run, command="embed")

    p = sub.add_parser("models", parents=common, help="the served models, their tasks and engines (JSON)")
    p.set_defaults(func=run, command="models")
