# One entry point for people and CI. Everything installs itself on first use (hack/install-deps.sh).
VENV ?= .venv
PYTEST := $(VENV)/bin/pytest
PY := $(VENV)/bin/python

.PHONY: deps test test-unit test-libvirt test-e2e lock bench demo demo-down

deps:
	bash hack/install-deps.sh

## The whole suite: unit, libvirt and e2e tiers.
test: deps
	$(PYTEST) -q -p no:cacheprovider

test-unit: deps
	$(PYTEST) -q -m unit

test-libvirt: deps
	$(PYTEST) -q -m libvirt

test-e2e: deps
	$(PYTEST) -q -m e2e

## Re-pin requirements.lock from the current virtualenv after changing pyproject.toml.
lock:
	$(VENV)/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
