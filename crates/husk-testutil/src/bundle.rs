//! Busybox bundles: a root filesystem from the host's busybox-static and a
//! runc-like default `config.json` (what `scripts/busybox-bundle.sh` makes
//! for the demo).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::TempDir;

/// The host's static busybox (`busybox-static`, installed by `make setup`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Fills `rootfs` with a busybox-static root filesystem: `/bin/busybox`, a
/// symlink per applet, the usual empty directories and a root-only
/// `/etc/passwd` and `/etc/group`.
pub fn busybox_rootfs(rootfs: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "home"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    let bb = Path::new(BUSYBOX);
    assert!(
        bb.is_file(),
        "{BUSYBOX} not found: install busybox-static (make setup)"
    );
    std::fs::copy(bb, rootfs.join("bin/busybox")).unwrap();
    let list = Command::new(bb).arg("--list").output().unwrap();
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        if name != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(name));
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
}

/// The default OCI spec of every test: runc-like (the mounts of `runc
/// spec`), root, `args` as the process, the rootfs at `rootfs` relative to
/// the bundle, and pid/ipc/uts/mount/network namespaces (as `runc spec`:
/// husk refuses a list without a network namespace). Tests edit the value.
pub fn default_spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
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
    })
}

/// A busybox bundle in its own [`TempDir`]: `rootfs/` and `config.json`.
pub struct Bundle {
    dir: TempDir,
    pub spec: Value,
}

impl Bundle {
    /// A busybox rootfs and [`default_spec`] running `args`, saved.
    pub fn busybox(args: &[&str]) -> Bundle {
        let dir = TempDir::new("bundle");
        busybox_rootfs(&dir.path().join("rootfs"));
        let b = Bundle {
            dir,
            spec: default_spec(args),
        };
        b.save();
        b
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Sets `linux.resources` to `resources`.
    pub fn set_resources(&mut self, resources: Value) {
        self.spec["linux"]["resources"] = resources;
    }

    /// Adds a namespace of `kind` (`cgroup`, `user`, ...) to `linux.namespaces`.
    pub fn add_namespace(&mut self, kind: &str) {
        self.spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("linux.namespaces is a list")
            .push(json!({ "type": kind }));
    }

    /// Appends `mount` to `mounts`.
    pub fn add_mount(&mut self, mount: Value) {
        self.spec["mounts"]
            .as_array_mut()
            .expect("mounts is a list")
            .push(mount);
    }

    /// The same capability list in the bounding, effective and permitted
    /// sets (inheritable and ambient empty).
    pub fn set_capabilities(&mut self, caps: &[&str]) {
        self.spec["process"]["capabilities"] = json!({
            "bounding": caps, "effective": caps, "permitted": caps
        });
    }

    /// A user namespace mapping ids 0.. of the container to `host_id`..
    /// (`size` of them), with the rootfs owned by the mapped root, as podman
    /// arranges it (`chown -R -h`).
    pub fn map_root_to(&mut self, host_id: u32, size: u32) {
        let owner = format!("{host_id}:{host_id}");
        let status = Command::new("chown")
            .args(["-R", "-h", &owner])
            .arg(self.rootfs())
            .status()
            .expect("run chown");
        assert!(status.success(), "chown -R -h {owner} of the rootfs failed");
        self.add_namespace("user");
        let map = json!([{ "containerID": 0, "hostID": host_id, "size": size }]);
        self.spec["linux"]["uidMappings"] = map.clone();
        self.spec["linux"]["gidMappings"] = map;
    }

    /// Writes `spec` to `config.json` (call after editing it).
    pub fn save(&self) {
        std::fs::write(
            self.dir.path().join("config.json"),
            serde_json::to_vec_pretty(&self.spec).unwrap(),
        )
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_a_valid_runtime_spec() {
        let spec = default_spec(&["sh", "-c", "true"]);
        assert_eq!(spec["process"]["args"][1], "-c");
        assert_eq!(spec["root"]["path"], "rootfs");
    }

    #[test]
    fn a_bundle_has_config_json_and_a_busybox_rootfs() {
        let mut b = Bundle::busybox(&["true"]);
        b.spec["hostname"] = json!("edited");
        b.save();
        let saved: Value =
            serde_json::from_slice(&std::fs::read(b.dir().join("config.json")).unwrap()).unwrap();
        assert_eq!(saved["hostname"], "edited");
        assert!(b.rootfs().join("bin/sh").exists());
    }
}
