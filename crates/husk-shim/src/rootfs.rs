//! The container's root filesystem as containerd hands it over: a list of
//! mounts (an overlay of the image's snapshot, usually) that the shim mounts
//! at `<bundle>/rootfs`. The shim runs in its own mount namespace, so the
//! mount is invisible to the host and goes away with the shim even if it is
//! killed; `unmount` removes it when the task is deleted.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use nix::mount::{umount2, MntFlags};

/// Mounts `mounts` in order at `<bundle>/rootfs`; returns the mount point,
/// or `None` when there is nothing to mount (the bundle's rootfs is used as
/// it is).
pub async fn mount(
    mounts: &[Mount],
    bundle: &Path,
) -> Result<Option<PathBuf>, containerd_shim::Error> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| {
        containerd_shim::Error::Other(format!("cannot create {}: {e}", target.display()))
    })?;
    for (n, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await {
            for _ in 0..n {
                unmount(&target);
            }
            return Err(e);
        }
    }
    Ok(Some(target))
}

/// Unmounts everything stacked at `target`.
pub fn unmount(target: &Path) {
    // Each call removes the top mount; EINVAL once nothing is mounted.
    for _ in 0..16 {
        if umount2(target, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}
