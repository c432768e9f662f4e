# `make run` and `make test` are all a fresh clone needs: each creates or refreshes .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.fedfm-stack
ARGS  ?=

.PHONY: venv run test compile images lock bench-quality bench-overhead bench-aggregate bench-secagg bench-robust bench-scale clean

$(STAMP): pyproject.toml constraints.txt scripts/install-stack.sh
	scripts/install-stack.sh $(VENV)
	touch $@

venv: $(STAMP)

## run: the local federated fine-tune (embedded default; pass flags with ARGS="--rounds 5 ...")
run: venv
	$(VENV)/bin/fedfm run $(ARGS)

## test: the whole suite, on TEST_WORKERS processes (pytest-xdist; the cluster tests share one worker and one
## control plane), with the slowest tests listed at the end
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(ARGS)

## compile: the pipeline YAML for the Kubeflow UI
compile: venv
	$(VENV)/bin/fedfm compile --output pipeline.yaml $(ARGS)

## images: the component and operator images, with docker or podman (ENGINE, REGISTRY, IMAGE_TAG to override);
## offline (no registry reachable) from a Debian base made from Debian's archive and a wheelhouse filled here
images: venv
	scripts/build-images.sh

## lock: requirements.lock, the files the images install with their sha256 (run after changing constraints.txt)
lock: venv
	$(PY) scripts/lock-stack.py

bench-quality: venv
	$(PY) bench/quality.py $(ARGS)

bench-overhead: venv
	$(PY) bench/overhead.py $(ARGS)

bench-aggregate: venv
	$(PY) bench/aggregate.py $(ARGS)

bench-secagg: venv
	$(PY) bench/secagg.py $(ARGS)

bench-robust: venv
	$(PY) bench/robust.py $(ARGS)

bench-scale: venv
	$(PY) bench/scale.py $(ARGS)

clean:
	rm -rf $(VENV) runs pipeline.yaml .pytest_cache
