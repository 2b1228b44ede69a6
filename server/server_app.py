"""fedrank ServerApp: teacher on the server, teacher scores to the clients, global student.

One run (:func:`run_server`) reads like Flower's ``Strategy.start`` plus checkpoints: the
configuration (``[tool.flwr.app.config]`` + overrides) is validated first, so a bad key fails
before any round; :class:`~fedrank.server.federation.Federation` sets up the data, the
teacher, the student and the strategy (or resumes from the checkpoint in ``out-dir``), runs
the rounds (each logged, appended to ``metrics.jsonl`` and checkpointed) and at the end saves
the student for devices with ``summary.json`` and the plot.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrank.common.config import FedrankConfig
from fedrank.common.errors import FedrankError
from fedrank.server.federation import Federation

__all__ = ["app", "make_server_app", "run_server"]

log = logging.getLogger("fedrank")
if not log.handlers:  # progress lines of the ServerApp, also under `flwr run`
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s fedrank: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run one federation on ``grid`` with ``run_config``; returns the summary."""
    federation = Federation(grid, FedrankConfig.from_run_config(dict(run_config)))
    first = federation.setup()
    for server_round in range(first, federation.cfg.num_server_rounds + 1):
        federation.record(federation.run_round(server_round))
    return federation.finish()


def make_server_app(runs: Sequence[Mapping[str, Any]] | None = None) -> ServerApp:
    """A ServerApp that runs one federation per entry of ``runs`` (each a dict of config
    overrides on top of the run config), one after the other on the same nodes; ``None``: one
    federation with the run config as is (what ``flwr run`` uses)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        base = dict(context.run_config)
        for overrides in runs or [{}]:
            try:
                run_server(grid, {**base, **dict(overrides)})
            except FedrankError as err:  # one clear line first; Flower marks the run failed
                log.error("run stopped: %s", err)
                raise

    return server_app


app = make_server_app()
