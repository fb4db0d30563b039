#!/usr/bin/env bash
# Build (or fetch from cache) the husk guest kernel.
#
#   guest/kernel/build.sh OUT            e.g. target/guest/vmlinux
#
# Source: Debian's linux-source-6.1 package (/usr/src/linux-source-6.1.tar.xz),
# unpacked into the cache, never into the repo. Config: `make tinyconfig`, then
# guest/kernel/config-fragment merged on top with allnoconfig semantics (a
# symbol the fragment does not ask for stays off). Output: the uncompressed
# `vmlinux` ELF, which QEMU boots directly through its PVH entry point.
#
# Cache: $HUSK_CACHE/kernel/<key>/{vmlinux,release,config,build.log}, where
# key = sha256(fragment + linux-source-6.1 package version + this script).
# A cache hit is a copy. A cold build takes about 5-6 minutes on 2 cores.
#
# Environment: HUSK_CACHE (default /var/cache/husk), JOBS (default nproc).
set -euo pipefail

say() { printf '[kernel] %s\n' "$*"; }
die() { printf '[kernel] ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT   (e.g. target/guest/vmlinux)"
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$HERE/config-fragment"
CACHE=${HUSK_CACHE:-/var/cache/husk}
JOBS=${JOBS:-$(nproc)}
PKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz

[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
PKGVER=$(dpkg-query -W -f='${Version}' "$PKG" 2>/dev/null || true)
if [ -z "$PKGVER" ] || [ ! -f "$TARBALL" ]; then
    die "$PKG is not installed ($TARBALL missing). Run 'make setup' (or: apt-get install $PKG)."
fi
for tool in make gcc bc bison flex xz tar sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found. Run 'make setup'."
done

KEY=$( { cat "$FRAGMENT"; printf '%s\n' "$PKG=$PKGVER"; cat "$SELF"; } | sha256sum | cut -d' ' -f1)
KDIR="$CACHE/kernel/$KEY"
OUTDIR=$(dirname "$OUT")

install_out() {
    mkdir -p "$OUTDIR"
    cp -f "$KDIR/vmlinux" "$OUT.tmp.$$" && mv -f "$OUT.tmp.$$" "$OUT"
    cp -f "$KDIR/release" "$OUTDIR/vmlinux.release"
}

if [ -f "$KDIR/vmlinux" ] && [ -f "$KDIR/release" ]; then
    install_out
    say "cached: $(cat "$KDIR/release") (key ${KEY:0:16}...) -> $OUT"
    exit 0
fi

say "no cached kernel for key ${KEY:0:16}... ($PKG $PKGVER)"
say "cold build: unpack ~15 s (once per package version), configure ~10 s, compile ~5-6 min on 2 cores"
mkdir -p "$CACHE/kernel" 2>/dev/null || die "cannot create $CACHE/kernel (run as root, or set HUSK_CACHE to a writable directory)"

# One build at a time per cache (the build tree below is shared).
exec 9>"$CACHE/kernel/.lock"
if ! flock -n 9; then
    say "another kernel build holds $CACHE/kernel/.lock; waiting"
    flock 9
fi
if [ -f "$KDIR/vmlinux" ] && [ -f "$KDIR/release" ]; then
    install_out
    say "cached (built meanwhile): $(cat "$KDIR/release") -> $OUT"
    exit 0
fi

T0=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)); }

# 1. Unpack the source once per package version (pristine: we build with O=).
SRC="$CACHE/src/$PKG-$PKGVER"
if [ ! -f "$SRC/.husk-unpacked" ]; then
    say "step 1/4: unpacking $TARBALL into $SRC (~15 s)"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xJf "$TARBALL" -C "$SRC.tmp" --strip-components=1
    touch "$SRC.tmp/.husk-unpacked"
    mv "$SRC.tmp" "$SRC"
    say "unpacked in $(elapsed)"
else
    say "step 1/4: source already unpacked in $SRC"
fi

# Object tree, shared between keys of the same package version so a fragment
# tweak rebuilds only what changed (kbuild tracks per-symbol dependencies).
BUILD="$CACHE/kernel/build-$PKGVER"
mkdir -p "$BUILD"
LOG="$BUILD/build.log"
: >"$LOG"
KMAKE=(make -C "$SRC" O="$BUILD" ARCH=x86_64 LOCALVERSION=
       KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk KBUILD_BUILD_VERSION=1
       "KBUILD_BUILD_TIMESTAMP=$PKG $PKGVER")

# 2. Configure: tinyconfig, then the fragment with allnoconfig semantics.
say "step 2/4: configuring (tinyconfig + config-fragment, ~10 s)"
rm -f "$BUILD/.config"
"${KMAKE[@]}" tinyconfig >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "make tinyconfig failed (log: $LOG)"; }
(cd "$BUILD" && ARCH=x86_64 "$SRC/scripts/kconfig/merge_config.sh" -m .config "$FRAGMENT") >>"$LOG" 2>&1 \
    || { tail -n 30 "$LOG" >&2; die "merge_config.sh failed (log: $LOG)"; }
# merge_config -m only concatenates; resolve with allnoconfig semantics.
cp "$BUILD/.config" "$BUILD/.config.merged"
"${KMAKE[@]}" KCONFIG_ALLCONFIG="$BUILD/.config.merged" allnoconfig >>"$LOG" 2>&1 \
    || { tail -n 30 "$LOG" >&2; die "make allnoconfig failed (log: $LOG)"; }

# Every option the fragment sets must end up exactly so.
say "checking that every option of the fragment survived"
bad=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]}
        if ! grep -qxF -- "$line" "$BUILD/.config"; then
            got=$(grep -E "^(# )?${sym}[= ]" "$BUILD/.config" || echo "absent")
            bad+=("$line  (got: $got)")
        fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        if got=$(grep -E "^$sym=" "$BUILD/.config"); then
            bad+=("$line  (got: $got)")
        fi
    fi
done <"$FRAGMENT"
if [ ${#bad[@]} -gt 0 ]; then
    printf '[kernel] ERROR: %d option(s) of %s did not end up in the final .config:\n' "${#bad[@]}" "$FRAGMENT" >&2
    printf '[kernel]   %s\n' "${bad[@]}" >&2
    die "fix the fragment (missing dependency?); final config: $BUILD/.config"
fi
say "config ok"

# 3. Compile vmlinux, streaming make's output to the log with a progress line.
say "step 3/4: compiling vmlinux with -j$JOBS (~5-6 min cold, seconds if only a few options changed); log: $LOG"
T1=$SECONDS
"${KMAKE[@]}" -j"$JOBS" vmlinux >>"$LOG" 2>&1 &
mpid=$!
trap 'kill "$mpid" 2>/dev/null || true' EXIT INT TERM
while kill -0 "$mpid" 2>/dev/null; do
    for _ in 1 2 3 4 5 6; do
        sleep 5
        kill -0 "$mpid" 2>/dev/null || break 2
    done
    n=$(grep -cE '^  (CC|AS|LD|AR)' "$LOG" || true)
    say "... compiling, $(elapsed) elapsed, $n objects so far, last: $(tail -n 1 "$LOG" | cut -c1-70)"
done
if ! wait "$mpid"; then
    trap - EXIT INT TERM
    tail -n 40 "$LOG" >&2
    die "kernel build failed after $(elapsed) (log: $LOG)"
fi
trap - EXIT INT TERM
say "compiled in $((SECONDS - T1)) s"
# `make kernelrelease` is only right once include/config/auto.conf exists.
RELEASE=$("${KMAKE[@]}" -s kernelrelease 2>>"$LOG")
case $RELEASE in *-husk) ;; *) die "unexpected kernel release '$RELEASE' (CONFIG_LOCALVERSION lost?)" ;; esac

# 4. Store in the cache (atomically), then copy to OUT.
say "step 4/4: storing in $KDIR"
mkdir -p "$KDIR.tmp"
cp "$BUILD/vmlinux" "$KDIR.tmp/vmlinux"
printf '%s\n' "$RELEASE" >"$KDIR.tmp/release"
cp "$BUILD/.config" "$KDIR.tmp/config"
cp "$LOG" "$KDIR.tmp/build.log"
rm -rf "$KDIR"
mv "$KDIR.tmp" "$KDIR"
install_out
say "done in $(elapsed): $RELEASE -> $OUT ($(du -h "$OUT" | cut -f1))"
