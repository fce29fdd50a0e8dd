PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint format demo bench clean

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
	# the CUDA compiler plugin for the GPU dry-run tests, kept out of site-packages (every JAX
	# process that has it prints two lines on stderr); tests/test_gpu_dry_run.py puts it on PYTHONPATH
	$(BIN)/pip install --quiet --upgrade --no-deps --target $(VENV)/gpu-plugin jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
	touch $@

setup: $(VENV)/.installed

# --durations: the slowest tests close the log, so a change that slows the suite shows where
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: setup
	$(BIN)/python -m sigmavae_jax.demo $(ARGS)

bench: setup
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/model_build.py
	$(BIN)/python bench/op_profile.py --layers
	$(BIN)/python bench/tpu_dry_run.py
	$(BIN)/python bench/gpu_dry_run.py

clean:
	rm -rf $(VENV)
