#!/usr/bin/env bash
# Build the husk guest initrd: an uncompressed newc cpio holding
#
#   /init                the static husk-agent (mode 0755)
#   /dev/console         char 5,1 (the kernel opens it for init's stdio)
#   /proc /sys /dev /run /tmp /etc /root   empty directories (/ itself 0755)
#
# and nothing else (no shell, no busybox). Every entry is owned by 0:0 with
# mtime 0, so the same agent always gives the same bytes. Needs no root and no
# root-owned files: the archive is written by python3 directly.
#
#   guest/initrd/build.sh AGENT OUT     e.g. target/.../husk-agent target/guest/initrd.img
set -euo pipefail

die() { printf '[initrd] ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 AGENT OUT"
AGENT=$1
OUT=$2

[ -e "$AGENT" ] || die "agent binary '$AGENT' not found (build it first: make agent)"
[ -f "$AGENT" ] || die "'$AGENT' is not a regular file"
command -v python3 >/dev/null || die "python3 not found (run 'make setup')"
mkdir -p "$(dirname "$OUT")"

python3 - "$AGENT" "$OUT" <<'PY'
import os, struct, sys

agent, out = sys.argv[1], sys.argv[2]

def fail(msg):
    sys.stderr.write("[initrd] ERROR: %s\n" % msg)
    sys.exit(1)

data = open(agent, "rb").read()

# The agent must be a static x86-64 ELF executable: no PT_INTERP (there is no
# dynamic loader or libc in the initrd). static-pie (ET_DYN, no PT_INTERP) is fine.
if data[:4] != b"\x7fELF":
    fail("%s is not an ELF binary" % agent)
if data[4] != 2 or data[5] != 1:
    fail("%s is not a 64-bit little-endian ELF" % agent)
e_type, e_machine = struct.unpack_from("<HH", data, 16)
if e_machine != 62:
    fail("%s is not an x86-64 binary (e_machine=%d)" % (agent, e_machine))
if e_type not in (2, 3):
    fail("%s is not an executable (e_type=%d)" % (agent, e_type))
e_phoff, = struct.unpack_from("<Q", data, 32)
e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
if e_phnum == 0:
    fail("%s has no program headers" % agent)
dynamic = False
for i in range(e_phnum):
    p_type, = struct.unpack_from("<I", data, e_phoff + i * e_phentsize)
    if p_type == 3:  # PT_INTERP
        off, = struct.unpack_from("<Q", data, e_phoff + i * e_phentsize + 8)
        size, = struct.unpack_from("<Q", data, e_phoff + i * e_phentsize + 32)
        interp = data[off:off + size].rstrip(b"\0").decode(errors="replace")
        fail("%s is dynamically linked (interpreter %s); build it static, e.g. "
             "RUSTFLAGS='-C target-feature=+crt-static' (make agent)" % (agent, interp))
    if p_type == 2:  # PT_DYNAMIC
        dynamic = True
if dynamic and e_type == 2:
    fail("%s has a dynamic section but no interpreter; not a usable static binary" % agent)

ino = [720]
def entry(name, mode, body=b"", rdev=(0, 0), nlink=1):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    hdr = "070701" + "".join("%08X" % v for v in (
        ino[0], mode, 0, 0, nlink, 0, len(body), 0, 0, rdev[0], rdev[1], len(name_b), 0))
    rec = hdr.encode() + name_b
    rec += b"\0" * (-len(rec) % 4)
    rec += body
    rec += b"\0" * (-len(rec) % 4)
    return rec

S_IFDIR, S_IFREG, S_IFCHR = 0o040000, 0o100000, 0o020000
parts = [entry(".", S_IFDIR | 0o755, nlink=2)]  # else the rootfs root is 1777
for d, perm in (("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
                ("run", 0o755), ("sys", 0o555), ("tmp", 0o1777)):
    parts.append(entry(d, S_IFDIR | perm, nlink=2))
parts.append(entry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))
parts.append(entry("init", S_IFREG | 0o755, data))
parts.append(entry("TRAILER!!!", 0))
blob = b"".join(parts)
blob += b"\0" * (-len(blob) % 512)

tmp = "%s.tmp.%d" % (out, os.getpid())
with open(tmp, "wb") as f:
    f.write(blob)
os.replace(tmp, out)
PY

printf '[initrd] %s: /init <- %s (%s bytes), uncompressed newc cpio\n' \
    "$OUT" "$AGENT" "$(stat -c %s "$OUT")"
