"""`vtfuse`: one CLI: train, export, import-hf, triton, serve, tune; the client: ask, match, retrieve, embed, models."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from serving import __version__

# Each module registers its subcommands; the names here let `vtfuse ask ...` import only the
# client, and name the extra a missing command needs.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "export.cli": (("train", "export"), "export"),
    "export.hf.cli": (("import-hf",), "export"),
    "loadtests.tune": (("tune",), "checkout"),  # a benchmark: it lives with the load drivers, in the checkout
    "serving.triton.cli": (("triton",), "server"),
    "serving.app.cli": (("serve",), "server"),
    "serving.client.cli": (("ask", "match", "retrieve", "embed", "models", "caption"), "client"),
}


def _missing(names: tuple[str, ...], extra: str, error: ImportError) -> Callable[[argparse._SubParsersAction], None]:
    """A registrar for commands whose module cannot be imported: they exit naming the extra to install."""

    def fail(args: argparse.Namespace) -> int:
        if extra == "checkout":
            print(f"vtfuse {args.command}: runs from the repository checkout, with loadtests/ on PYTHONPATH ({error})",
                  file=sys.stderr)
            return 3
        print(
            f"vtfuse {args.command}: needs the `{extra}` extra ({error}): pip install 'vtfuse[{extra}]' "
            "(from a checkout: pip install -e '.[server,export,dev]')",
            file=sys.stderr,
        )
        return 3

    def register(sub: argparse._SubParsersAction) -> None:
        for name in names:
            p = sub.add_parser(name, help=f"(needs `pip install 'vtfuse[{extra}]'`)", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=fail)

    return register


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; each registers its own arguments."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vtfuse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vtfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # Export-side commands live in export/ (which depends on serving, never the reverse);
    # a module whose extra is not installed (a client-only install has no Ray, Triton client
    # or torch) still lists its commands, which then say what to install.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    modules = [m for m, (names, _) in COMMANDS.items() if wanted in names] or list(COMMANDS)
    if wanted is None and "--version" in argv:
        modules = []
    for module in modules:
        try:
            registrar = importlib.import_module(module).register
        except ImportError as e:
            logging.getLogger(__name__).debug("%s unavailable: %s", module, e)
            registrar = _missing(*COMMANDS[module], e)
        registrar(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
