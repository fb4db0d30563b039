//! The share's host boundary against a hostile guest (issue 9, points 1
//! and 2), with real VMs: a container with every capability mounts the
//! sandbox share itself (`mount -t virtiofs husk-share ...`, as any guest
//! root can) and attacks the host through it.
//!
//! - It cannot change a host file bound read-only, nor the read-only rootfs
//!   (CVE-2020-28914 in Kata: only the guest applied `ro`).
//! - Device nodes and setuid files it plants mean nothing on the host: the
//!   share's mounts are `nosuid,nodev` in the host's (monitor's) mount table,
//!   and a planted device node cannot be opened through the share.
//! - A symlink it plants where the host will make a later container's mount
//!   points is not followed when that container joins the pod.

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use husk_e2e::containerd::{Containerd, IMAGE};
use husk_e2e::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(180);

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
];

/// Mounts the share at /dev/shm/s (virtio-fs, or 9p where that is the
/// driver), as a guest root can.
const MOUNT_SHARE: &str = "mkdir -p /dev/shm/s && \
    { mount -t virtiofs husk-share /dev/shm/s || \
      mount -t 9p -o trans=virtio,version=9p2000.L husk-share /dev/shm/s; } && echo share-mounted";

fn husk(env: &Env, args: &[&str]) -> Output {
    let mut c = env.husk();
    c.args(args);
    run_timeout(c, T)
}

fn output_of(env: &Env, id: &str) -> String {
    std::fs::read_to_string(env.dir.path().join(format!("{id}.out"))).unwrap_or_default()
        + &std::fs::read_to_string(env.dir.path().join(format!("{id}.err"))).unwrap_or_default()
}

/// Mount points and options in `pid`'s mount table at or below `under`.
fn mounts_of(pid: i32, under: &str) -> Vec<(String, String)> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[4] == under || f[4].starts_with(&format!("{under}/")))
                .then(|| (f[4].to_string(), f[5].to_string()))
        })
        .collect()
}

fn has_opt(opts: &str, o: &str) -> bool {
    opts.split(',').any(|x| x == o)
}

#[test]
fn vm_privileged_guest_cannot_write_read_only_binds_or_plant_devices() {
    let env = Env::with("share-ro", Share::Virtiofs, |_| {});
    let host = TempDir::new("share-host");
    let ro_dir = host.path().join("ro");
    let rw_dir = host.path().join("rw");
    std::fs::create_dir_all(&ro_dir).unwrap();
    std::fs::create_dir_all(&rw_dir).unwrap();
    std::fs::write(ro_dir.join("secret"), "host data\n").unwrap();

    let id = "shareattack";
    let mut b = Bundle::busybox(&["sh", "-c", ""]);
    let n_ro = b.spec["mounts"].as_array().unwrap().len();
    let n_rw = n_ro + 1;
    b.add_mount(json!({"destination": "/ro", "type": "bind",
        "source": ro_dir, "options": ["rbind", "ro"]}));
    b.add_mount(json!({"destination": "/rw", "type": "bind",
        "source": rw_dir, "options": ["rbind", "rw"]}));
    // Mount points of a read-only rootfs must exist in it.
    for d in ["ro", "rw"] {
        std::fs::create_dir_all(b.rootfs().join(d)).unwrap();
    }
    let passwd_before = std::fs::read(b.rootfs().join("etc/passwd")).unwrap();
    b.spec["root"]["readonly"] = json!(true);
    b.set_capabilities(ALL_CAPS);
    b.spec["process"]["noNewPrivileges"] = json!(false);
    let s = format!("/dev/shm/s/{id}");
    let script = format!(
        "{MOUNT_SHARE}; \
         echo pwned > {s}/mounts/{n_ro}/secret && echo ro-bind-written; \
         echo pwned > {s}/rootfs/etc/passwd && echo rootfs-written; \
         echo pwned > {s}/rootfs/planted && echo rootfs-planted; \
         mknod {s}/mounts/{n_rw}/mem c 1 3 && echo mknod-done; \
         cp /bin/busybox {s}/mounts/{n_rw}/suid && chmod 4755 {s}/mounts/{n_rw}/suid && echo suid-done; \
         ln -s / /dev/shm/s/next && echo top-level-planted; \
         echo attack-over; exec sleep 1000"
    );
    b.spec["process"]["args"] = json!(["sh", "-c", script]);
    b.save();

    let mut c = env.husk();
    c.args([
        "run".as_ref(),
        "-d".as_ref(),
        "--bundle".as_ref(),
        b.dir().as_os_str(),
        OsStr::new(id),
    ]);
    let o = run_to_files(c, &env.dir.path().join(id), T);
    assert_exit(&o, 0);
    let done = wait_until(T, || output_of(&env, id).contains("attack-over"));
    let out = output_of(&env, id);
    assert!(done, "the attack did not finish: {out}");
    assert!(
        out.contains("share-mounted"),
        "the guest mounts the share: {out}"
    );
    eprintln!("guest said:\n{out}");

    let st: Value = serde_json::from_slice(&husk(&env, &["state", id]).stdout).unwrap();
    let monitor = st["pid"].as_i64().unwrap() as i32;
    let state_dir = env.state_dir(id);
    let share = state_dir.join("share");
    let share_s = share.to_string_lossy().to_string();
    // What the host sees, in the monitor's mount namespace where the share's
    // binds live: nosuid,nodev everywhere, ro where the spec says ro.
    let mounts = mounts_of(monitor, &state_dir.to_string_lossy());
    let bad: Vec<_> = mounts
        .iter()
        .filter(|(_, o)| !(has_opt(o, "nosuid") && has_opt(o, "nodev")))
        .collect();
    let find = |p: String| mounts.iter().find(|(m, _)| *m == p).cloned();
    let planted_dev = std::fs::File::open(format!(
        "/proc/{monitor}/root{share_s}/{id}/mounts/{n_rw}/mem"
    ));

    let _ = husk(&env, &["kill", id, "KILL"]);
    let _ = husk(&env, &["delete", "--force", id]);

    assert_eq!(
        std::fs::read_to_string(ro_dir.join("secret")).unwrap(),
        "host data\n",
        "the guest changed a host file bound read-only; guest said:\n{out}"
    );
    assert_eq!(
        std::fs::read(b.rootfs().join("etc/passwd")).unwrap(),
        passwd_before,
        "the guest changed the read-only rootfs"
    );
    assert!(
        !b.rootfs().join("planted").exists(),
        "the guest created a file in the read-only rootfs"
    );
    assert!(
        !out.contains("top-level-planted"),
        "the guest wrote in the share's skeleton: {out}"
    );
    assert!(!mounts.is_empty(), "no share mounts in the monitor's table");
    assert!(
        bad.is_empty(),
        "share mounts without nosuid,nodev on the host: {bad:?}"
    );
    for (p, ro) in [
        (format!("{share_s}/{id}/rootfs"), true),
        (format!("{share_s}/{id}/mounts/{n_ro}"), true),
        (format!("{share_s}/{id}/mounts/{n_rw}"), false),
        (share_s.clone(), true),
    ] {
        let (_, o) = find(p.clone()).unwrap_or_else(|| panic!("{p} not mounted: {mounts:?}"));
        assert_eq!(has_opt(&o, "ro"), ro, "{p}: {o}");
    }
    if out.contains("mknod-done") {
        let e = planted_dev.expect_err("a device node planted in the share opens on the host");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
    // The setuid file landed in the writable bind, where the host mount
    // is nosuid (checked above).
    env.assert_no_leaks();
}

#[test]
fn vm_symlink_planted_in_the_share_is_not_followed_when_a_container_joins() {
    let c = Containerd::start("share-join");
    let target = TempDir::new("share-target");
    let t = target.path().to_string_lossy().to_string();
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=sj1",
        "--cap-add",
        "CAP_SYS_ADMIN",
    ];
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=sj1",
    ];
    // Where the host will make the member's mount points (`sj1-app/...`),
    // and one level below, the guest plants symlinks to a host directory.
    let script = format!(
        "{MOUNT_SHARE}; ln -s {t} /dev/shm/s/sj1-app && echo planted; \
         mkdir /dev/shm/s/sj1-app2 && ln -s {t} /dev/shm/s/sj1-app2/rootfs && echo planted2; \
         touch /dev/shm/plant-over; exec sleep 1000"
    );
    c.run_detached(&sandbox, "sj1", &["sh", "-c", &script]);
    let o = c.ctr_out(&[
        "task", "exec", "--exec-id", "look", "sj1", "sh", "-c",
        "for i in $(seq 600); do [ -e /dev/shm/plant-over ] && break; sleep 0.1; done; ls -la /dev/shm/s/",
    ]);
    eprintln!("share as the guest sees it: {}{}", stdout(&o), stderr(&o));
    // The member joins (on main: its mount points are made through the
    // planted link, in the host directory).
    let mut joined = true;
    for app in ["sj1-app", "sj1-app2"] {
        let mut a = vec!["-d", "--null-io"];
        a.extend_from_slice(&member);
        a.extend_from_slice(&[IMAGE, app, "sleep", "1000"]);
        let o = c.output(c.run_cmd(&a), b"");
        if o.status.code() == Some(0) {
            c.wait_status(app, "RUNNING");
        } else {
            joined = false;
            eprintln!("{app} did not join: {}", stderr(&o));
        }
    }
    let left: Vec<_> = std::fs::read_dir(target.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let host_mounts = mounts_under(target.path());
    let shim_mounts: Vec<String> = c
        .shims()
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|l| l.contains(&t))
        .collect();
    for id in ["sj1-app2", "sj1-app", "sj1"] {
        let _ = c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]);
        if c.task_status(id).is_some() {
            c.wait_status(id, "STOPPED");
            let _ = c.ctr_out(&["task", "delete", id]);
        }
        let _ = c.ctr_out(&["container", "rm", id]);
    }
    assert!(
        shim_mounts.is_empty(),
        "the host mounted through a planted symlink: {shim_mounts:?}"
    );
    assert!(host_mounts.is_empty(), "{host_mounts:?}");
    assert!(
        left.is_empty(),
        "the host made mount points through a planted symlink: {left:?}"
    );
    assert!(joined, "a member could not join the pod");
    c.assert_no_leaks();
}
