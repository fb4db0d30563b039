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
AGENT_BIN := target/$(AGENT_TARGET)/release/husk-agent
PREFIX ?= /usr/local

.PHONY: all setup build agent kernel initrd guest install demo test test-unit test-e2e bench lint clean-cache

all: build guest

## setup: install missing host packages (Debian) and virtiofsd; idempotent
setup:
	@scripts/setup-host.sh

## build: host binaries (husk)
build:
	cargo build --release -p husk

## agent: the static guest agent (glibc crt-static)
agent:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p husk-agent --target $(AGENT_TARGET)

## kernel: the guest kernel (cached in $(HUSK_CACHE)/kernel)
kernel:
	@guest/kernel/build.sh $(GUEST_DIR)/vmlinux

## initrd: cpio with the agent as /init
initrd: agent
	@guest/initrd/build.sh $(AGENT_BIN) $(GUEST_DIR)/initrd.img

guest: kernel initrd

