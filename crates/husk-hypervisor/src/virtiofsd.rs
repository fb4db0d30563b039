//! The virtiofsd daemon that serves the sandbox share over vhost-user.
//!
//! virtiofsd stays root: it serves files with their owners, modes and
//! timestamps as the guest sets them, which takes CAP_CHOWN, CAP_DAC_OVERRIDE,
//! CAP_FOWNER, CAP_FSETID, CAP_SETGID, CAP_SETUID (it switches its fs
//! uid/gid to the guest's caller for every create) and CAP_SETFCAP. It keeps
//! only those (its default set minus CAP_MKNOD: the guest cannot make device
//! nodes in the share), confines itself in its namespace sandbox (new mount,
//! pid, net and ipc namespaces, pivoted into the share dir, so it sees no
//! other host path) and kills itself on a system call outside its seccomp
//! allow-list. It inherits no descriptor of husk's (see `process.rs`).

use std::path::Path;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{process, HypervisorError};

/// How long virtiofsd may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts virtiofsd for `share_dir` on `socket` and waits until it listens.
/// virtiofsd exits by itself when QEMU disconnects.
pub async fn start(
    daemon: &Path,
    share_dir: &Path,
    socket: &Path,
    log: &Path,
    cpus: Option<&[usize]>,
) -> Result<Child, HypervisorError> {
    if !daemon.exists() {
        return Err(HypervisorError::MissingBinary {
            what: "virtiofsd",
            path: daemon.to_path_buf(),
            fix: "install it with `cargo install virtiofsd` (make setup), set shared_fs.virtiofsd, or set shared_fs.kind = \"9p\"",
        });
    }
    let mut cmd = Command::new(daemon);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(share_dir)
        .args(["--cache", "auto"])
        .arg("--announce-submounts")
        // 0 leaves RLIMIT_NOFILE alone: root here may lack CAP_SYS_RESOURCE.
        .args(["--rlimit-nofile", "0"])
        .args(["--sandbox", "namespace"])
        .args(["--seccomp", "kill"])
        .arg("--modcaps=-mknod")
        .args(["--log-level", "warn"]);
    let mut child = process::spawn("virtiofsd", cmd, log, cpus, process::Confine::default())?;
    process::wait_for_socket("virtiofsd", &mut child, socket, log, SOCKET_TIMEOUT).await?;
    Ok(child)
}
