# Two commands for a newcomer on a fresh Debian machine:
#   make run    install, create ./var if needed, serve DICOM on port 11112 and DICOMweb (with the
#               OHIF viewer) on 127.0.0.1:8080
#   make test   install what the tests need, run them
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HOME_DIR ?= var
# dcmtk: the DICOM clients the tests drive; orthanc: the interop peer and benchmark baseline (orthanc-gdcm:
# its JPEG 2000 decoder, for the transcoding C-GET benchmark);
# systemd: systemd-analyze checks the shipped units; openssh-server: the ssh off-site target;
# chromium: renders the auditor report and the OHIF viewer headless in tests; fuse3: libfuse 3 and
# fusermount3 for the power-cut file system of the tests; strace: the benchmarks count each DICOM peer's
# syncs per stored instance; orthanc-dicomweb: Orthanc's DICOMweb plugin, the DICOMweb interop peer and
# benchmark baseline.
DEBIAN_PACKAGES := dcmtk rsync orthanc orthanc-gdcm orthanc-dicomweb systemd openssh-server chromium fuse3 strace
# The OHIF viewer (`serve` shows it at /viewer with dicomweb.viewer: true): the npm package's built dist/,
# into a directory git ignores. playwright-core (no browser of its own) drives Debian's chromium in the
# viewer's test.
OHIF_VERSION := 3.13.2
VIEWER_DIR := appliance/web/ohif
PLAYWRIGHT_VERSION := 1.65.2
NODE_DIR := tests/web/node

.PHONY: run test bench deps apt venv viewer npm

$(VENV)/.installed: pyproject.toml
	@python3 -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory apt APT_PACKAGES="python3-venv python3-pip"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

npm:
	@command -v npm >/dev/null || $(MAKE) --no-print-directory apt APT_PACKAGES="npm"

$(VIEWER_DIR)/index.html:
	@$(MAKE) --no-print-directory npm
	tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null) \
	  && rm -rf $(VIEWER_DIR) && mkdir -p $(VIEWER_DIR) \
	  && tar -xzf $$tmp/*.tgz -C $(VIEWER_DIR) --strip-components=2 package/dist && rm -rf $$tmp
	touch $@

$(NODE_DIR)/node_modules/playwright-core/package.json:
	@$(MAKE) --no-print-directory npm
	npm install --silent --no-save --no-package-lock --prefix $(NODE_DIR) playwright-core@$(PLAYWRIGHT_VERSION)

viewer: $(VIEWER_DIR)/index.html

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

run: venv viewer
	@[ -f $(HOME_DIR)/appliance.yaml ] || { $(VENV)/bin/appliance --home $(HOME_DIR) init \
	  && sed -i 's/^  viewer: false/  viewer: true/' $(HOME_DIR)/appliance.yaml; }
	$(VENV)/bin/appliance --home $(HOME_DIR) serve --port 11112 --dicomweb-port 8080

test: deps venv viewer $(NODE_DIR)/node_modules/playwright-core/package.json
	$(PY) -m pytest -q

bench: deps venv
	$(PY) benchmarks/suite.py
