# One entry point for people and CI. Everything installs itself on first use (hack/install-deps.sh).
VENV ?= .venv
PYTEST := $(VENV)/bin/pytest
PY := $(VENV)/bin/python

.PHONY: deps test test-unit test-libvirt test-e2e lock bench demo demo-down audit

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

## The operator on embedded defaults: local control plane, agent on libvirt's test driver
## (LIBVIRT_URI=qemu:///system for real guests), examples/ applied and Ready. Left running.
demo: deps
	$(PY) hack/demo.py up

demo-down:
	$(PY) hack/demo.py down

## Benchmarks (bench/README.md); QUICK=1 for small N.
bench: deps
	$(PY) bench/run_all.py $(if $(QUICK),--quick)

## Known vulnerabilities in the locked dependencies.
audit: deps
	$(VENV)/bin/pip-audit --strict --vulnerability-service pypi --disable-pip --no-deps -r requirements.lock
