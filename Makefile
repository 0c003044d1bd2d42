# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diode-installed
EXTRAS_STAMP := $(VENV)/.diode-extras-installed

.PHONY: demo test setup browser clean-venv

setup: $(STAMP)

# (Re)create the venv when it is missing, broken, or older than the pinned requirements.
$(STAMP): requirements.lock pyproject.toml
	@if ! $(PY) -c "import sys; assert sys.version_info[:2] >= (3, 10)" 2>/dev/null; then \
		rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The test suite also covers the optional ultralytics adapter (pinned in requirements-extras.lock).
$(EXTRAS_STAMP): $(STAMP) requirements-extras.lock
	$(PY) -m pip install -q -r requirements-extras.lock -c requirements.lock
	touch $(EXTRAS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/diode demo

# The report test renders HTML in headless Chromium (Debian package `chromium`).
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)

test: $(EXTRAS_STAMP) browser
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
