"""`vtfuse ask|match|retrieve|embed|models|caption`: call the running API from the command line and print JSON.

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

COMMANDS = ("ask", "match", "retrieve", "embed", "models", "caption")
# `vtfuse caption` option → generation parameter; an option left out is not sent (the checkpoint's default).
GENERATION_OPTIONS = (
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "seed",
)


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


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    params = {name: getattr(args, name) for name in GENERATION_OPTIONS}
    if isinstance(params["early_stopping"], str) and params["early_stopping"] != "never":
        params["early_stopping"] = params["early_stopping"] == "true"
    return params


def _stream_caption(args: argparse.Namespace) -> Any:
    """Print a caption's deltas as they arrive (to stderr with --json, whose stdout is the result alone)."""
    out = sys.stderr if args.json else sys.stdout
    printed = False
    with _client(args) as c, c.caption_stream(args.image, args.prompt, args.model, **_generation(args)) as stream:
        try:
            for event in stream:
                if event.delta:
                    print(event.delta, end="", file=out, flush=True)
                    printed = True
        finally:
            if printed:  # end the line, also before an error's message or after Ctrl+C
                print(file=out, flush=True)
    return stream.result


def _call(args: argparse.Namespace) -> Any:
    if args.command == "caption" and args.stream:
        return _stream_caption(args)
    with _client(args) as c:
        if args.command == "caption":
            return c.caption(args.image, args.prompt, args.model, **_generation(args))
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
    """Make the call and print its result as JSON (`ask` and `caption` print lines of text unless --json)."""
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
    except KeyboardInterrupt:  # the stream was closed on the way out: the server frees the slot
        return 130
    if args.command == "caption" and not args.json:
        if not args.stream:  # a stream printed its text already
            print(result.caption)
        return 0
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
    """Add the client subcommands: ask, match, retrieve, embed, models, caption."""
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

    p = sub.add_parser(
        "caption",
        parents=common,
        help="caption an image file (generated token by token; --stream prints the tokens as they come)",
        description="Caption an image. Each generation option left out takes the checkpoint's default "
        "(its generation config); the server checks the values.",
    )
    p.add_argument("image", help="PNG, JPEG or WebP file")
    p.add_argument("--prompt", help='text the caption starts with, e.g. "a picture of" (the caption includes it)')
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON (with --stream: at the end)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens generated after the prompt")
    g.add_argument("--min-new-tokens", type=int, metavar="N", help="hold the end token back until this many")
    g.add_argument("--num-beams", type=int, metavar="K", help="beam search width (1: greedy; not with --stream)")
    g.add_argument(
        "--do-sample", action=argparse.BooleanOptionalAction, default=None, help="sample instead of the best token"
    )
    g.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (> 0)")
    g.add_argument("--top-k", type=int, metavar="K", help="sample among the K best tokens (0: all)")
    g.add_argument("--top-p", type=float, metavar="P", help="sample among the best tokens of mass P, in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="> 1 discourages repeating tokens")
    g.add_argument("--no-repeat-ngram-size", type=int, metavar="N", help="no n-gram of this size twice")
    g.add_argument("--length-penalty", type=float, metavar="L", help="beam search: score / length ** L")
    g.add_argument("--early-stopping", choices=["true", "false", "never"], help="beam search stopping rule")
    g.add_argument("--seed", type=int, metavar="S", help="makes a sampled caption reproducible")
    p.set_defaults(func=run, command="caption")
