# swarm-grid: every target installs what it needs first (system packages, .venv, the package).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install system-packages demo test lint format bench clean install-units

install: system-packages $(VENV)/.installed

# fuse3 (fusermount3 + libfuse3) for the mount, libfuse3-dev + pkg-config + gcc to build its C
# extension (cvmfs_like/_fusell.c); squashfuse/squashfs-tools/nginx only for `make bench`.
SYSTEM_PACKAGES := fuse3 libfuse3-3 libfuse3-dev pkg-config gcc
system-packages:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES) $(EXTRA_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml setup.py cvmfs_like/_fusell.c
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# qemu and what swarm_testing/guest_image.py builds the test VM image with (busybox for
# its initramfs, syslinux + mtools + dosfstools for the boot disk, binutils for the
# KVM probe guest).
VM_PACKAGES := qemu-system-x86 qemu-utils busybox-static syslinux syslinux-common mtools dosfstools binutils
# The demo boots a VM from the test guest image.
demo: EXTRA_PACKAGES := $(VM_PACKAGES)
demo: install
	$(PY) -m swarm.demo

test: EXTRA_PACKAGES := nginx iproute2 systemd slurm-wlm munge chromium chromium-driver $(VM_PACKAGES)
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: EXTRA_PACKAGES := squashfuse squashfs-tools nginx iproute2 aria2 squid curl slurm-wlm munge $(VM_PACKAGES)
bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

# systemd units for `swarm node` and `swarm serve` (contrib/systemd, docs/NODE.md):
# `make install-units` as root, then `systemctl enable --now swarm-node`.
# UNIT_DIR: where to install; SWARM_BIN: the swarm the units run.
UNIT_DIR ?= /etc/systemd/system
SWARM_BIN ?= $(or $(shell command -v swarm),$(abspath $(VENV)/bin/swarm))
install-units:
	@test -x "$(SWARM_BIN)" || { echo "install-units: $(SWARM_BIN) is not executable (set SWARM_BIN)"; exit 2; }
	install -d "$(UNIT_DIR)"
	@for unit in contrib/systemd/*.service; do \
	  sed 's|/usr/local/bin/swarm|$(SWARM_BIN)|g' "$$unit" > "$(UNIT_DIR)/$$(basename $$unit)"; \
	  chmod 644 "$(UNIT_DIR)/$$(basename $$unit)"; \
	  echo "installed $(UNIT_DIR)/$$(basename $$unit)"; \
	done
	@if [ "$(UNIT_DIR)" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
