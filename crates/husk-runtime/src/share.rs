//! The host side of the sandbox share: bind mounts of container root
//! filesystems and bind-mount sources into `<sandbox dir>/share`.
//!
//! Teardown never deletes recursively: it unmounts what it mounted and
//! removes only the mount points it created, deepest first, so a mount that
//! could not be detached is left as it is rather than emptied.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::translate::ShareBind;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind-mount {source_path} into the sandbox share: {errno}")]
    Bind {
        source_path: PathBuf,
        errno: nix::Error,
    },
    #[error("bind-mount source {0} does not exist")]
    MissingSource(PathBuf),
}

/// The share directory and everything mounted or created in it.
#[derive(Debug)]
pub struct Share {
    dir: PathBuf,
    mounted: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl Share {
    /// Creates the (empty) share directory and makes it a shared mount
    /// point: virtiofsd serves it from a mount namespace of its own, copied
    /// when it starts, and binds made later (containers created into a
    /// running sandbox) must propagate there.
    pub fn create(dir: &Path) -> Result<Share, ShareError> {
        fs::create_dir_all(dir).map_err(|source| ShareError::MountPoint {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut share = Share {
            dir: dir.to_path_buf(),
            mounted: Vec::new(),
            created: vec![dir.to_path_buf()],
        };
        let bind_err = |errno| ShareError::Bind {
            source_path: dir.to_path_buf(),
            errno,
        };
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(bind_err)?;
        share.mounted.push(dir.to_path_buf());
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(bind_err)?;
        Ok(share)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn make_dirs(&mut self, path: &Path) -> Result<(), ShareError> {
        let mut missing = Vec::new();
        let mut p = path;
        while !p.exists() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).map_err(|source| ShareError::MountPoint {
                path: d.clone(),
                source,
            })?;
            self.created.push(d);
        }
        Ok(())
    }

    /// Bind-mounts `b.host_source` (recursively) at `b.share_path`.
    pub fn bind(&mut self, b: &ShareBind) -> Result<(), ShareError> {
        if !b.host_source.exists() {
            return Err(ShareError::MissingSource(b.host_source.clone()));
        }
        let target = self.dir.join(&b.share_path);
        if b.is_dir {
            self.make_dirs(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                self.make_dirs(parent)?;
            }
            fs::File::create(&target).map_err(|source| ShareError::MountPoint {
                path: target.clone(),
                source,
            })?;
            self.created.push(target.clone());
        }
        mount(
            Some(&b.host_source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|errno| ShareError::Bind {
            source_path: b.host_source.clone(),
            errno,
        })?;
        self.mounted.push(target);
        Ok(())
    }

    /// Unmounts everything and removes what was created. Best effort; what
    /// cannot be removed is logged and left alone.
    pub fn teardown(&mut self) {
        for m in self.mounted.drain(..).rev() {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %m.display(), error = %e, "cannot unmount share bind");
            }
        }
        for p in self.created.drain(..).rev() {
            let r = if p.is_dir() {
                fs::remove_dir(&p)
            } else {
                fs::remove_file(&p)
            };
            if let Err(e) = r {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove share path");
                }
            }
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.teardown();
    }
}
