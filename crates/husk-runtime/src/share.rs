//! The host side of the sandbox share: bind mounts of container root
//! filesystems and bind-mount sources, which the guest reaches over
//! virtio-fs (or 9p).
//!
//! The guest is not trusted, and everything it can reach in the share is
//! the attacker's (see `docs/threat-model.md`). So:
//!
//! - The host works in a **staging** directory (`<sandbox dir>/share.host`)
//!   that the guest never sees; what the guest is served
//!   (`<sandbox dir>/share`) is a **read-only** bind of it, in the same peer
//!   group, so every bind made in staging appears there. The guest can write
//!   only inside the binds the spec made writable, never in the skeleton
//!   (`<cid>/rootfs`, `<cid>/mounts/<n>`) where the host makes directories,
//!   mount points and mounts.
//! - Every bind is made from a detached tree (`open_tree(OPEN_TREE_CLONE |
//!   AT_RECURSIVE)`) whose mounts all get `nosuid,nodev` — and `ro` for a
//!   read-only bind or rootfs — with `mount_setattr(AT_RECURSIVE)` *before*
//!   `move_mount` attaches it: there is no moment when a read-only bind is
//!   writable from the share, and no submount escapes the flags.
//! - Nothing the host does under staging follows a name: directories are
//!   walked with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the
//!   staging root, mount points are created with `O_CREAT | O_EXCL`, binds
//!   are attached to a descriptor, and unmounted through the descriptor
//!   that attached them.
//!
//! Teardown never deletes recursively: it unmounts what it mounted and
//! removes only the entries it created, deepest first, so a mount that could
//! not be detached is left as it is rather than emptied.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use husk_sys as sys;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::translate::ShareBind;

/// Resolution of every name the host opens under the staging root.
const RESOLVE: u64 = sys::RESOLVE_BENEATH | sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot create {path} in the sandbox share")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind-mount {source_path} into the sandbox share")]
    Bind {
        source_path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {path} in the sandbox share")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind-mount source {0} does not exist")]
    MissingSource(PathBuf),
    #[error("bind-mount source {0} is the host's /proc, /sys or /dev: refused (use the guest's own by naming /proc, /sys or /dev directly)")]
    HostKernelFs(PathBuf),
    #[error("share path {0} is not a plain relative path")]
    BadPath(PathBuf),
    #[error("container {0} already has binds in the sandbox share")]
    Exists(String),
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn cstr(p: &Path) -> CString {
    // A path from the OS cannot hold a NUL; one from a spec could, and
    // then names nothing (the call fails with ENOENT).
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// One bind attached in staging: its path there and the descriptor of the
/// tree it attached (through which it is unmounted).
#[derive(Debug)]
struct Mounted {
    rel: PathBuf,
    tree: OwnedFd,
}

/// A container's part of the share: its mounts and the entries the host
/// created for them (relative to the staging root; `true` = directory).
#[derive(Debug, Default)]
struct Binds {
    mounts: Vec<Mounted>,
    created: Vec<(PathBuf, bool)>,
}

/// The share and everything mounted or created in it, per container.
#[derive(Debug)]
pub struct Share {
    /// What the guest is served: a read-only bind of `staging`.
    dir: PathBuf,
    staging: PathBuf,
    /// `O_PATH` descriptor of the staging mount's root.
    root: Option<OwnedFd>,
    /// Mounts made by [`Share::create`], in order.
    base_mounts: Vec<PathBuf>,
    /// Directories made by [`Share::create`], in order.
    base_dirs: Vec<PathBuf>,
    containers: HashMap<String, Binds>,
}

impl Share {
    /// Creates the share: the staging directory `staging` (the host's side)
    /// and the directory `dir` the guest is served, a read-only,
    /// `nosuid,nodev` bind of staging. Staging is a shared mount, so binds
    /// made later (containers created into a running sandbox) propagate to
    /// `dir` and to virtiofsd's copy of it (its own mount namespace, a slave
    /// copied when it starts).
    pub fn create(staging: &Path, dir: &Path) -> Result<Share, ShareError> {
        let mut share = Share {
            dir: dir.to_path_buf(),
            staging: staging.to_path_buf(),
            root: None,
            base_mounts: Vec::new(),
            base_dirs: Vec::new(),
            containers: HashMap::new(),
        };
        for d in [staging, dir] {
            match std::fs::create_dir(d) {
                Ok(()) => share.base_dirs.push(d.to_path_buf()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(source) => {
                    return Err(ShareError::MountPoint {
                        path: d.to_path_buf(),
                        source,
                    })
                }
            }
        }
        let bind_err = |p: &Path| {
            let p = p.to_path_buf();
            move |e: nix::Error| ShareError::Bind {
                source_path: p,
                source: nix_io(e),
            }
        };
        mount(
            Some(staging),
            staging,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(bind_err(staging))?;
        share.base_mounts.push(staging.to_path_buf());
        mount(
            None::<&str>,
            staging,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(bind_err(staging))?;
        mount(
            Some(staging),
            dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(bind_err(staging))?;
        share.base_mounts.push(dir.to_path_buf());
        // No guest exists yet: this is before QEMU and virtiofsd start.
        let cwd = std::fs::File::open("/").map_err(|source| ShareError::Bind {
            source_path: dir.to_path_buf(),
            source,
        })?;
        let nosuid_nodev = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
        for (path, set) in [
            (staging, nosuid_nodev),
            (dir, nosuid_nodev | sys::MOUNT_ATTR_RDONLY),
        ] {
            let attr = sys::MountAttr {
                attr_set: set,
                ..Default::default()
            };
            sys::mount_setattr(cwd.as_fd(), &cstr(path), sys::AT_SYMLINK_NOFOLLOW, &attr).map_err(
                |source| ShareError::Bind {
                    source_path: path.to_path_buf(),
                    source,
                },
            )?;
        }
        let root = sys::openat2(
            cwd.as_fd(),
            &cstr(staging),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            sys::RESOLVE_NO_SYMLINKS,
        )
        .map_err(|source| ShareError::MountPoint {
            path: staging.to_path_buf(),
            source,
        })?;
        share.root = Some(root);
        Ok(share)
    }

    /// The directory the guest is served.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host's side of the share (never served).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.root
            .as_ref()
            .expect("the share's root is open until teardown")
            .as_fd()
    }

    /// Opens directory `rel` (relative to the staging root) without
    /// following any symlink or leaving the root.
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let p = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        sys::openat2(
            self.root(),
            &cstr(p),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            RESOLVE,
        )
    }

    /// Makes the directories of `rel` that are missing, recording them in
    /// `binds`; returns the descriptor of the last one.
    fn make_dirs(&self, binds: &mut Binds, rel: &Path) -> Result<OwnedFd, ShareError> {
        let mut at = PathBuf::new();
        let mut fd = self
            .open_dir(&at)
            .map_err(|source| ShareError::MountPoint {
                path: self.staging.clone(),
                source,
            })?;
        for c in rel.components() {
            at.push(c);
            let err = |source| ShareError::MountPoint {
                path: self.staging.join(&at),
                source,
            };
            match nix::sys::stat::mkdirat(&fd, c.as_os_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) => binds.created.push((at.clone(), true)),
                Err(nix::Error::EEXIST) => {}
                Err(e) => return Err(err(nix_io(e))),
            }
            fd = sys::openat2(
                fd.as_fd(),
                &cstr(Path::new(c.as_os_str())),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                RESOLVE,
            )
            .map_err(err)?;
        }
        Ok(fd)
    }

    /// Binds `b` into staging for a container whose entries are `binds`.
    fn bind_one(&self, binds: &mut Binds, b: &ShareBind) -> Result<(), ShareError> {
        let rel = plain_relative(&b.share_path)?;
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(ShareError::BadPath(b.share_path.clone()));
        };
        let bind_err = |source| ShareError::Bind {
            source_path: b.host_source.clone(),
            source,
        };
        if !b.mount_targets.is_empty() {
            make_mount_targets(&b.host_source, &b.mount_targets)?;
        }
        // The source is the spec's (the host caller's), not the guest's.
        let tree = sys::open_tree(
            None,
            &cstr(&b.host_source),
            sys::OPEN_TREE_CLONE | sys::OPEN_TREE_CLOEXEC | sys::AT_RECURSIVE,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                ShareError::MissingSource(b.host_source.clone())
            } else {
                bind_err(e)
            }
        })?;
        refuse_kernel_fs(&tree, &b.host_source)?;
        let is_dir = nix::sys::stat::fstat(&tree)
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .map_err(|e| bind_err(nix_io(e)))?;
        let mut attr_set = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
        if b.readonly {
            attr_set |= sys::MOUNT_ATTR_RDONLY;
        }
        let attr = sys::MountAttr {
            attr_set,
            propagation: libc::MS_PRIVATE,
            ..Default::default()
        };
        sys::mount_setattr(
            tree.as_fd(),
            c"",
            sys::AT_EMPTY_PATH | sys::AT_RECURSIVE,
            &attr,
        )
        .map_err(bind_err)?;

        let parent_fd = self.make_dirs(binds, parent)?;
        let name_c = cstr(Path::new(name));
        let mp_err = |source| ShareError::MountPoint {
            path: self.staging.join(rel),
            source,
        };
        if is_dir {
            nix::sys::stat::mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o755))
                .map_err(|e| mp_err(nix_io(e)))?;
        } else {
            let f = sys::openat2(
                parent_fd.as_fd(),
                &name_c,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                0o644,
                RESOLVE,
            )
            .map_err(mp_err)?;
            drop(f);
        }
        binds.created.push((rel.to_path_buf(), is_dir));
        let flags = if is_dir {
            libc::O_PATH | libc::O_DIRECTORY
        } else {
            libc::O_PATH
        };
        let target = sys::openat2(parent_fd.as_fd(), &name_c, flags, 0, RESOLVE).map_err(mp_err)?;
        sys::move_mount(
            tree.as_fd(),
            c"",
            target.as_fd(),
            c"",
            sys::MOVE_MOUNT_F_EMPTY_PATH | sys::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(bind_err)?;
        binds.mounts.push(Mounted {
            rel: rel.to_path_buf(),
            tree,
        });
        Ok(())
    }

    /// Unmounts and removes what `binds` holds, deepest first; returns the
    /// first error (the rest is still attempted).
    fn release(&self, binds: Binds) -> Result<(), ShareError> {
        let mut first = None;
        for m in binds.mounts.into_iter().rev() {
            // The descriptor is the attached tree's root: unmounting through
            // it names no path in the share.
            let via = format!("/proc/self/fd/{}", m.tree.as_raw_fd());
            if let Err(e) = umount2(via.as_str(), MntFlags::MNT_DETACH) {
                let err = ShareError::Unmount {
                    path: self.staging.join(&m.rel),
                    source: nix_io(e),
                };
                tracing::warn!("{}", crate::monitor::error_chain(&err));
                first.get_or_insert(err);
            }
        }
        for (rel, is_dir) in binds.created.into_iter().rev() {
            if let Err(source) = self.remove_entry(&rel, is_dir) {
                if source.kind() != io::ErrorKind::NotFound {
                    let err = ShareError::MountPoint {
                        path: self.staging.join(&rel),
                        source,
                    };
                    tracing::warn!("left in place: {}", crate::monitor::error_chain(&err));
                    first.get_or_insert(err);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn remove_entry(&self, rel: &Path, is_dir: bool) -> io::Result<()> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Ok(());
        };
        let fd = self.open_dir(parent)?;
        let how = if is_dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(&fd, name, how).map_err(nix_io)
    }

    /// Unmounts everything and removes what was created. Best effort; what
    /// cannot be removed is logged and left alone. Idempotent.
    pub fn teardown(&mut self) {
        let mut cids: Vec<String> = self.containers.keys().cloned().collect();
        cids.sort();
        for cid in cids {
            if let Some(b) = self.containers.remove(&cid) {
                let _ = self.release(b);
            }
        }
        self.root = None;
        for m in self.base_mounts.drain(..).rev() {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                tracing::warn!(path = %m.display(), error = %e, "cannot unmount the share");
            }
        }
        for d in self.base_dirs.drain(..).rev() {
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %d.display(), error = %e, "cannot remove share dir");
                }
            }
        }
    }
}

impl crate::sandbox::ShareBinds for Share {
    fn bind_container(&mut self, cid: &str, binds: &[ShareBind]) -> Result<(), ShareError> {
        if self.containers.contains_key(cid) {
            return Err(ShareError::Exists(cid.to_string()));
        }
        let mut done = Binds::default();
        for b in binds {
            if let Err(e) = self.bind_one(&mut done, b) {
                let _ = self.release(done);
                return Err(e);
            }
        }
        self.containers.insert(cid.to_string(), done);
        Ok(())
    }

    fn unbind_container(&mut self, cid: &str) -> Result<(), ShareError> {
        match self.containers.remove(cid) {
            Some(b) => self.release(b),
            None => Ok(()),
        }
    }

    fn teardown(&mut self) {
        Share::teardown(self);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Makes the missing mount points `targets` inside the rootfs `rootfs`
/// (for a read-only rootfs, where the guest cannot). Names are resolved
/// inside the rootfs (`RESOLVE_IN_ROOT`: a symlink in an image cannot lead
/// out of it); an existing name, even a dangling symlink, is left as it is.
fn make_mount_targets(rootfs: &Path, targets: &[(PathBuf, bool)]) -> Result<(), ShareError> {
    let err = |p: &Path, source| ShareError::MountPoint {
        path: rootfs.join(p.strip_prefix("/").unwrap_or(p)),
        source,
    };
    let cwd = std::fs::File::open("/").map_err(|e| err(Path::new("/"), e))?;
    let root = sys::openat2(
        cwd.as_fd(),
        &cstr(rootfs),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
        0,
    )
    .map_err(|e| err(Path::new("/"), e))?;
    for (target, is_file) in targets {
        // Best effort: what cannot be made is the guest's to report.
        if let Err(e) = make_mount_target(root.as_fd(), target, *is_file, &err) {
            tracing::debug!("mount point not made: {}", crate::monitor::error_chain(&e));
        }
    }
    Ok(())
}

fn make_mount_target(
    root: BorrowedFd<'_>,
    target: &Path,
    is_file: bool,
    err: &dyn Fn(&Path, io::Error) -> ShareError,
) -> Result<(), ShareError> {
    {
        let mut at = PathBuf::new();
        let n = target.components().count();
        for (i, c) in target.components().enumerate() {
            let Component::Normal(name) = c else {
                continue;
            };
            let parent = sys::openat2(
                root,
                &cstr(if at.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    &at
                }),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                sys::RESOLVE_IN_ROOT | sys::RESOLVE_NO_MAGICLINKS,
            )
            .map_err(|e| err(&at, e))?;
            at.push(name);
            let exists = sys::openat2(
                parent.as_fd(),
                &cstr(Path::new(name)),
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
                sys::RESOLVE_BENEATH,
            );
            match exists {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(err(&at, e)),
            }
            if i + 1 == n && is_file {
                sys::openat2(
                    parent.as_fd(),
                    &cstr(Path::new(name)),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                    0o644,
                    sys::RESOLVE_BENEATH,
                )
                .map_err(|e| err(&at, e))?;
            } else {
                match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::Error::EEXIST) => {}
                    Err(e) => return Err(err(&at, nix_io(e))),
                }
            }
        }
    }
    Ok(())
}

/// `p` if it is made of plain names only (no `/`, `.`, `..` or prefix).
fn plain_relative(p: &Path) -> Result<&Path, ShareError> {
    let plain =
        p.components().count() > 0 && p.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(p)
    } else {
        Err(ShareError::BadPath(p.to_path_buf()))
    }
}

/// Refuses a tree that is the host's procfs or sysfs, or the host's `/dev`:
/// the guest has its own, and the host's must never reach it. Checked on
/// the opened tree, so no spelling of the path (`..`, symlinks) gets past.
fn refuse_kernel_fs(tree: &OwnedFd, source: &Path) -> Result<(), ShareError> {
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    let refused = || ShareError::HostKernelFs(source.to_path_buf());
    if let Ok(fs) = nix::sys::statfs::fstatfs(tree) {
        let t = fs.filesystem_type().0;
        if t == PROC_SUPER_MAGIC || t == SYSFS_MAGIC {
            return Err(refused());
        }
    }
    if let (Ok(st), Ok(dev)) = (nix::sys::stat::fstat(tree), nix::sys::stat::stat("/dev")) {
        if st.st_dev == dev.st_dev {
            return Err(refused());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_share_paths() {
        assert!(plain_relative(Path::new("c1/rootfs")).is_ok());
        for bad in ["", "/abs", "../x", "c1/../../x", "./c1"] {
            assert!(plain_relative(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
