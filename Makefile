# Two commands for a newcomer on a fresh Debian machine:
#   make run    install, create ./var if needed, serve DICOM on port 11112
#   make test   install what the tests need, run them
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HOME_DIR ?= var
# dcmtk: the DICOM clients the tests drive; orthanc: the interop peer and benchmark baseline (orthanc-gdcm:
# its JPEG 2000 decoder, for the transcoding C-GET benchmark);
# systemd: systemd-analyze checks the shipped units; openssh-server: the ssh off-site target;
# chromium: renders the auditor report headless in a test; fuse3: libfuse 3 and fusermount3 for the
# power-cut file system of the tests; strace: the benchmarks count each DICOM peer's syncs per stored instance.
DEBIAN_PACKAGES := dcmtk rsync orthanc orthanc-gdcm systemd openssh-server chromium fuse3 strace

.PHONY: run test bench deps apt venv

$(VENV)/.installed: pyproject.toml
	@python3 -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory apt APT_PACKAGES="python3-venv python3-pip"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests need, installed when missing.
deps:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(DEBIAN_PACKAGES)"

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: venv
	@[ -f $(HOME_DIR)/appliance.yaml ] || $(VENV)/bin/appliance --home $(HOME_DIR) init
	$(VENV)/bin/appliance --home $(HOME_DIR) serve --port 11112

test: deps venv
	$(PY) -m pytest -q

bench: deps venv
	$(PY) benchmarks/suite.py
