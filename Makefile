# The two commands: `make demo` (the main job) and `make test` (what CI runs). Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, so that CPU machines never pull the CUDA wheels a bare `torch` would.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Train on 32 generated shapes (validating on 8 held-out ones), then reconstruct the held-out shapes and measure them.
demo: setup
	@test -f data/demo/manifest.json || $(BIN)/sdf-ray data synth --out data/demo --num-scenes 32 --samples-per-scene 8192 --seed 0
	@test -f data/demo-heldout/manifest.json || $(BIN)/sdf-ray data synth --out data/demo-heldout --num-scenes 8 --samples-per-scene 8192 --seed 1
	$(BIN)/sdf-ray train --config sdf_ray/configs/demo.yaml $(ARGS)
	$(BIN)/sdf-ray reconstruct --run runs/demo --data data/demo-heldout --out runs/demo/reconstructions \
	  --set reconstruct.num_iterations=200 --set reconstruct.samples_per_iteration=2000 --set reconstruct.mesh_resolution=96

lint: setup
	$(BIN)/ruff check sdf_ray tuning tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data .pytest_cache .mypy_cache .ruff_cache
