//! The sandbox's shared filesystems (`Storage` in CreateContainer), mounted
//! in the guest before a container is built. Mounting a mount point that is
//! already mounted is a no-op, so every container of a sandbox can name the
//! sandbox's share.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use husk_protocol::agent::Storage;
use nix::mount::{mount, MsFlags};

/// A storage that could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The driver is not one the agent knows.
    #[error("storage driver {driver:?} for {mount_point:?} is not supported; use \"virtiofs\" or \"9p\"")]
    UnknownDriver {
        /// The driver asked for.
        driver: String,
        /// Where it was to be mounted.
        mount_point: String,
    },
    /// The mount point is not absolute, or the source is empty.
    #[error("storage {tag:?} on {mount_point:?} is malformed: the source must be a device tag and the mount point an absolute guest path")]
    Malformed {
        /// The tag.
        tag: String,
        /// The mount point.
        mount_point: String,
    },
    /// mkdir or mount failed.
    #[error("mounting {driver} tag {tag:?} on {mount_point}: {error}; check that the VM has the device with that tag")]
    Mount {
        /// The driver.
        driver: String,
        /// The tag.
        tag: String,
        /// The mount point.
        mount_point: String,
        /// What failed.
        #[source]
        error: io::Error,
    },
}

/// How to mount one storage: `(source, fstype, data)`.
pub fn mount_args(storage: &Storage) -> Result<(String, &'static str, String), StorageError> {
    let malformed = || StorageError::Malformed {
        tag: storage.source.clone(),
        mount_point: storage.mount_point.clone(),
    };
    if storage.source.is_empty() || !Path::new(&storage.mount_point).is_absolute() {
        return Err(malformed());
    }
    let mut data: Vec<String> = Vec::new();
    let fstype = match storage.driver.as_str() {
        "virtiofs" | "virtio-fs" => "virtiofs",
        "9p" => {
            data.extend(
                ["trans=virtio", "version=9p2000.L", "msize=262144"]
                    .iter()
                    .map(|s| s.to_string()),
            );
            "9p"
        }
        other => {
            return Err(StorageError::UnknownDriver {
                driver: other.to_string(),
                mount_point: storage.mount_point.clone(),
            })
        }
    };
    data.extend(storage.options.iter().filter(|o| !o.is_empty()).cloned());
    Ok((storage.source.clone(), fstype, data.join(",")))
}

/// Whether `path` is a mount point, according to `/proc/self/mountinfo`.
pub fn is_mount_point(mountinfo: &str, path: &Path) -> bool {
    mountinfo.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .map(unescape_mountinfo)
            .is_some_and(|mp| Path::new(&mp) == path)
    })
}

/// Mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Mounts `storage` unless its mount point already is one. Blocking.
pub fn mount_storage(storage: &Storage) -> Result<(), StorageError> {
    let (source, fstype, data) = mount_args(storage)?;
    let mount_point = PathBuf::from(&storage.mount_point);
    let failed = |error: io::Error| StorageError::Mount {
        driver: fstype.to_string(),
        tag: source.clone(),
        mount_point: storage.mount_point.clone(),
        error,
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(failed)?;
    if is_mount_point(&mountinfo, &mount_point) {
        tracing::debug!(mount_point = %mount_point.display(), "storage already mounted");
        return Ok(());
    }
    fs::create_dir_all(&mount_point).map_err(failed)?;
    mount(
        Some(source.as_str()),
        &mount_point,
        Some(fstype),
        MsFlags::empty(),
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| failed(e.into()))?;
    tracing::info!(tag = %source, fstype, mount_point = %mount_point.display(), "mounted storage");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(driver: &str, options: &[&str]) -> Storage {
        Storage {
            driver: driver.into(),
            source: "husk-share".into(),
            mount_point: "/run/husk/share".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn mount_arguments_per_driver() {
        assert_eq!(
            mount_args(&storage("virtiofs", &[])).unwrap(),
            ("husk-share".to_string(), "virtiofs", String::new())
        );
        assert_eq!(
            mount_args(&storage("9p", &["cache=mmap"])).unwrap(),
            (
                "husk-share".to_string(),
                "9p",
                "trans=virtio,version=9p2000.L,msize=262144,cache=mmap".to_string()
            )
        );
        assert!(matches!(
            mount_args(&storage("nfs", &[])),
            Err(StorageError::UnknownDriver { .. })
        ));
        let mut relative = storage("9p", &[]);
        relative.mount_point = "share".into();
        assert!(matches!(
            mount_args(&relative),
            Err(StorageError::Malformed { .. })
        ));
    }

    #[test]
    fn finds_mount_points_in_mountinfo() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    40 22 0:50 / /run/husk/share rw - 9p husk-share rw\n\
                    41 22 0:51 / /with\\040space rw - tmpfs tmpfs rw\n";
        assert!(is_mount_point(info, Path::new("/run/husk/share")));
        assert!(is_mount_point(info, Path::new("/with space")));
        assert!(!is_mount_point(info, Path::new("/run/husk")));
    }
}
