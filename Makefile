# ferry: `make demo` runs the main job on the embedded defaults, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nothing is fetched from a model or dataset hub at run time.
export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-image test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all]'
	touch $(STAMP)

# The whole chain on the embedded defaults: finetune, export + parity, bench, one summary.
demo: $(STAMP)
	$(BIN)/ferry pipeline --config configs/pipeline-bbc.yaml

# Image demo: MNIST 5k written once as PNG files, then EfficientNet-Lite0 fine-tuned on it.
MNIST_DIR := runs/mnist-5k
demo-image: $(STAMP)
	test -d $(MNIST_DIR) || $(BIN)/python -m finetune.images mnist $(MNIST_DIR)
	$(BIN)/ferry finetune --config configs/mnist-effnet.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
