# husk — top-level entry points. `make demo` and `make test` are the README contract.
#
# Guest artifacts land in target/guest/ (vmlinux, initrd.img). The kernel build is
# cached outside the repo in $(HUSK_CACHE) keyed by the config fragment and the
# linux-source package version, so a second `make guest` is instant.

SHELL := /bin/bash
HUSK_CACHE ?= /var/cache/husk
export HUSK_CACHE
GUEST_DIR := target/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
# cargo's output directory: target/, or wherever CARGO_TARGET_DIR puts it
TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
AGENT_BIN := $(TARGET_DIR)/$(AGENT_TARGET)/release/husk-agent
PREFIX ?= /usr/local

.PHONY: all setup build agent kernel initrd guest install demo test test-unit test-root test-e2e bench conformance lint clean-cache

all: build guest

## setup: install missing host packages (Debian) and virtiofsd; idempotent
setup:
	@scripts/setup-host.sh

## build: host binaries (husk, containerd-shim-husk-v2)
build:
	cargo build --release -p husk -p husk-shim

## agent: the static guest agent (glibc crt-static)
# Not position-independent: each container's init stage re-executes the agent,
# and under TCG QEMU reuses the code it already translated for the agent only
# when the binary sits at the same address (and a static-pie would also
# relocate itself on every start). Measured: exec to the stage's main
# about 40 ms -> 20 ms per container.
agent:
	RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --release -p husk-agent --target $(AGENT_TARGET)

## kernel: the guest kernel (cached in $(HUSK_CACHE)/kernel)
kernel:
	@guest/kernel/build.sh $(GUEST_DIR)/vmlinux

## initrd: cpio with the agent as /init
initrd: agent
	@guest/initrd/build.sh $(AGENT_BIN) $(GUEST_DIR)/initrd.img

guest: kernel initrd

## install: husk to $(PREFIX)/bin, the guest to $(PREFIX)/share/husk (the config defaults),
##          containerd's `husk` runtime handler snippet to $(PREFIX)/share/husk (not applied)
install: build guest
	install -D -m 0755 $(TARGET_DIR)/release/husk $(PREFIX)/bin/husk
	install -D -m 0755 $(TARGET_DIR)/release/containerd-shim-husk-v2 $(PREFIX)/bin/containerd-shim-husk-v2
	install -D -m 0644 $(GUEST_DIR)/vmlinux $(PREFIX)/share/husk/vmlinux
	install -D -m 0644 $(GUEST_DIR)/vmlinux.release $(PREFIX)/share/husk/vmlinux.release
	install -D -m 0644 $(GUEST_DIR)/initrd.img $(PREFIX)/share/husk/initrd.img
	install -D -m 0644 crates/husk-shim/dist/containerd-husk.toml $(PREFIX)/share/husk/containerd-husk.toml
	@echo "containerd: append $(PREFIX)/share/husk/containerd-husk.toml to /etc/containerd/config.toml for the CRI runtime handler husk (docs/kubernetes.md)"

DEMO_BUNDLE ?= /var/tmp/husk-demo-bundle

## demo: set up everything that is missing, then run a container in a VM
demo: setup install
	@scripts/busybox-bundle.sh $(DEMO_BUNDLE) uname -sr
	@echo "host kernel:                  $$(uname -sr)"
	@echo "kernel in the husk container: $$($(PREFIX)/bin/husk run --bundle $(DEMO_BUNDLE) husk-demo-$$$$)"

## lint: rustfmt and clippy, warnings are errors; --all-features lints the
## gated root and VM tests too
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

## test-unit: unit tests; no privileges, no VM (docs/testing.md)
test-unit:
	cargo test --workspace --exclude husk-e2e

## test-root: the tests that need root but no VM: the agent as a process,
## the share's mounts and the host cgroup
test-root:
	cargo test --no-fail-fast -p husk-agent --features root-tests --tests
	cargo test --no-fail-fast -p husk-runtime --features root-tests --test share_root --test host_cgroup_root --test net_root

## test-e2e: real VMs under QEMU (root)
test-e2e: build guest
	HUSK_BIN=$(TARGET_DIR)/release/husk HUSK_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) \
	  HUSK_SHIM_BIN=$(TARGET_DIR)/release/containerd-shim-husk-v2 \
	  cargo test --no-fail-fast -p husk-e2e --features vm-tests -- --test-threads=2

## test: every layer this machine can run
test: setup lint test-unit test-root test-e2e

## bench: husk run vs runc run, same bundle, same run; prints ratios
bench: build guest
	HUSK_BIN=$(TARGET_DIR)/release/husk HUSK_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) \
	  HUSK_SHIM_BIN=$(TARGET_DIR)/release/containerd-shim-husk-v2 \
	  cargo bench -p husk-e2e --features vm-tests --benches
	benches/templates_vs_runc.sh $(TARGET_DIR)/release/husk $(CURDIR)/$(GUEST_DIR) 20

## conformance: OCI runtime-tools validation, husk vs runc, same run (docs/conformance.md)
conformance: build guest
	HUSK_BIN=$(TARGET_DIR)/release/husk HUSK_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) scripts/conformance.sh

clean-cache:
	rm -rf $(HUSK_CACHE)/kernel
