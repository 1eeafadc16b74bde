#!/bin/bash
# Rendered by seis 0.1.0 for recipe smoke: this machine, 2 process(es).
# Resolved recipe: /shared/runs/smoke/20261124-120000/recipe.yaml
set -euo pipefail

export SEIS_RUN_DIR=/shared/runs/smoke/20261124-120000
export OMP_NUM_THREADS=1

exec SEIS_PYTHON -m torch.distributed.run --standalone --nproc_per_node=2 \
  --log-dir=/shared/runs/smoke/20261124-120000/logs/ranks --tee=3 \
  -m seiscli.train /shared/runs/smoke/20261124-120000/recipe.yaml --run-dir /shared/runs/smoke/20261124-120000
