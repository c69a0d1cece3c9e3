# Two commands do all the set-up on a fresh machine (README, Quickstart):
#   make demo   the end-to-end distillation demo (DEMO_ARGS="--force" runs it again)
#   make test   the whole test suite, multi-process and cluster tests included
# Both are idempotent: stamps under .venv/ make a second run skip every install.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# The CPU wheel on machines without a GPU. On a GPU cluster install your CUDA torch into
# the venv first (or pass TORCH_SPEC="torch==2.13.0" with your index): an importable
# torch is never replaced.
TORCH_SPEC ?= torch==2.13.0
# Debian packages the cluster tests start for real: sshd + pdsh (deepspeed's default
# runner), Open MPI and MPICH (mpirun + mpi4py), munge + SLURM (sbatch/srun).
APT_PACKAGES := openssh-server openssh-client pdsh openmpi-bin libopenmpi-dev mpich libmpich-dev munge slurm-wlm
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test install system-deps clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -c constraints.txt ninja
	# DeepSpeed's setup.py imports torch: an isolated build would fetch a second (CUDA) torch.
	$(VPY) -m pip install -q --no-build-isolation -c constraints.txt deepspeed
	$(VPY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

system-deps: $(VENV)/.system-deps

$(VENV)/.system-deps: Makefile
	@mkdir -p $(VENV)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing Debian packages: $$missing"; \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing; \
	fi
	touch $@

demo: install
	$(VPY) -m ds_distil demo $(DEMO_ARGS)

test: install system-deps
	$(VPY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo_run demo_run_gpt2
