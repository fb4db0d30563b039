#!/usr/bin/env bash
# Install what husk needs on a Debian 12 host; idempotent (installs only what
# is missing, runs `apt-get update` only when something must be installed).
# Run as root (`make setup`). Non-interactive.
set -euo pipefail

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    qemu-system-x86          # the hypervisor (microvm machine, TCG or KVM)
    linux-source-6.1         # guest kernel source (guest/kernel/build.sh)
    build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils file
    busybox-static           # test images
    runc                     # benchmark baseline
    podman conmon            # e2e: podman --runtime husk (conmon drives the runtime)
    containerd               # e2e: containerd 1.6 + ctr with the husk shim
    tar                      # e2e: the busybox image for podman (podman import)
    protobuf-compiler        # agent protocol code generation
    libseccomp-dev libcap-ng-dev   # building virtiofsd
    python3                  # guest/initrd/build.sh
    iproute2                 # e2e: test network namespaces, veths, bridges
    slirp4netns              # e2e: podman --network slirp4netns (podman does not pull it in)
    containernetworking-plugins  # e2e: CNI bridge/host-local/loopback (ctr run --cni, CRI)
    docker.io                # e2e: a private dockerd --add-runtime husk (docker.service is stopped)
)

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get and cargo install need it here)"
command -v dpkg-query >/dev/null || die "not a Debian-like host (no dpkg-query)"

say "checking Debian packages: ${PACKAGES[*]}"
missing=()
for p in "${PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    say "all packages present"
else
    say "missing: ${missing[*]}"
    say "apt-get update"
    apt-get update -q
    say "apt-get install ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The e2e tests start a private dockerd of their own; the package's system
# daemon must not run beside it (nor come back at boot).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker.service 2>/dev/null; then
    say "stopping and disabling docker.service (the tests run a private dockerd)"
    systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
fi

say "checking virtiofsd"
if command -v virtiofsd >/dev/null 2>&1; then
    say "virtiofsd present: $(command -v virtiofsd)"
elif [ -x "$HOME/.cargo/bin/virtiofsd" ]; then
    say "virtiofsd present: $HOME/.cargo/bin/virtiofsd"
elif [ -x /usr/libexec/virtiofsd ]; then
    say "virtiofsd present: /usr/libexec/virtiofsd"
else
    command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] \
        || die "cargo not found; install Rust (rustup) first, then re-run"
    CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
    say "cargo install virtiofsd --locked (from crates.io; takes ~3 minutes)"
    "$CARGO" install virtiofsd --locked
    say "virtiofsd installed: $HOME/.cargo/bin/virtiofsd"
fi

say "host ready"
