#!/usr/bin/env bash
# conformance.sh [--build-only] [TEST...]
#
# The OCI runtime-tools validation suite against husk and runc, on this
# machine, in the same run (`make conformance`). Prints one line per test
# (runc, husk), a summary per runtime, and exits non-zero when a test that
# passes for runc fails for husk without an explanation in
# tools/conformance/expected-differences.
#
# - Installs golang-go and the Debian Go packages the suite needs (apt-get,
#   only what is missing).
# - Fetches the runtime-tools source package (Debian's binary package leaves
#   validation/ and cmd/runtimetest out) with `apt-get source
#   --download-only` through a private apt configuration (its own
#   sources.list with one deb-src line for $RT_SUITE on the system's Debian
#   mirror, its own state and cache dirs): the system's sources stay as
#   they are.
# - Builds it in GOPATH mode against Debian's golang-*-dev packages, with
#   tools/conformance/tap-go standing in for github.com/mndrix/tap-go, which
#   Debian lacks; runtimetest is static (CGO_ENABLED=0). The build is cached
#   in $HUSK_CACHE/conformance/<source version>-<tap-go hash>.
# - Runs each validation test (all of them, or the TESTs named) with
#   RUNTIME=runc and RUNTIME=husk, each behind a wrapper that gives the
#   runtime its own --root (and husk a config naming the repo's guest).
#   Results: $HUSK_CACHE/conformance/results/<runtime>/<test>.{tap,err,rc}.
#
# Inputs: HUSK_CACHE (/var/cache/husk), HUSK_BIN (target/release/husk),
# HUSK_GUEST_DIR (target/guest), RUNTIMES ("runc husk"), TEST_TIMEOUT
# (seconds per test, 600), HUSK_DEBIAN_MIRROR (default: the system's).
set -euo pipefail

RT_PKG=golang-github-opencontainers-runtime-tools
RT_VERSION=0.9.0.109.ge931285-1
RT_SUITE=trixie
RT_UPSTREAM=${RT_VERSION%-*}
GO_PKGS=(golang-go golang-github-google-uuid-dev golang-github-mrunalp-fileutils-dev
  golang-github-opencontainers-specs-dev golang-github-opencontainers-selinux-dev
  golang-github-hashicorp-go-multierror-dev golang-github-blang-semver-dev
  golang-github-sirupsen-logrus-dev golang-github-xeipuuv-gojsonschema-dev
  golang-gocapability-dev golang-golang-x-sys-dev golang-github-urfave-cli-dev)

repo=$(cd "$(dirname "$0")/.." && pwd)
HUSK_CACHE=${HUSK_CACHE:-/var/cache/husk}
HUSK_BIN=${HUSK_BIN:-$repo/target/release/husk}
HUSK_GUEST_DIR=${HUSK_GUEST_DIR:-$repo/target/guest}
RUNTIMES=${RUNTIMES:-runc husk}
TEST_TIMEOUT=${TEST_TIMEOUT:-600}
base=$HUSK_CACHE/conformance

log() { echo "[conformance] $*" >&2; }
die() { echo "conformance: $*" >&2; exit 1; }

build_only=false
if [ "${1:-}" = --build-only ]; then build_only=true; shift; fi
[ "$(id -u)" = 0 ] || die "run as root (the runtimes create containers): sudo make conformance"

# --- packages -----------------------------------------------------------
missing=()
for p in "${GO_PKGS[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- source -------------------------------------------------------------
tap_hash=$(cat "$repo"/tools/conformance/tap-go/*.go | sha256sum | cut -c1-12)
build=$base/$RT_UPSTREAM-$tap_hash
src=$build/gopath/src/github.com/opencontainers/runtime-tools

orig=${RT_PKG}_$RT_UPSTREAM.orig.tar.xz
download=$base/download

fetch_source() {
  local apt=$base/apt
  # The mirror of the system's own release (e.g. bookworm, not -security).
  local codename mirror
  codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
  # shellcheck disable=SC2016 # apt's own $(FIELD) syntax
  mirror=${HUSK_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' |
    awk -v c="$codename" '$2 == c { print $1; exit }')}
  [ -n "$mirror" ] || die "no Debian mirror in the system's apt sources: set HUSK_DEBIAN_MIRROR"
  mkdir -p "$apt"/etc/sources.list.d "$apt"/etc/preferences.d "$apt"/lists/partial \
    "$apt"/cache/archives/partial "$download"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $RT_SUITE main" \
    > "$apt"/etc/sources.list
  local o=(-o "Dir::Etc::SourceList=$apt/etc/sources.list"
    -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
    -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    -o "APT::Sandbox::User=root")
  log "fetching $RT_PKG $RT_VERSION (source, $RT_SUITE) through a private apt configuration"
  apt-get "${o[@]}" -qq update
  local uris want
  uris=$(apt-get "${o[@]}" source --print-uris "$RT_PKG=$RT_VERSION" | grep "^'") \
    || die "$RT_PKG $RT_VERSION is not in $RT_SUITE's sources"
  # The .dsc may not be served; the tarball is what we build from, and its
  # hash comes from the signed Sources index.
  (cd "$download" && apt-get "${o[@]}" -qq source --download-only "$RT_PKG=$RT_VERSION" >/dev/null 2>&1) || true
  want=$(awk -v f="$orig" '$2 == f { sub(/^SHA256:/, "", $4); print $4 }' <<<"$uris")
  [ -f "$download/$orig" ] || die "could not download $orig"
  echo "$want  $download/$orig" | sha256sum -c --quiet - || {
    rm -f "$download/$orig"
    die "$orig does not match the Sources index"
  }
}

unpack_source() {
  rm -rf "$src"
  mkdir -p "$(dirname "$src")"
  tar -xf "$download/$orig" -C "$(dirname "$src")"
  mv "$(dirname "$src")/$RT_PKG-$RT_UPSTREAM" "$src"
}

build_suite() {
  log "building runtime-tools $RT_UPSTREAM in $build"
  local gp=$build/gopath
  rm -rf "$gp/src/github.com/mndrix" "$gp/src/github.com/blang"
  mkdir -p "$gp/src/github.com/mndrix" "$gp/src/github.com/blang/semver"
  cp -r "$repo/tools/conformance/tap-go" "$gp/src/github.com/mndrix/tap-go"
  # Debian installs blang/semver v4 without the /v4 directory GOPATH needs.
  ln -s /usr/share/gocode/src/github.com/blang/semver "$gp/src/github.com/blang/semver/v4"
  (
    cd "$src"
    export GOPATH=$gp:/usr/share/gocode GO111MODULE=off GOCACHE=$build/gocache GOFLAGS=
    go test github.com/mndrix/tap-go >/dev/null
    CGO_ENABLED=0 go build -tags "netgo osusergo" -o runtimetest ./cmd/runtimetest
    for t in validation/*/; do
      t=${t%/}
      [ "$t" = validation/util ] && continue
      go build -o "$t/$(basename "$t").t" "./$t"
    done
  )
  touch "$build/built"
}

if [ ! -f "$build/built" ]; then
  [ -f "$download/$orig" ] || fetch_source
  # Builds for other versions of tap-go or the source are stale.
  for old in "$base/$RT_UPSTREAM"-*; do
    [ "$old" = "$build" ] || rm -rf "$old"
  done
  unpack_source
  build_suite
else
  log "using the suite built in $build"
fi
$build_only && exit 0

# --- run ----------------------------------------------------------------
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  for t in "$src"/validation/*/*.t; do tests+=("$(basename "$t" .t)"); done
fi

results=$base/results
run=$(mktemp -d /tmp/husk-conformance.XXXXXX)
# The bundles live below: a container's mapped root must be able to pass.
chmod 0755 "$run"
declare -A runtime_cmd
# On any exit (also an interrupted run) remove what the runtimes still
# hold, then the run directory.
# shellcheck disable=SC2317 # called by the EXIT trap
finish() {
  local r dir
  for r in "${!runtime_cmd[@]}"; do
    for dir in "$run/root-$r"/*; do
      [ -e "$dir" ] && "${runtime_cmd[$r]}" delete --force "${dir##*/}" >/dev/null 2>&1
    done
  done
  if unmount_under "$run"; then
    rm -rf "$run"
  else
    log "not removing $run: still mounted: $(mounts_under "$run" | tr '\n' ' ')"
  fi
}
trap finish EXIT
trap "exit 130" INT
trap "exit 143" TERM

# A RUNTIME for the suite: COMMAND... plus the verb's arguments. A failing
# `delete` is recorded in $CONFORMANCE_CALLS (the suite's cleanup only
# says "exit status 1").
wrapper() { # NAME COMMAND...
  local w=$run/bin/$1
  mkdir -p "$run/bin" "$run/root-$1"
  shift
  cat > "$w" <<EOF
#!/bin/bash
[ "\$1" = delete ] || exec $* "\$@"
err=\$(mktemp)
$* "\$@" 2>"\$err"
rc=\$?
cat "\$err" >&2
[ \$rc = 0 ] || echo "\$(basename "\$0") \$*: exit \$rc: \$(cat "\$err")" >> "\${CONFORMANCE_CALLS:-/dev/null}"
rm -f "\$err"
exit \$rc
EOF
  chmod +x "$w"
  echo "$w"
}

for r in $RUNTIMES; do
  case $r in
    runc)
      command -v runc >/dev/null || die "runc not found: apt-get install runc"
      runtime_cmd[runc]=$(wrapper runc "$(command -v runc)" --root "$run/root-runc")
      ;;
    husk)
      [ -x "$HUSK_BIN" ] || die "$HUSK_BIN not found: make build"
      for f in vmlinux initrd.img; do
        [ -f "$HUSK_GUEST_DIR/$f" ] || die "$HUSK_GUEST_DIR/$f not found: make guest"
      done
      printf '[hypervisor]\nkernel = "%s"\ninitrd = "%s"\n' \
        "$HUSK_GUEST_DIR/vmlinux" "$HUSK_GUEST_DIR/initrd.img" > "$run/husk.toml"
      runtime_cmd[husk]=$(wrapper husk "$HUSK_BIN" --root "$run/root-husk" --config "$run/husk.toml")
      ;;
    *) die "unknown runtime $r (runc, husk)" ;;
  esac
done

# TAP of one test -> passed | failed | skipped. Failed: it exited non-zero,
# printed no plan or fewer test points than planned, a "not ok" that is
# not TODO, or (the lifecycle and hook tests, which print the plan 1..0 and
# report a problem only as a YAML block) an "error" without test points.
# Skipped: every test point is a SKIP. A test that prints nothing at all
# reports by its exit status alone (process_capabilities_fail,
# process_rlimits_fail).
classify() { # TAPFILE RC
  local tap=$1 rc=$2
  [ "$rc" = 0 ] || { echo failed; return; }
  [ -s "$tap" ] || { echo passed; return; }
  awk '
    /^1\.\.[0-9]+/ { split($1, p, "\\.\\."); plan = p[2] + 0; planned = 1 }
    /^(ok|not ok) [0-9]+/ {
      n++
      if ($0 ~ /^not ok/ && $0 !~ /# TODO/) bad++
      if ($0 ~ /^ok [0-9]+ # SKIP/) skip++
    }
    /^ +"error": "[^"]/ { errors++ }
    END {
      if (!planned || n < plan || bad || (n == 0 && errors)) print "failed"
      else if (n > 0 && skip == n) print "skipped"
      else print "passed"
    }' "$tap"
}

# Mount points at or below DIR in this mount namespace.
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}

# Unmounts everything below DIR, deepest first; fails if something stays.
unmount_under() {
  local m
  for _ in 1 2 3; do
    for m in $(mounts_under "$1" | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-); do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    [ -z "$(mounts_under "$1")" ] && return 0
  done
  return 1
}

# What a test left behind: the runtime's containers (state entries, and
# for husk processes naming its root) and mounts below the test's TMPDIR,
# where the suite makes its bundles (runc leaks the mounts of a shared
# rootfsPropagation into the host's namespace).
leftovers() { # RUNTIME TMPDIR
  local root=$run/root-$1 left=""
  if [ "$1" = husk ] && pgrep -f -- "$root" >/dev/null; then
    left="processes: $(pgrep -af -- "$root" | cut -c1-120 | tr '\n' ';')"
  fi
  local entries=("$root"/*)
  [ -e "${entries[0]}" ] && left="$left state: ${entries[*]##*/}"
  local mounts
  mounts=$(mounts_under "$2" | tr '\n' ' ')
  [ -n "$mounts" ] && left="$left mounts: $mounts"
  echo "$left"
}

# Removes a test's containers and bundles. A TMPDIR that keeps a mount is
# left alone (never remove files through a mount) and named.
cleanup() { # RUNTIME TMPDIR
  local dir
  for dir in "$run/root-$1"/*; do
    [ -e "$dir" ] && "${runtime_cmd[$1]}" delete --force "${dir##*/}" >/dev/null 2>&1
  done
  if unmount_under "$2"; then
    rm -rf "$2"
  else
    log "not removing $2: still mounted: $(mounts_under "$2" | tr '\n' ' ')"
  fi
}

declare -A result
for r in $RUNTIMES; do mkdir -p "$results/$r"; done
log "running ${#tests[@]} tests with: $RUNTIMES (results in $results)"
for t in "${tests[@]}"; do
  exe=$src/validation/$t/$t.t
  [ -x "$exe" ] || die "no validation test $t"
  line=$(printf '%-36s' "$t")
  for r in $RUNTIMES; do
    out=$results/$r/$t
    start=$(date +%s%N)
    set +e
    # The suite finds runtimetest and rootfs-amd64.tar.gz in its working dir.
    rm -f "$out.calls"
    tmp=$run/tmp/$r-$t
    mkdir -p "$tmp"
    (cd "$src" && TMPDIR=$tmp RUNTIME=${runtime_cmd[$r]} CONFORMANCE_CALLS=$out.calls \
      timeout -k 10 "$TEST_TIMEOUT" "$exe") >"$out.tap" 2>"$out.err" </dev/null
    rc=$?
    set -e
    echo "$rc" > "$out.rc"
    res=$(classify "$out.tap" "$rc")
    [ "$rc" = 124 ] && echo "timed out after $TEST_TIMEOUT s" >> "$out.err"
    left=$(leftovers "$r" "$tmp")
    if [ -n "$left" ]; then
      echo "left behind: $left" >> "$out.err"
      [ -f "$out.calls" ] && cat "$out.calls" >> "$out.err"
      res="$res(leak)"
    fi
    cleanup "$r" "$tmp"
    result[$r/$t]=$res
    ms=$((($(date +%s%N) - start) / 1000000))
    line="$line $(printf '%-5s %3d.%ds %-14s' "$r" $((ms / 1000)) $((ms % 1000 / 100)) "$res")"
  done
  echo "$line"
done

echo
status=0
for r in $RUNTIMES; do
  p=0 f=0 s=0
  for t in "${tests[@]}"; do
    case ${result[$r/$t]} in
      passed) p=$((p + 1)) ;;
      skipped) s=$((s + 1)) ;;
      *) f=$((f + 1)) ;;
    esac
  done
  echo "$r: $p passed, $f failed, $s skipped"
done

# A test that passes for runc and not for husk is explained by
# tools/conformance/expected-differences ("TEST vm|tcg|bug REASON"). Unlisted
# differences, leaks and known bugs make the run fail.
if [[ " $RUNTIMES " == *" runc "* && " $RUNTIMES " == *" husk "* ]]; then
  expected=$repo/tools/conformance/expected-differences
  {
    echo "| test | runc | husk |"
    echo "| --- | --- | --- |"
    for t in "${tests[@]}"; do echo "| $t | ${result[runc/$t]} | ${result[husk/$t]} |"; done
  } > "$results/table.md"
  for t in "${tests[@]}"; do
    if [ "${result[runc/$t]}" = passed ] && [ "${result[husk/$t]}" != passed ]; then
      kind="" why=""
      read -r kind why < <(awk -v t="$t" '$1 == t { $1 = ""; sub(/^ /, ""); print; exit }' "$expected") || true
      [[ ${result[husk/$t]} == *leak* ]] && kind=leak
      case $kind in
        vm) echo "passes for runc, not for husk: $t: not possible in a VM: $why" ;;
        tcg) echo "passes for runc, not for husk: $t: timing under TCG: $why" ;;
        bug)
          echo "passes for runc, not for husk: $t: KNOWN HUSK BUG: $why"
          status=1
          ;;
        *)
          echo "passes for runc, not for husk: $t (${result[husk/$t]}): UNEXPLAINED (see $results/husk/$t.tap and .err)"
          status=1
          ;;
      esac
    fi
  done
  echo "table: $results/table.md"
fi
exit $status
