//! The sandbox state directory (`<root>/<id>`, `/run/husk/<id>` by default):
//! sockets, logs and the share. Created exclusively, so a second sandbox with
//! the same id is refused; removed on teardown.

use std::fs;
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
}

impl SandboxDir {
    /// Creates `<root>/<id>`; fails if it exists.
    pub fn create(root: &Path, id: &str) -> Result<SandboxDir, SandboxDirError> {
        validate_id(id)?;
        fs::create_dir_all(root).map_err(|source| SandboxDirError::Create {
            path: root.to_path_buf(),
            source,
        })?;
        let path = root.join(id);
        match fs::create_dir(&path) {
            Ok(()) => Ok(SandboxDir {
                path,
                removed: false,
            }),
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
    pub fn share(&self) -> PathBuf {
        self.path.join("share")
    }

    /// Removes the directory: the files husk puts there, then the directory
    /// itself (non-recursively: the share must already be torn down).
    pub fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        for f in [
            self.agent_socket(),
            self.qmp_socket(),
            self.virtiofsd_socket(),
            // virtiofsd writes `<socket>.pid` beside its socket.
            self.path.join("virtiofsd.sock.pid"),
            self.console_log(),
            self.hypervisor_log(),
        ] {
            let _ = fs::remove_file(f);
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove sandbox dir");
        }
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
}
