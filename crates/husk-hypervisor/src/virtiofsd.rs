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
//! allow-list. It inherits no descriptor of husk's (see `process.rs`) but
//! its listening socket.
//!
//! husk binds that socket itself (through the directory's descriptor, so
//! its path may be longer than `sun_path`: Docker's `--root` and ids) and
//! passes it as `--fd`; virtiofsd makes no file of its own (no socket, no
//! pid file). The socket file is the sandbox dir's, removed with it.

use std::os::fd::RawFd;
use std::path::Path;

use tokio::process::{Child, Command};

use crate::{process, HypervisorError};

/// The number virtiofsd gets its listening socket at.
const LISTEN_FD: RawFd = 3;

/// Starts virtiofsd for `share_dir`, listening on `socket` (bound here, so
/// a client may connect as soon as this returns: the connection waits in
/// the backlog until virtiofsd accepts it). virtiofsd exits by itself when
/// QEMU disconnects.
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
    let listener = crate::qemu::listen(socket)?;
    let mut cmd = Command::new(daemon);
    cmd.arg(format!("--fd={LISTEN_FD}"))
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
    let confine = process::Confine {
        user: None,
        fds: vec![(listener, LISTEN_FD)],
        netns: None,
    };
    process::spawn("virtiofsd", cmd, log, cpus, confine)
}
