"""The ``fedrank`` command: one dispatcher, each subcommand in the module that owns the work.

Subcommand modules are imported lazily, so a device that has only ``common`` and ``client``
installed can run ``fedrank score`` without the server's dependencies.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from common.errors import FedrankError

# name -> (module, function, one-line help); each function takes argv and returns an exit code
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("common.data_cli", "main", "inspect data: `fedrank data stats|qrels PATH`"),
    "teacher": ("server.teacher_cli", "main", "train or import a teacher; write its score table"),
    "simulate": ("simulations.simulate", "main", "run a federated simulation and compare students"),
    "export": ("client.export", "export_main", "export the global student (safetensors or onnx)"),
    "score": ("client.score_cli", "score_main", "rank each set's items with an exported student"),
    "sweep": ("simulations.sweep", "main", "sweep loss weights over a scenario"),
    "report": ("simulations.report", "main", "tables and plots from finished runs"),
    "certs": ("server.certs", "main", "make a local CA, SuperLink certificate and SuperNode keys"),
    "gateway": ("server.fleet_gateway", "main", "serve only the Fleet API on the network"),
    "fleet": ("server.fleet", "main", "a local fleet: `fedrank fleet up|status|down`"),
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
