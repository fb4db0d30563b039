//! The sandbox's private mount namespace.
//!
//! The process that owns a sandbox (the foreground `husk run`, or a sandbox
//! monitor) enters a mount namespace of its own before it starts any thread.
//! The bind mounts that feed the share live only there: the host's mount
//! table never sees them, and the kernel drops them when the owner and its
//! children (QEMU, virtiofsd) are gone, even after a SIGKILL.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Moves the calling process into a new mount namespace whose mounts do not
/// propagate back to the host. Must be called before any thread is started
/// (unshare(CLONE_NEWNS) fails in a multi-threaded process).
pub fn enter_private() -> Result<(), nix::Error> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
}
