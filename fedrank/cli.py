"""The ``fedrank`` command: one dispatcher, each subcommand in the module that owns the work.

The dispatcher is the one module that names every layer (``fedrank.common`` ...
``fedrank.simulations``), so it lives above them all, in the root package, and nothing
imports it. It names each subcommand's module by string and imports only the one asked for:
``fedrank score`` on a device starts without loading the server's or the simulations'
modules (and their dependencies).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from fedrank.common.errors import FedrankError

# name -> (module, function, one-line help); each function takes argv and returns an exit code
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("fedrank.common.data_cli", "main", "inspect data: `fedrank data stats|qrels PATH`"),
    "teacher": (
        "fedrank.server.teacher_cli",
        "main",
        "train or import a teacher; write its score table",
    ),
    "simulate": (
        "fedrank.simulations.simulate",
        "main",
        "run a federated simulation and compare students",
    ),
    "export": (
        "fedrank.client.export",
        "export_main",
        "export the global student (safetensors or onnx)",
    ),
    "score": (
        "fedrank.client.score_cli",
        "score_main",
        "rank each set's items with an exported student",
    ),
    "sweep": ("fedrank.simulations.sweep", "main", "sweep loss weights over a scenario"),
    "report": ("fedrank.simulations.report", "main", "tables and plots from finished runs"),
    "certs": (
        "fedrank.server.certs",
        "main",
        "make a local CA, SuperLink certificate and SuperNode keys",
    ),
    "gateway": ("fedrank.server.fleet_gateway", "main", "serve only the Fleet API on the network"),
    "fleet": ("fedrank.server.fleet", "main", "a local fleet: `fedrank fleet up|status|down`"),
}


def _usage() -> str:
    lines = ["usage: fedrank COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"fedrank: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except FedrankError as err:  # a user mistake: one clear line, no traceback
        print(f"fedrank {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedrank {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
