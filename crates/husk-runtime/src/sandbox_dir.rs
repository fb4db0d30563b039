//! The sandbox state directory (`<root>/<id>`, `/run/husk/<id>` by default):
//! sockets, logs and the share. Created exclusively, so a second sandbox with
//! the same id is refused; removed on teardown.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The default `--root`.
pub const DEFAULT_ROOT: &str = "/run/husk";

#[derive(Debug, thiserror::Error)]
pub enum SandboxDirError {
    #[error("container id {0:?} is invalid: use letters, digits, '_', '+', '-' and '.', not starting with '.'")]
    InvalidId(String),
    #[error("container {id} already exists ({path}): pick another id or `husk delete` it")]
    InUse { id: String, path: PathBuf },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks an id the way runc does: `^[\w+-\.]+$`, and not `.`-led so it can
/// never be `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), SandboxDirError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SandboxDirError::InvalidId(id.to_string()))
    }
}

#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
    removed: bool,
    keep_state: bool,
}

impl SandboxDir {
    /// Creates `<root>/<id>`, mode 0700 whatever the umask (and `root`
    /// 0700 if it has to be made); fails if it exists.
    pub fn create(root: &Path, id: &str) -> Result<SandboxDir, SandboxDirError> {
        validate_id(id)?;
        if !root.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .and_then(|()| restrict(root, 0o700))
                .map_err(|source| SandboxDirError::Create {
                    path: root.to_path_buf(),
                    source,
                })?;
        }
        let path = root.join(id);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                let d = SandboxDir {
                    path,
                    removed: false,
                    keep_state: false,
                };
                // The umask may have taken bits away, never added any; but
                // say the mode outright. A failure drops (removes) `d`.
                restrict(&d.path, 0o700).map_err(|source| SandboxDirError::Create {
                    path: d.path.clone(),
                    source,
                })?;
                Ok(d)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(SandboxDirError::InUse {
                    id: id.to_string(),
                    path,
                })
            }
            Err(source) => Err(SandboxDirError::Create { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.path.join("virtiofsd.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn hypervisor_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }
    /// The share the guest is served (a read-only view of the staging dir).
    pub fn share(&self) -> PathBuf {
        self.path.join("share")
    }
    /// The host's side of the share, never served (see `share.rs`).
    pub fn share_staging(&self) -> PathBuf {
        self.path.join(SHARE_STAGING)
    }
    pub fn monitor_socket(&self) -> PathBuf {
        self.path.join(MONITOR_SOCKET)
    }

    /// Keeps the directory and its state file when dropped or removed, for
    /// `husk state` and `husk delete` after the sandbox is gone.
    pub fn keep_state(&mut self) {
        self.keep_state = true;
    }

    /// Removes what the running sandbox put in the directory (sockets,
    /// logs), and, unless [`Self::keep_state`] was called, the state file
    /// and the directory itself (non-recursively: the share must already be
    /// torn down).
    pub fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        remove_runtime_files(&self.path);
        if !self.keep_state {
            remove_state(&self.path);
        }
    }
}

/// Sets `path`'s mode to exactly `mode` (not following a final symlink:
/// the path is first checked to be no symlink, and lives in a dir only the
/// owner can write).
pub fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    if fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Name of the share's staging dir in the sandbox dir.
pub const SHARE_STAGING: &str = "share.host";

/// The host cgroup directories the sandbox made, one per line (for the
/// cleanup after an owner that died: [`remove_leftovers`]).
pub const HOST_CGROUP_FILE: &str = "host-cgroup";

/// Name of the monitor's API socket in the sandbox dir.
pub const MONITOR_SOCKET: &str = "monitor.sock";

const RUNTIME_FILES: &[&str] = &[
    "agent.sock",
    "qmp.sock",
    "virtiofsd.sock",
    // virtiofsd wrote `<socket>.pid` beside its socket when it bound it
    // itself (husk now passes it a bound one): leftovers of older sandboxes.
    "virtiofsd.sock.pid",
    "console.log",
    "qemu.log",
    MONITOR_SOCKET,
    HOST_CGROUP_FILE,
    crate::net::NET_FILE,
];

fn remove_runtime_files(dir: &Path) {
    for f in RUNTIME_FILES {
        let _ = fs::remove_file(dir.join(f));
    }
}

fn remove_state(dir: &Path) {
    let _ = fs::remove_file(dir.join(crate::state::STATE_FILE));
    if let Err(e) = fs::remove_dir(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot remove sandbox dir");
    }
}

/// Removes what a sandbox whose owner died left in `dir`: its files, the
/// (by then unmounted) skeleton of its share, its state and the directory.
/// Only empty directories and empty files are removed from the share, so
/// nothing that was mounted there can be deleted through it.
pub fn remove_leftovers(dir: &Path) {
    if let Ok(list) = fs::read_to_string(dir.join(HOST_CGROUP_FILE)) {
        let made: Vec<PathBuf> = list.lines().map(PathBuf::from).collect();
        crate::host_cgroup::remove_made(&made);
    }
    crate::net::detach_recorded(dir);
    remove_runtime_files(dir);
    remove_skeleton(&dir.join("share"));
    remove_skeleton(&dir.join(SHARE_STAGING));
    remove_state(dir);
}

fn remove_skeleton(p: &Path) {
    let Ok(meta) = fs::symlink_metadata(p) else {
        return;
    };
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(p) {
            for e in entries.flatten() {
                remove_skeleton(&e.path());
            }
        }
        if let Err(e) = fs::remove_dir(p) {
            tracing::warn!(path = %p.display(), error = %e, "left in place");
        }
    } else if meta.is_file() && meta.len() == 0 {
        let _ = fs::remove_file(p);
    } else {
        tracing::warn!(path = %p.display(), "unexpected file in a sandbox share; left in place");
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_runc_rules() {
        for ok in ["a", "abc-1.2_x+y", "A9"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "../x", "é"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn second_create_is_in_use_and_drop_removes() {
        let root = std::env::temp_dir().join(format!("husk-sd-{}", std::process::id()));
        let d = SandboxDir::create(&root, "x").unwrap();
        std::fs::write(d.console_log(), "log").unwrap();
        let e = SandboxDir::create(&root, "x").unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        drop(d);
        assert!(!root.join("x").exists());
        std::fs::remove_dir(&root).unwrap();
    }

    #[test]
    fn leftovers_are_removed_but_never_content() {
        let root = std::env::temp_dir().join(format!("husk-lo-{}", std::process::id()));
        let mut d = SandboxDir::create(&root, "y").unwrap();
        d.keep_state();
        let share = d.share();
        std::fs::create_dir_all(share.join("c/rootfs")).unwrap();
        std::fs::create_dir_all(share.join("c/mounts")).unwrap();
        std::fs::write(share.join("c/mounts/0"), "").unwrap();
        std::fs::write(share.join("c/rootfs/precious"), "data").unwrap();
        std::fs::write(d.path().join(crate::state::STATE_FILE), "{}").unwrap();
        std::fs::write(d.console_log(), "log").unwrap();
        let path = d.path().to_path_buf();
        drop(d);
        assert!(path.join(crate::state::STATE_FILE).exists(), "state kept");
        assert!(!path.join("console.log").exists());
        remove_leftovers(&path);
        assert_eq!(
            std::fs::read_to_string(share.join("c/rootfs/precious")).unwrap(),
            "data"
        );
        assert!(!share.join("c/mounts").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn sockets_beyond_sun_len_work_and_are_removed() {
        // Docker: a 64-character id under a long `--root`.
        let top = std::env::temp_dir().join(format!("husk-sl-{}", std::process::id()));
        let root = top.join("r".repeat(100 - top.as_os_str().len() - 1));
        assert_eq!(root.as_os_str().len(), 100);
        let id = "f".repeat(64);
        let mut d = SandboxDir::create(&root, &id).unwrap();
        let socks = [
            d.monitor_socket(),
            d.agent_socket(),
            d.qmp_socket(),
            d.virtiofsd_socket(),
        ];
        let listeners: Vec<_> = socks
            .iter()
            .map(|s| {
                assert!(s.as_os_str().len() > husk_sys::socket_path::SUN_PATH_MAX);
                assert!(std::os::unix::net::UnixListener::bind(s).is_err());
                husk_sys::socket_path::bind_unix(s).unwrap()
            })
            .collect();
        for s in &socks {
            husk_sys::socket_path::connect_unix(s).unwrap();
        }
        drop(listeners);
        d.remove();
        assert!(!d.path().exists(), "sockets and dir removed");
        fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn state_dirs_are_0700_and_sockets_0600_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        let root = std::env::temp_dir().join(format!("husk-um-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let d = SandboxDir::create(&root.join("state"), "u");
        let sock = d
            .as_ref()
            .ok()
            .map(|d| std::os::unix::net::UnixListener::bind(d.monitor_socket()));
        nix::sys::stat::umask(old);
        let d = d.unwrap();
        let _listener = sock.unwrap().unwrap();
        assert_eq!(mode(&root.join("state")), 0o700, "a root it made");
        assert_eq!(mode(d.path()), 0o700);
        restrict(&d.monitor_socket(), 0o600).unwrap();
        assert_eq!(mode(&d.monitor_socket()), 0o600);
        // A symlink is never chmod-ed through.
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("qmp.sock")).unwrap();
        assert!(restrict(&d.qmp_socket(), 0o600).is_err());
        drop(d);
        fs::remove_dir_all(&root).unwrap();
    }
}
