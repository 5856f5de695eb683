# Every target installs what it needs first (into .venv), so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := artifacts/demo
STAMP := $(VENV)/.installed

.PHONY: demo test zoo bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2  # two workers (pytest-xdist): one per core

zoo: $(STAMP)
	$(BIN)/python -m pytest -q -m zoo tests/test_zoo.py

demo: $(STAMP)
	$(BIN)/fcx train --data digits --epochs 15 --artifacts $(DEMO)
	$(BIN)/fcx fuse-bn --verify --artifacts $(DEMO)
	$(BIN)/fcx export --int8 --artifacts $(DEMO)
	$(BIN)/fcx verify --artifacts $(DEMO)
	$(BIN)/python -m fcexport.samples --data digits --out $(DEMO)/samples --count 4
	$(BIN)/fcx predict $(DEMO)/samples --artifacts $(DEMO)
	@echo
	@echo "Done: a verified model in $(DEMO). Next, try:"
	@echo "  $(BIN)/fcx predict YOUR_IMAGE.png --artifacts $(DEMO) --wide"
	@echo "  $(BIN)/fcx bench --artifacts $(DEMO)"
	@echo "  $(BIN)/fcx import -h        # bring your own PyTorch model"
	@echo "  $(BIN)/fcx train -h         # Fashion-MNIST, MNIST, a CSV or an image folder; --model cnn"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) artifacts/demo
