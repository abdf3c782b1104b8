# The two commands: `make run` and `make test`. Each sets up everything it needs first:
# the virtualenv, the Python packages (pip's wheel cache is kept between runs), the Debian
# packages the sandbox needs, and the model files (kept in ~/.cache/llmos/models).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
LLMOS := $(VENV)/bin/llmos
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# llama-cpp-python is source-only: it is compiled once into a wheel kept under ~/.cache/llmos/wheels
# (named by its version and build flags), then installed from there. It is built for the x86-64-v3
# baseline (AVX2, FMA, F16C), not -march=native: a native wheel crashes (SIGILL) on a CPU other than
# the one that built it, and some virtual machines advertise AMX that the hypervisor does not enable.
# The multimodal part is not used and costs a quarter of the build.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON
WHEELS := $(HOME)/.cache/llmos/wheels/$(shell echo '$(LLAMA_CPP_VERSION) $(CMAKE_ARGS)' | sha256sum | cut -c1-12)

.PHONY: run test setup python-deps system-deps models lint typecheck bench clean

TASK ?= What is the sum of all the prime numbers below 1000?

run: setup
	$(LLMOS) run --agent coder "$(TASK)"

test: setup lint typecheck
	$(PY) -m pytest -q

setup: system-deps python-deps models

$(PY):
	@echo "==> creating $(VENV)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(WHEELS)/.built: | $(PY)
	@echo "==> compiling llama-cpp-python $(LLAMA_CPP_VERSION) into $(WHEELS) (once: about 5 minutes)"
	$(PY) -m pip wheel --no-deps --no-cache-dir --progress-bar on -w $(WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	touch $@

$(VENV)/.installed: pyproject.toml $(WHEELS)/.built | $(PY)
	@echo "==> installing llmos and its dependencies"
	$(PY) -m pip install --progress-bar on --find-links $(WHEELS) -e ".[all,dev]"
	touch $@

python-deps: $(VENV)/.installed

system-deps:
	@missing=""; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	/sbin/ldconfig -p | grep -q libseccomp.so.2 || missing="$$missing libseccomp2"; \
	if [ -n "$$missing" ]; then \
		echo "==> installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

models: python-deps
	$(LLMOS) models pull smollm2-135m-instruct qwen2.5-coder-0.5b-instruct all-minilm-l6-v2

lint: python-deps
	$(VENV)/bin/ruff check llmos tests bench examples
	$(VENV)/bin/lint-imports

typecheck: python-deps
	$(VENV)/bin/mypy

bench: setup
	@for script in bench/*.py; do echo "==> $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
