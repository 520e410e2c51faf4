"""`vtfuse`: one CLI behind the Makefile: train, export, triton, serve, ask, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; each registers its own arguments."""
    parser = argparse.ArgumentParser(prog="vtfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # Export-side commands live in export/ (which depends on serving, never the reverse);
    # each registrar is optional so a serving-only install (no torch) still has a CLI.
    for module in (
        "export.cli",
        "export.hf.cli",
        "export.tune",
        "serving.triton.cli",
        "serving.app.cli",
        "serving.client.cli",
    ):
        try:
            registrar = importlib.import_module(module).register
        except ImportError as e:
            if module == "serving.triton.cli":
                raise
            logging.getLogger(__name__).debug("%s unavailable: %s", module, e)
            continue
        registrar(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
