# Every target installs what it needs first (into .venv), so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := artifacts/demo
STAMP := $(VENV)/.installed
# tritonserver's own environment (fcx serve): Triton's python backend needs numpy < 2, fcx uses numpy 2
SERVE_VENV := .venv-triton
SERVE_STAMP := $(SERVE_VENV)/.installed

.PHONY: demo test zoo bench install serve-env clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(SERVE_STAMP):
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q "numpy<2" "onnxruntime>=1.18" "nvidia-pytriton>=0.5"
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

# two workers (pytest-xdist): one per core; the serving tests need the server's environment and fail without it
test: $(STAMP) $(SERVE_STAMP)
	FCX_REQUIRE_SERVER=1 $(BIN)/python -m pytest -q -n 2

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
	rm -rf $(VENV) $(SERVE_VENV) artifacts/demo

# Every CUDA path in one run on a lent GPU machine, one report ($OUT/gpu-report.md); DRY=1: the same steps on the CPU
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(if $(DRY),--dry-run)
