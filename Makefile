# The two set-up commands of the README:
#   make demo   installs everything and trains the smoke recipe on this machine
#   make test   installs everything, brings up a local Slurm cluster and runs the tests
PY ?= python3
PIP ?= $(PY) -m pip
SLURM_NODES ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint slurm-up slurm-down bench clean

# torch is installed on its own first: a CPU machine takes the CPU build (2.13.0) that this project
# is tested with; a machine that already has torch (a GPU node) keeps its own.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[train,dev]"
	# AWS's HyperPodPyTorchJob models, to validate rendered manifests in the tests. Without its dependencies:
	# it pins old pytest/ruff/click and pulls awscli and hydra, none of which the models need.
	$(PIP) install --no-deps "sagemaker-hyperpod==3.12.0"

demo: install
	seis launch smoke

slurm-up:
	bash scripts/local-slurm.sh up --nodes $(SLURM_NODES)

slurm-down:
	bash scripts/local-slurm.sh down

# The Slurm cluster is taken down again whatever the tests do.
# Tests never reach the EC2 metadata address: boto's credential chain is kept on this machine.
test: install
	bash scripts/local-slurm.sh up --nodes $(SLURM_NODES)
	AWS_EC2_METADATA_DISABLED=true SEIS_REQUIRE_SLURM=1 $(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	  bash scripts/local-slurm.sh down; exit $$status

test-fast:
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

lint:
	ruff check seiscli tests benchmarks
	ruff format --check seiscli tests benchmarks

bench:
	$(PY) benchmarks/strategies_cpu.py

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
