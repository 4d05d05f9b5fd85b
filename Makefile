# The two commands of the README:
#   make run   install segnode and run it with its embedded defaults
#   make test  install everything the tests need (pip + Debian peers) and run them
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
APT_PACKAGES = dcmtk dicom3tools orthanc orthanc-dicomweb rabbitmq-server chromium nodejs npm plastimatch

.PHONY: run test install install-test peers bench soak wheel clean viewer

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e .

install-test: $(BIN)/python peers
	$(BIN)/pip install -e '.[dl,test]'
	cd tests/js && npm ci --no-audit --no-fund --ignore-scripts  # OHIF's SEG reader, pinned by package-lock.json
	$(MAKE) viewer

# the OHIF Viewer the node serves under /viewer/ (@ohif/app's built dist/; version and integrity in viewer/package-lock.json)
viewer:
	cd viewer && npm ci --no-audit --no-fund --ignore-scripts

# Debian peers the tests use as scanners, PACS and validators; installed only when missing.
peers:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v plastimatch >/dev/null || missing="$$missing plastimatch"; \
	command -v Orthanc  >/dev/null || missing="$$missing orthanc"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v npm      >/dev/null || missing="$$missing nodejs npm"; \
	test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	test -x /usr/lib/rabbitmq/bin/rabbitmq-server || missing="$$missing rabbitmq-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  policy=""; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=1; \
	  fi; \
	  (apt-get update -q || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  status=$$?; [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; exit $$status; \
	fi

run: install
	$(BIN)/segnode -v serve

test: install-test
	$(BIN)/pytest -q

# dist/: the sdist and the wheel pip builds from it, as tests/test_install.py builds and tests them
# (the Dockerfiles build theirs the same way)
wheel: $(BIN)/python
	$(BIN)/pip install -q 'setuptools>=77' wheel
	rm -rf dist && $(BIN)/python -c 'from setuptools import build_meta as b; b.build_sdist("dist")'
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist dist/segnode-*.tar.gz

bench: install
	$(BIN)/python bench/bench_run.py

# soak and chaos run (docs/reliability.md): MINUTES of mixed traffic with every fault, then the books balanced
MINUTES ?= 20
soak: install
	$(BIN)/python bench/soak.py --minutes $(MINUTES) --out bench/out/soak

clean:
	rm -rf $(VENV) out build dist *.egg-info
