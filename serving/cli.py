"""`vtfuse`: one CLI behind the Makefile: train, export, triton, serve, ask, bench."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; each registers its own arguments."""
    parser = argparse.ArgumentParser(prog="vtfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # Export-side commands live in export/ (which depends on serving, never the reverse):
    # they are imported only when the torch-based pipeline is installed.
    try:
        from export.cli import register as register_export
    except ImportError:  # a serving-only install has no export extra
        register_export = None
    if register_export is not None:
        register_export(sub)
    from serving.triton.cli import register as register_triton

    register_triton(sub)
    try:
        from serving.app.cli import register as register_app
    except ImportError:
        register_app = None
    if register_app is not None:
        register_app(sub)
    try:
        from serving.client.cli import register as register_client
    except ImportError:
        register_client = None
    if register_client is not None:
        register_client(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
