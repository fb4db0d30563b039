//! The share with real mounts (root): read-only binds are read-only on the
//! host side, every bind is nosuid,nodev, names planted in the share are
//! not followed, teardown leaves nothing.
//!
//! `cargo test -p husk-runtime --features root-tests --test share_root`

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use husk_runtime::sandbox::ShareBinds;
use husk_runtime::share::{Share, ShareError};
use husk_runtime::translate::ShareBind;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "share_root tests make real mounts: run them as root"
    );
}

/// A scratch dir holding `src/` (a host tree) and the sandbox's share.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        require_root();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "husk-share-root-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(dir.join("src/tree/sub")).unwrap();
        fs::write(dir.join("src/tree/file"), "host data").unwrap();
        fs::write(dir.join("src/single"), "host file").unwrap();
        fs::create_dir_all(dir.join("outside")).unwrap();
        Scratch { dir }
    }
    fn share(&self) -> Share {
        Share::create(&self.staging(), &self.served()).expect("share")
    }
    fn staging(&self) -> PathBuf {
        self.dir.join("share.host")
    }
    fn served(&self) -> PathBuf {
        self.dir.join("share")
    }
    fn src(&self, p: &str) -> PathBuf {
        self.dir.join("src").join(p)
    }
    /// Mount points of mounts under the scratch dir, with their options.
    fn mounts(&self) -> Vec<(PathBuf, String)> {
        mounts_under(&self.dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Whatever a failed test left: detach, then remove the scratch dir.
        let mut left = mounts_under(&self.dir);
        left.reverse();
        for (m, _) in left {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn mounts_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let mp = PathBuf::from(f[4]);
            mp.starts_with(dir).then(|| (mp, f[5].to_string()))
        })
        .collect()
}

fn bind(src: &Path, share_path: &str, is_dir: bool, readonly: bool) -> ShareBind {
    ShareBind {
        host_source: src.to_path_buf(),
        share_path: PathBuf::from(share_path),
        is_dir,
        readonly,
        mount_targets: Vec::new(),
    }
}

fn erofs(r: std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EROFS))
}

#[test]
fn read_only_binds_are_read_only_on_the_host_side_submounts_too() {
    let s = Scratch::new("ro");
    // A submount inside the tree: a recursive bind must make it ro too.
    nix::mount::mount(
        Some("tmpfs"),
        &s.src("tree/sub"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    fs::write(s.src("tree/sub/inner"), "sub data").unwrap();
    let mut share = s.share();
    share
        .bind_container(
            "c1",
            &[
                bind(&s.src("tree"), "c1/rootfs", true, true),
                bind(&s.src("single"), "c1/mounts/1", false, true),
                bind(&s.src("tree"), "c1/mounts/2", true, false),
            ],
        )
        .unwrap();
    for root in [s.served(), s.staging()] {
        let ro = root.join("c1/rootfs");
        assert_eq!(fs::read_to_string(ro.join("file")).unwrap(), "host data");
        assert!(
            erofs(fs::write(ro.join("file"), "guest")),
            "{}",
            ro.display()
        );
        assert!(erofs(fs::write(ro.join("new"), "guest")));
        assert!(
            erofs(fs::write(ro.join("sub/inner"), "guest")),
            "the submount is read-only too"
        );
        assert!(erofs(fs::write(root.join("c1/mounts/1"), "guest")));
    }
    // The served top level is read-only: no name can be planted there.
    assert!(erofs(fs::create_dir(s.served().join("c2"))));
    assert!(erofs(std::os::unix::fs::symlink(
        "/etc",
        s.served().join("c1/evil")
    )));
    // The writable bind stays writable, and the host's tree was not changed
    // by the read-only binds.
    fs::write(s.served().join("c1/mounts/2/written"), "rw").unwrap();
    assert_eq!(fs::read_to_string(s.src("tree/written")).unwrap(), "rw");
    assert_eq!(fs::read_to_string(s.src("tree/file")).unwrap(), "host data");
    assert_eq!(fs::read_to_string(s.src("single")).unwrap(), "host file");
    share.teardown();
    nix::mount::umount2(&s.src("tree/sub"), nix::mount::MntFlags::MNT_DETACH).unwrap();
}

#[test]
fn every_mount_in_the_share_is_nosuid_nodev() {
    let s = Scratch::new("flags");
    let mut share = s.share();
    share
        .bind_container(
            "c1",
            &[
                bind(&s.src("tree"), "c1/rootfs", true, false),
                bind(&s.src("single"), "c1/mounts/0", false, false),
            ],
        )
        .unwrap();
    let m = s.mounts();
    let in_share: Vec<_> = m
        .iter()
        .filter(|(p, _)| p.starts_with(s.served()) || p.starts_with(s.staging()))
        .collect();
    assert!(
        in_share.len() >= 6,
        "share, staging and both binds in each: {m:?}"
    );
    for (p, opts) in &in_share {
        let o: Vec<&str> = opts.split(',').collect();
        assert!(
            o.contains(&"nosuid") && o.contains(&"nodev"),
            "{} {opts}",
            p.display()
        );
    }
    let served: Vec<_> = in_share.iter().filter(|(p, _)| *p == s.served()).collect();
    assert!(
        served.iter().all(|(_, o)| o.split(',').any(|x| x == "ro")),
        "{served:?}"
    );
    share.teardown();
}

#[test]
fn planted_symlinks_are_not_followed() {
    let s = Scratch::new("symlink");
    let mut share = s.share();
    share
        .bind_container("c1", &[bind(&s.src("tree"), "c1/rootfs", true, false)])
        .unwrap();
    // Names the guest (or anyone) planted where the host will make a
    // container's mount points: the container dir itself, and a dir below.
    std::os::unix::fs::symlink(s.dir.join("outside"), s.staging().join("c2")).unwrap();
    fs::create_dir(s.staging().join("c3")).unwrap();
    std::os::unix::fs::symlink(s.dir.join("outside"), s.staging().join("c3/mounts")).unwrap();
    // And one inside a writable bind, where a relative name could lead.
    std::os::unix::fs::symlink(s.dir.join("outside"), s.src("tree/link")).unwrap();

    for (cid, at) in [("c2", "c2/rootfs"), ("c3", "c3/mounts/0")] {
        let e = share
            .bind_container(cid, &[bind(&s.src("single"), at, false, false)])
            .unwrap_err();
        assert!(
            matches!(&e, ShareError::MountPoint { source, .. } if source.raw_os_error() == Some(libc::ELOOP)),
            "{cid}: {e:?}"
        );
    }
    let e = share
        .bind_container(
            "c4",
            &[bind(&s.src("single"), "c1/rootfs/link/x", false, false)],
        )
        .unwrap_err();
    assert!(matches!(e, ShareError::MountPoint { .. }), "{e:?}");
    assert_eq!(
        fs::read_dir(s.dir.join("outside")).unwrap().count(),
        0,
        "nothing was made through a symlink"
    );
    assert!(
        !s.mounts()
            .iter()
            .any(|(p, _)| p.starts_with(s.dir.join("outside"))),
        "nothing was mounted through a symlink"
    );
    fs::remove_file(s.staging().join("c2")).unwrap();
    fs::remove_file(s.staging().join("c3/mounts")).unwrap();
    fs::remove_dir(s.staging().join("c3")).unwrap();
    fs::remove_file(s.src("tree/link")).unwrap();
    share.teardown();
}

#[test]
fn host_kernel_filesystems_are_refused_however_named() {
    let s = Scratch::new("kernelfs");
    std::os::unix::fs::symlink("/proc", s.dir.join("proc-link")).unwrap();
    let mut share = s.share();
    for src in [
        s.dir.join("proc-link"),
        PathBuf::from("/sys"),
        PathBuf::from("/dev"),
    ] {
        let e = share
            .bind_container("c1", &[bind(&src, "c1/mounts/0", true, false)])
            .unwrap_err();
        assert!(
            matches!(e, ShareError::HostKernelFs(_)),
            "{}: {e:?}",
            src.display()
        );
    }
    share.teardown();
}

#[test]
fn unbind_and_teardown_leave_nothing() {
    let s = Scratch::new("teardown");
    let mut share = s.share();
    let c = |cid: &str| {
        vec![
            bind(&s.src("tree"), &format!("{cid}/rootfs"), true, true),
            bind(&s.src("single"), &format!("{cid}/mounts/3"), false, false),
        ]
    };
    share.bind_container("c1", &c("c1")).unwrap();
    share.bind_container("c2", &c("c2")).unwrap();
    share.unbind_container("c2").unwrap();
    assert!(!s.staging().join("c2").exists(), "c2's skeleton removed");
    assert!(s.served().join("c1/rootfs/file").exists());
    // The same id can come back.
    share.bind_container("c2", &c("c2")).unwrap();
    // A failed bind leaves nothing of its container.
    let e = share
        .bind_container(
            "c3",
            &[
                bind(&s.src("tree"), "c3/rootfs", true, false),
                bind(&s.dir.join("missing"), "c3/mounts/0", true, false),
            ],
        )
        .unwrap_err();
    assert!(matches!(e, ShareError::MissingSource(_)), "{e:?}");
    assert!(!s.staging().join("c3").exists());
    share.teardown();
    share.teardown();
    assert_eq!(s.mounts(), vec![], "no mount left");
    let left: Vec<_> = fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut left: Vec<_> = left
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["outside", "src"], "share and staging removed");
    // The sources are intact.
    assert_eq!(fs::read_to_string(s.src("tree/file")).unwrap(), "host data");
    match fs::metadata(s.src("single")) {
        Ok(m) => assert!(m.is_file()),
        Err(e) => assert_ne!(e.kind(), ErrorKind::NotFound, "source deleted"),
    }
}

#[test]
fn a_read_only_rootfs_gets_its_mount_points_made_on_the_host_inside_it() {
    let s = Scratch::new("targets");
    // An image symlink that would lead out of the rootfs.
    std::os::unix::fs::symlink(s.dir.join("outside"), s.src("tree/escape")).unwrap();
    let mut share = s.share();
    let mut b = bind(&s.src("tree"), "c1/rootfs", true, true);
    b.mount_targets = vec![
        (PathBuf::from("/etc/hosts"), true),
        (PathBuf::from("/var/tmp"), false),
        (PathBuf::from("/escape/x"), false),
        (PathBuf::from("/file"), false),
    ];
    share.bind_container("c1", &[b]).unwrap();
    assert!(s.src("tree/etc/hosts").is_file());
    assert!(s.src("tree/var/tmp").is_dir());
    assert_eq!(fs::read_to_string(s.src("tree/file")).unwrap(), "host data");
    assert_eq!(
        fs::read_dir(s.dir.join("outside")).unwrap().count(),
        0,
        "a symlink in the image led out of the rootfs"
    );
    assert!(erofs(fs::write(
        s.served().join("c1/rootfs/etc/hosts"),
        "x"
    )));
    share.teardown();
}
