# The two set-up commands of the README:
#   make demo   installs everything and trains the smoke recipe on this machine
#   make test   installs everything, brings up a local Slurm cluster and runs the tests
#
# Where seis is installed: an active virtual environment when there is one ($VIRTUAL_ENV), else ./.venv
# (created on first use). The system interpreter is used only when asked: `make demo SYSTEM_PYTHON=1`.
ifdef SYSTEM_PYTHON
  PY := $(shell command -v python3)
  PREFIX := $(shell python3 -c 'import sys; print(sys.prefix)')
else ifdef VIRTUAL_ENV
  PREFIX := $(VIRTUAL_ENV)
  PY := $(PREFIX)/bin/python
else
  VENV ?= .venv
  PREFIX := $(abspath $(VENV))
  PY := $(PREFIX)/bin/python
endif
PIP := $(PY) -m pip
# Everything below runs as in an activated environment: jobs on the local Slurm cluster find its python3.
export PATH := $(dir $(PY)):$(PATH)
# Installed from the lock (locks/dev.txt, see `make lock`); torch is not in it (below).
LOCK ?= locks/dev.txt
STAMP := $(PREFIX)/.seis-installed
SLURM_NODES ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint slurm-up slurm-down bench lock clean

$(PY):
	python3 -m venv $(PREFIX)

# Re-installs only when the lock or pyproject.toml changed (the stamp lives in the environment).
# torch comes first and on its own: a CPU machine takes the CPU build (2.13.0) that this project is tested with,
# served by pip's own configuration; a machine that already has torch (a GPU node) keeps its own.
$(STAMP): $(LOCK) pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -c $(LOCK) -e ".[train,dev]"
	$(PIP) check
	# AWS's HyperPodPyTorchJob models, to validate rendered manifests in the tests: into a folder of their own,
	# without their dependencies (they pin old pytest/ruff/click and pull awscli and hydra), so the environment
	# above stays consistent (`pip check`). The tests load the one model file from there.
	$(PIP) install --no-deps --upgrade --target $(PREFIX)/aws-models \
	  "sagemaker-hyperpod==3.12.0"
	touch $@

install: $(STAMP)

demo: install
	$(PY) -m seiscli launch smoke

slurm-up:
	bash scripts/local-slurm.sh up --nodes $(SLURM_NODES)

slurm-down:
	bash scripts/local-slurm.sh down

# The Slurm cluster is taken down again whatever the tests do.
# Tests never reach the EC2 metadata address: boto's credential chain is kept on this machine.
test: install
	bash scripts/local-slurm.sh up --nodes $(SLURM_NODES)
	AWS_EC2_METADATA_DISABLED=true SEIS_REQUIRE_SLURM=1 SEIS_REQUIRE_SEAWEED=1 $(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	  bash scripts/local-slurm.sh down; exit $$status

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check seiscli tests benchmarks
	$(PY) -m ruff format --check seiscli tests benchmarks

bench: install
	$(PY) benchmarks/strategies_cpu.py

# Refreshes both locks from pyproject.toml with uv (a dev dependency). torch is excluded from both: CPU machines
# install the CPU build above, GPU nodes keep the CUDA build their image ships.
lock: install
	mkdir -p build && echo torch > build/lock-excludes.txt
	$(PY) -m uv pip compile pyproject.toml --extra train --extra dev --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --excludes build/lock-excludes.txt -o locks/dev.txt
	$(PY) -m uv pip compile pyproject.toml --extra train --extra viewers --universal --python-version 3.11 \
	  --excludes build/lock-excludes.txt -c locks/dev.txt -o locks/train.txt

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
