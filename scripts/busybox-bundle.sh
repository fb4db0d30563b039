#!/usr/bin/env bash
# busybox-bundle.sh DIR CMD [ARGS...]
# Creates (or refreshes) an OCI bundle in DIR: a busybox-static rootfs and a
# config.json that runs CMD ARGS. Used by `make demo` and `make bench`.
set -euo pipefail
dir=${1:?usage: busybox-bundle.sh DIR CMD [ARGS...]}
shift
[ $# -gt 0 ] || { echo "busybox-bundle.sh: no command given" >&2; exit 2; }
bb=/bin/busybox
[ -x "$bb" ] || { echo "busybox-bundle.sh: $bb not found: install busybox-static (make setup)" >&2; exit 1; }
root="$dir/rootfs"
if [ ! -x "$root/bin/busybox" ]; then
  mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc,root}
  cp "$bb" "$root/bin/busybox"
  for name in $("$bb" --list); do
    [ "$name" = busybox ] || ln -sf busybox "$root/bin/$name"
  done
  echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"
fi
args=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@")
cat > "$dir/config.json" <<JSON
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": $args,
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
    "cwd": "/",
    "noNewPrivileges": true
  },
  "root": {"path": "rootfs", "readonly": false},
  "hostname": "husk",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
  ],
  "linux": {
    "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]
  }
}
JSON
