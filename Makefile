# Two commands: `make setup` (as root, on Debian 12) and `make test`.
PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard proto/agentgate/v1/*.proto)
GEN_STAMP := agentgate/v1/__init__.py

.PHONY: setup host venv proto ext test bench clean

setup: host venv proto ext

# apt packages, kernel headers link, tracefs/bpffs mounts (root only; idempotent)
host:
	@bash scripts/setup-host.sh

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	@echo "setup: installing agentgate (editable) with test extras into $(VENV)"
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# protobuf + gRPC modules for package agentgate.v1, generated from proto/
$(GEN_STAMP): $(PROTOS) $(VENV)/.installed
	@echo "setup: generating gRPC modules from proto/"
	@mkdir -p agentgate/v1
	@$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	@echo '"""Generated from proto/agentgate/v1 by `make proto`; do not edit."""' > $@

proto: $(GEN_STAMP)

# The compiled twins of byte-level loops (Cython, next to their pure-Python twins, which
# stay in use where these are not built; tests hold the two identical)
PYX := $(wildcard hostagent/*/_*.pyx hostagent/protocols/*/_*.pyx)
EXT_STAMP := $(VENV)/.ext

$(EXT_STAMP): $(PYX) $(wildcard hostagent/*/_*.pxd) $(VENV)/.installed
	@echo "setup: compiling $(PYX) (Cython)"
	@$(VENV)/bin/cythonize -3 -q -i $(PYX)
	@touch $@

ext: $(EXT_STAMP)

test: setup-check
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup-check
	$(PY) bench/ingest.py

.PHONY: setup-check
setup-check:
	@test -f $(GEN_STAMP) -a -f $(EXT_STAMP) || { echo "run 'make setup' first (as root)" >&2; exit 2; }

clean:
	rm -rf $(VENV) agentgate/v1 build *.egg-info .pytest_cache $(PYX:.pyx=.c) $(PYX:.pyx=.*.so)
