#!/bin/bash
# VM templates against runc, in one run (docs/performance.md, "VM templates"):
#   - template build time and its size on disk;
#   - `husk run true` vs `runc run` (same busybox bundle), medians of N runs;
#   - N sandboxes created+started in parallel (sandboxes per second) vs runc;
#   - host PSS per idle sandbox (every process naming the sandboxes' root:
#     QEMU and the monitor), averaged over N idle `sleep` sandboxes, vs runc.
# Usage: benches/templates_vs_runc.sh HUSK_BIN GUEST_DIR [N]   (root)
set -euo pipefail
HUSK_BIN=$1 GUEST_DIR=$2 N=${3:-20}
W=$(mktemp -d /tmp/husk-bench-tpl.XXXXXX)
cleanup() {
	for i in $(seq 1 "$N"); do
		"$HUSK_BIN" --config "$W/husk.toml" --root "$W/root" delete -f "p$i" >/dev/null 2>&1 || true
		runc --root "$W/runc" delete -f "rp$i" >/dev/null 2>&1 || true
	done
	umount -R "$W" 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/b/rootfs/bin" "$W/root" "$W/runc"
cp /bin/busybox "$W/b/rootfs/bin/"
for c in sh true sleep; do ln -s busybox "$W/b/rootfs/bin/$c"; done
mkdir -p "$W/b/rootfs/"{proc,sys,dev,tmp}
cat > "$W/husk.toml" <<T
[hypervisor]
kernel = "$GUEST_DIR/vmlinux"
initrd = "$GUEST_DIR/initrd.img"
[template]
dir = "$W/templates"
T
H() { "$HUSK_BIN" --config "$W/husk.toml" --root "$W/root" "$@"; }
(cd "$W/b" && H spec)
args() { python3 -c "import json,sys; p='$W/b/config.json'; c=json.load(open(p)); c['process']['terminal']=False; c['process']['args']=sys.argv[1:]; json.dump(c,open(p,'w'))" "$@"; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

s=$(date +%s%N); H template build >/dev/null; echo "template build: $(ms "$s") ms (husk template build, cold page cache not forced)"
H template show | sed 's/^/  /'

args true
h=$(for i in $(seq 1 "$N"); do s=$(date +%s%N); H run --bundle "$W/b" "m$i" >/dev/null; ms "$s"; done | med)
r=$(for i in $(seq 1 "$N"); do s=$(date +%s%N); runc --root "$W/runc" run -b "$W/b" "r$i" >/dev/null; ms "$s"; done | med)
echo "run true, median of $N: husk $h ms, runc $r ms, ratio $(awk "BEGIN {printf \"%.1f\", $h/$r}")"

args sleep 100000
s=$(date +%s%N)
for i in $(seq 1 "$N"); do (H create --bundle "$W/b" "p$i" </dev/null >/dev/null 2>&1 && H start "p$i") & done; wait
ht=$(ms "$s")
s=$(date +%s%N)
for i in $(seq 1 "$N"); do runc --root "$W/runc" run -d -b "$W/b" "rp$i" </dev/null >/dev/null 2>&1 & done; wait
rt=$(ms "$s")
echo "$N started in parallel: husk $ht ms ($(awk "BEGIN {printf \"%.1f\", $N*1000/$ht}")/s), runc $rt ms ($(awk "BEGIN {printf \"%.1f\", $N*1000/$rt}")/s), ratio $(awk "BEGIN {printf \"%.1f\", $ht/$rt}")"
sleep 5
pss() { local t=0 k; for p in "$@"; do k=$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0); t=$((t + ${k:-0})); done; echo "$t"; }
hp=$(pss $(pgrep -f "$W/root"))
q=$(pss $(pgrep -f "qemu-system.*$W/root"))
rpids=$(for i in $(seq 1 "$N"); do runc --root "$W/runc" state "rp$i" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])'; done)
rp=$(pss $rpids)
echo "idle host PSS per sandbox over $N: husk $((hp / N / 1024)) MiB (QEMU $((q / N / 1024)) MiB), runc $((rp / N)) KiB; idle sandboxes in 20 GiB: husk $((20 * 1024 * 1024 * N / hp))"
