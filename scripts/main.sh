#!/usr/bin/env bash
# The main job: teacher on the server, then two federations of students (labels only vs rank
# distillation) through Flower's simulation runtime, compared in one table. Extra arguments go
# to `fedrank simulate` (e.g. --data ../shared/data/MQ2008/Fold1 --clients 10 --rounds 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the venv's programs (flwr, flower-superlink, flower-supernode) come first on PATH
export PATH="$PWD/.venv/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/fedrank simulate --out runs/main "$@"
