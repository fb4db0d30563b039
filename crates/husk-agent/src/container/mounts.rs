//! Mounts of a container: parsing the OCI mount options (pure), resolving
//! paths inside the rootfs, and performing the mounts (in the init stage).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};

/// One mount as the init stage performs it, translated from an OCI mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountEntry {
    /// Guest path for binds; the filesystem's source string otherwise.
    pub source: Option<PathBuf>,
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// Filesystem type; empty for bind mounts.
    pub fstype: String,
    /// `MsFlags` bits (including `MS_BIND`/`MS_REC` for binds).
    pub flags: libc::c_ulong,
    /// Propagation changes applied after mounting, in order (`MsFlags` bits).
    pub propagation: Vec<libc::c_ulong>,
    /// The filesystem's data string (options that are not flags).
    pub data: String,
}

impl MountEntry {
    /// The flags as `MsFlags`.
    pub fn ms_flags(&self) -> MsFlags {
        MsFlags::from_bits_retain(self.flags)
    }

    /// Whether this is a bind mount.
    pub fn is_bind(&self) -> bool {
        self.ms_flags().contains(MsFlags::MS_BIND)
    }
}

/// Mount options split into flags, propagation and the data string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation changes, in order.
    pub propagation: Vec<MsFlags>,
    /// Everything else, for the filesystem (`mode=755`, `size=64k`, ...).
    pub data: Vec<String>,
}

/// `(option, clears the flag?, flag)`, as mount(8) and runc read them.
const FLAG_OPTIONS: &[(&str, bool, MsFlags)] = &[
    ("async", true, MsFlags::MS_SYNCHRONOUS),
    ("atime", true, MsFlags::MS_NOATIME),
    ("bind", false, MsFlags::MS_BIND),
    ("defaults", false, MsFlags::empty()),
    ("dev", true, MsFlags::MS_NODEV),
    ("diratime", true, MsFlags::MS_NODIRATIME),
    ("dirsync", false, MsFlags::MS_DIRSYNC),
    ("exec", true, MsFlags::MS_NOEXEC),
    ("mand", false, MsFlags::MS_MANDLOCK),
    ("noatime", false, MsFlags::MS_NOATIME),
    ("nodev", false, MsFlags::MS_NODEV),
    ("nodiratime", false, MsFlags::MS_NODIRATIME),
    ("noexec", false, MsFlags::MS_NOEXEC),
    ("nomand", true, MsFlags::MS_MANDLOCK),
    ("norelatime", true, MsFlags::MS_RELATIME),
    ("nostrictatime", true, MsFlags::MS_STRICTATIME),
    ("nosuid", false, MsFlags::MS_NOSUID),
    ("rbind", false, MsFlags::MS_BIND.union(MsFlags::MS_REC)),
    ("relatime", false, MsFlags::MS_RELATIME),
    ("remount", false, MsFlags::MS_REMOUNT),
    ("ro", false, MsFlags::MS_RDONLY),
    ("rw", true, MsFlags::MS_RDONLY),
    ("strictatime", false, MsFlags::MS_STRICTATIME),
    ("suid", true, MsFlags::MS_NOSUID),
    ("sync", false, MsFlags::MS_SYNCHRONOUS),
];

const PROPAGATION_OPTIONS: &[(&str, MsFlags)] = &[
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

/// Options the agent accepts and deliberately ignores (runc extensions that
/// have no meaning in the guest).
const IGNORED_OPTIONS: &[&str] = &["tmpcopyup", "idmap", "ridmap"];

/// Parses OCI mount options.
pub fn parse_options<S: AsRef<str>>(options: &[S]) -> ParsedOptions {
    let mut parsed = ParsedOptions {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
    };
    for option in options.iter().map(AsRef::as_ref) {
        if let Some(&(_, clear, flag)) = FLAG_OPTIONS.iter().find(|(name, ..)| *name == option) {
            if clear {
                parsed.flags.remove(flag);
            } else {
                parsed.flags.insert(flag);
            }
        } else if let Some(&(_, flag)) = PROPAGATION_OPTIONS.iter().find(|(n, _)| *n == option) {
            parsed.propagation.push(flag);
        } else if IGNORED_OPTIONS.contains(&option) || option.is_empty() {
        } else {
            parsed.data.push(option.to_string());
        }
    }
    parsed
}

/// Parses a propagation name (`linux.rootfsPropagation`).
pub fn parse_propagation(name: &str) -> Option<MsFlags> {
    PROPAGATION_OPTIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, flag)| flag)
}

/// Flags that only a bind remount can apply to a bind mount.
const BIND_REMOUNT_FLAGS: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOATIME)
    .union(MsFlags::MS_NODIRATIME)
    .union(MsFlags::MS_RELATIME)
    .union(MsFlags::MS_STRICTATIME);

/// Resolves `path` (absolute, as the container sees it) under `root`,
/// following symlinks as if `root` were `/`, so that no symlink in the image
/// can point a mount outside the rootfs. Missing components are kept as is.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    const MAX_SYMLINKS: usize = 40;
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: Vec<OsString> = components(path);
    pending.reverse();
    let mut followed = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = std::iter::once(root.as_os_str().to_os_string())
            .chain(resolved.iter().cloned())
            .chain(std::iter::once(part.clone()))
            .collect();
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("too many levels of symbolic links in {}", path.display()),
                    ));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str().to_os_string())
        .chain(resolved)
        .collect())
}

/// The normal and `..` components of a path (roots and `.` dropped).
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// A failed mount step, naming what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct MountError {
    /// The step, e.g. `mounting proc on /proc`.
    pub what: String,
    /// The underlying failure.
    #[source]
    pub source: io::Error,
}

fn step<T, E: Into<io::Error>>(
    result: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, MountError> {
    result.map_err(|e| MountError {
        what: what(),
        source: e.into(),
    })
}

/// Creates `path` as an empty file (and its parents) unless something exists.
pub fn ensure_file(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
}

/// Performs one mount under `rootfs` (the init stage, before pivot_root).
pub fn mount_entry(rootfs: &Path, entry: &MountEntry) -> Result<(), MountError> {
    let dest = entry.destination.display();
    let target = step(resolve_in_root(rootfs, &entry.destination), || {
        format!("resolving mount destination {dest}")
    })?;
    let flags = entry.ms_flags();
    if entry.is_bind() {
        let source = entry.source.as_deref().unwrap_or(Path::new(""));
        let source_is_dir = step(fs::metadata(source), || {
            format!(
                "bind mount source {} for {dest} (it must exist in the guest)",
                source.display()
            )
        })?
        .is_dir();
        if source_is_dir {
            step(fs::create_dir_all(&target), || {
                format!("creating mount point {dest}")
            })?;
        } else {
            step(ensure_file(&target), || {
                format!("creating mount point {dest}")
            })?;
        }
        step(
            mount(
                Some(source),
                &target,
                None::<&str>,
                flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
                None::<&str>,
            ),
            || format!("bind-mounting {} on {dest}", source.display()),
        )?;
        if flags.intersects(BIND_REMOUNT_FLAGS) {
            let remount = (flags & BIND_REMOUNT_FLAGS) | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
            step(
                mount(None::<&str>, &target, None::<&str>, remount, None::<&str>),
                || format!("remounting the bind mount on {dest} with its options"),
            )?;
        }
    } else {
        step(fs::create_dir_all(&target), || {
            format!("creating mount point {dest}")
        })?;
        let source = entry
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from(&entry.fstype));
        let data = (!entry.data.is_empty()).then_some(entry.data.as_str());
        step(
            mount(
                Some(&source),
                &target,
                Some(entry.fstype.as_str()),
                flags,
                data,
            ),
            || format!("mounting {} on {dest}", entry.fstype),
        )?;
    }
    for &propagation in &entry.propagation {
        step(
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::from_bits_retain(propagation),
                None::<&str>,
            ),
            || format!("changing the propagation of {dest}"),
        )?;
    }
    Ok(())
}

/// The devices every container gets when its `/dev` is a fresh tmpfs:
/// `(name, major, minor)`, all character devices with mode 0666.
pub const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The symlinks of a standard `/dev`.
pub const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

/// Creates the standard symlinks in `dev` (a directory), replacing nothing.
pub fn create_dev_symlinks(dev: &Path) -> Result<(), MountError> {
    for (target, name) in DEV_SYMLINKS {
        let link = dev.join(name);
        if fs::symlink_metadata(&link).is_ok() {
            // The spec may have created it (ptmx is a device in some images).
            continue;
        }
        step(symlink(target, &link), || format!("creating /dev/{name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_propagation_and_data() {
        let parsed = parse_options(&[
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rslave",
            "ro",
            "rw",
            "noexec",
        ]);
        assert_eq!(
            parsed.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME | MsFlags::MS_NOEXEC
        );
        assert_eq!(
            parsed.propagation,
            vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]
        );
        assert_eq!(parsed.data, vec!["mode=755", "size=65536k"]);
    }

    #[test]
    fn rbind_is_recursive_bind_and_ignored_options_vanish() {
        let parsed = parse_options(&["rbind", "tmpcopyup", "defaults"]);
        assert_eq!(parsed.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(parsed.data.is_empty());
    }

    #[test]
    fn propagation_names() {
        assert_eq!(parse_propagation("private"), Some(MsFlags::MS_PRIVATE));
        assert_eq!(
            parse_propagation("rshared"),
            Some(MsFlags::MS_SHARED | MsFlags::MS_REC)
        );
        assert_eq!(parse_propagation("bogus"), None);
    }

    fn temp_root(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("husk-agent-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn resolve_follows_symlinks_inside_the_root() {
        let root = temp_root("resolve");
        fs::create_dir_all(root.join("real/dir")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("real/dir", root.join("rel")).unwrap();
        symlink("../../../../etc", root.join("escape")).unwrap();
        assert_eq!(
            resolve_in_root(&root, Path::new("/abs/dir/x")).unwrap(),
            root.join("real/dir/x")
        );
        assert_eq!(
            resolve_in_root(&root, Path::new("/rel")).unwrap(),
            root.join("real/dir")
        );
        assert_eq!(
            resolve_in_root(&root, Path::new("/escape/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(&root, Path::new("/../../x/./y")).unwrap(),
            root.join("x/y")
        );
        symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(&root, Path::new("/loop")).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ensure_file_creates_parents_once() {
        let root = temp_root("ensure");
        let file = root.join("a/b/c");
        ensure_file(&file).unwrap();
        fs::write(&file, b"x").unwrap();
        ensure_file(&file).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"x");
        fs::remove_dir_all(&root).unwrap();
    }
}
