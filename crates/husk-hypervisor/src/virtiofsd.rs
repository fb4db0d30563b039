//! The virtiofsd daemon that serves the sandbox share over vhost-user.

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
        .args(["--log-level", "warn"]);
    let mut child = process::spawn("virtiofsd", cmd, log, cpus)?;
    process::wait_for_socket("virtiofsd", &mut child, socket, log, SOCKET_TIMEOUT).await?;
    Ok(child)
}
