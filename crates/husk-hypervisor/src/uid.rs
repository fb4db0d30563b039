//! Leased host uids for the hypervisor process.
//!
//! Each sandbox's QEMU runs as its own unprivileged uid (and gid of the same
//! number), taken from a configured range. A lease is an `flock` held on
//! `<lock_dir>/<uid>` for the VM's lifetime, so two sandboxes, in any
//! process, never share a uid; the kernel drops the lock when the holder
//! dies, so a crashed husk leaks no lease. Lock files are left in place
//! (removing one would race with a process about to lock it); the lowest
//! free uid is taken, so they number at most the peak of live sandboxes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A range of host uids to lease from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidPool {
    /// The first uid of the range (also used as the gid).
    pub first: u32,
    /// How many uids the range holds.
    pub count: u32,
    /// Where the lease lock files live (root-only, e.g. `/run/husk-uids`).
    pub lock_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("the uid range is empty or overflows ({first} + {count}): set hypervisor.uid_first and hypervisor.uid_count in the husk config")]
    BadRange { first: u32, count: u32 },
    #[error("every uid of {first}..{end} is leased by a running sandbox (locks in {dir}): stop some, or raise hypervisor.uid_count", end = *first as u64 + *count as u64)]
    Exhausted {
        first: u32,
        count: u32,
        dir: PathBuf,
    },
    #[error("cannot use the uid lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One leased uid; the lease ends when this is dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    _lock: File,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }
    /// The gid that goes with the uid (the same number).
    pub fn gid(&self) -> u32 {
        self.uid
    }
}

impl UidPool {
    /// Leases a uid no other live lease holds.
    pub fn lease(&self) -> Result<UidLease, UidError> {
        if self.count == 0 || self.first == 0 || self.first.checked_add(self.count).is_none() {
            return Err(UidError::BadRange {
                first: self.first,
                count: self.count,
            });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.lock_dir)
            .map_err(|source| UidError::Lock {
                path: self.lock_dir.clone(),
                source,
            })?;
        // Lowest free uid first: the lock files (never removed) number at
        // most the sandboxes that ever ran at once, not one per sandbox.
        for i in 0..self.count {
            let uid = self.first + i;
            if let Some(lock) = try_lock(&self.lock_dir.join(uid.to_string()))? {
                return Ok(UidLease { uid, _lock: lock });
            }
        }
        Err(UidError::Exhausted {
            first: self.first,
            count: self.count,
            dir: self.lock_dir.clone(),
        })
    }
}

/// Opens and locks `path` without blocking; `None` when someone holds it.
fn try_lock(path: &Path) -> Result<Option<File>, UidError> {
    let err = |source| UidError::Lock {
        path: path.to_path_buf(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    #[allow(deprecated)]
    match nix::fcntl::flock(f.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(()) => Ok(Some(f)),
        Err(nix::errno::Errno::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(err(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(tag: &str, count: u32) -> UidPool {
        let dir = std::env::temp_dir().join(format!("husk-uid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        UidPool {
            first: 2_000_000_000,
            count,
            lock_dir: dir,
        }
    }

    #[test]
    fn two_leases_differ_and_a_dropped_one_comes_back() {
        let p = pool("two", 2);
        let a = p.lease().unwrap();
        let b = p.lease().unwrap();
        assert_ne!(a.uid(), b.uid());
        for l in [&a, &b] {
            assert!((2_000_000_000..2_000_000_002).contains(&l.uid()));
            assert_eq!(l.gid(), l.uid());
        }
        let freed = a.uid();
        drop(a);
        let c = p.lease().unwrap();
        assert_eq!(c.uid(), freed);
        std::fs::remove_dir_all(&p.lock_dir).unwrap();
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let p = pool("full", 1);
        let _a = p.lease().unwrap();
        let e = p.lease().unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, UidError::Exhausted { .. }), "{m}");
        assert!(m.contains("hypervisor.uid_count"), "{m}");
        assert!(m.contains(&p.lock_dir.display().to_string()), "{m}");
        std::fs::remove_dir_all(&p.lock_dir).unwrap();
    }

    #[test]
    fn a_bad_range_is_refused() {
        let mut p = pool("bad", 0);
        assert!(matches!(p.lease(), Err(UidError::BadRange { .. })));
        p.count = 10;
        p.first = u32::MAX - 2;
        assert!(matches!(p.lease(), Err(UidError::BadRange { .. })));
    }
}
