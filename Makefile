PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install --quiet -e '.[test]'
	# pytorch-fid is only an oracle for the Frechet distance; --no-deps keeps it from pulling
	# torchvision (which does not import beside torch 2.13 here) and another torch.
	$(BIN)/pip install --quiet --no-deps pytorch-fid==0.3.0
	# torch-fidelity's Inception module is the independent torch reference of tests/test_inception.py;
	# --no-deps for the same reason (its package __init__ is never run).
	$(BIN)/pip install --quiet --no-deps torch-fidelity==0.4.0
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m sigmavae_jax.demo $(ARGS)

bench: setup
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/op_profile.py --layers
	$(BIN)/python bench/tpu_dry_run.py

clean:
	rm -rf $(VENV)
