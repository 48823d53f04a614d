PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test test-all bench ui install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ablate study --space sru_cru_order --workers 2
	$(BIN)/analysis report --experiment sru_cru_order --out reports/sru_cru_order

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/ablate bench --backbone resnet50 --batch-size 16 --image-size 112
	$(BIN)/ablate bench --backbone densenet121 --batch-size 16 --image-size 112
	$(BIN)/python benchmarks/epoch_time.py

ui: $(STAMP)
	$(BIN)/ablate ui

clean:
	rm -rf $(VENV) *.egg-info
