# `make run` and `make test` are all a fresh clone needs: each creates or refreshes .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.fedfm-stack
ARGS  ?=

.PHONY: venv run test compile bench-quality bench-overhead clean

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

bench-quality: venv
	$(PY) bench/quality.py $(ARGS)

bench-overhead: venv
	$(PY) bench/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) runs pipeline.yaml .pytest_cache
