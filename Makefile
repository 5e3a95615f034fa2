# The two commands users need: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# llama-cpp-python builds from its sdist; skipping LLaVA saves a fifth of the build.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export GGML_NO_BACKTRACE := 1

.PHONY: run test bench lint install install-test clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(PY) app.py

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install-test
	$(PY) -m bench.run
	$(PY) -m bench.local
	$(PY) -m bench.soak
	$(PY) -m bench.scaleout
	$(PY) -m bench.surfaces

lint: install-test
	$(VENV)/bin/ruff check --select E,F,W --ignore E501 app.py wsgi.py gunicorn.conf.py gateway providers tests bench
	$(VENV)/bin/mypy   # mypy.ini: what it checks, how strictly
	$(VENV)/bin/hadolint --no-color Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache
