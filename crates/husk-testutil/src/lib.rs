//! Test support shared by every husk test layer (dev-only, never shipped):
//!
//! - [`wait_until`] / [`try_wait_until`]: poll a condition with a deadline
//!   instead of sleeping a fixed time.
//! - [`TempDir`]: a unique scratch directory, removed on drop (never across
//!   a mount a failed test left).
//! - [`bundle`]: a busybox rootfs, the default OCI `config.json`, and a
//!   [`Bundle`] holding both.
//! - [`leak`]: the [`LeakGuard`] every root test creates first; on drop it
//!   fails the test if the test left QEMU, virtiofsd, a shim, a mount, a
//!   tap device or state behind.
//!
//! See `docs/testing.md` for the test layers these serve.

pub mod bundle;
pub mod leak;
pub mod netns;
mod tempdir;
mod wait;

pub use bundle::{busybox_rootfs, default_spec, Bundle};
pub use leak::LeakGuard;
pub use tempdir::{mount_points, mounts_under, TempDir};
pub use wait::{try_wait_until, wait_until, Ready};

/// Fails the test with a message saying what needs root, unless it runs as
/// root. `what` completes "... need root": e.g. "the agent-as-a-process tests".
#[track_caller]
pub fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what} need root: run them as root (`make test-root` / `make test-e2e`)"
    );
}
