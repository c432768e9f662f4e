# `make run` and `make test` are all a fresh clone needs: each creates or refreshes .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.fedfm-stack
ARGS  ?=

.PHONY: venv run test compile images bench-quality bench-overhead bench-aggregate bench-secagg bench-robust clean

$(STAMP): pyproject.toml constraints.txt scripts/install-stack.sh
	scripts/install-stack.sh $(VENV)
	touch $@

venv: $(STAMP)

## run: the local federated fine-tune (embedded default; pass flags with ARGS="--rounds 5 ...")
run: venv
	$(VENV)/bin/fedfm run $(ARGS)

## test: the whole suite
test: venv
	$(PY) -m pytest $(ARGS)

## compile: the pipeline YAML for the Kubeflow UI
compile: venv
	$(VENV)/bin/fedfm compile --output pipeline.yaml $(ARGS)

## images: the component and operator images, with docker or podman (IMAGE_TAG, REGISTRY to override)
REGISTRY  ?= ghcr.io/fedfm
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE    ?= $(shell command -v docker || command -v podman)
images:
	@test -n "$(ENGINE)" || { echo "make images needs docker or podman; none is installed here" >&2; exit 1; }
	$(ENGINE) build -f Containerfile -t $(REGISTRY)/fedfm:$(IMAGE_TAG) .
	$(ENGINE) build -f Containerfile.operator -t $(REGISTRY)/fedfm-operator:$(IMAGE_TAG) .

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

clean:
	rm -rf $(VENV) runs pipeline.yaml .pytest_cache
