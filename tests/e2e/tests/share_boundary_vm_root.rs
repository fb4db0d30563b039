//! The share's host boundary against a hostile guest (issue 9, points 1
//! and 2), with real VMs: a container with every capability reaches the
//! sandbox share itself, as any guest root can (below), and attacks the
//! host through it.
//!
//! - It cannot change a host file bound read-only, nor the read-only rootfs
//!   (CVE-2020-28914 in Kata: only the guest applied `ro`).
//! - Device nodes and setuid files it plants mean nothing on the host: the
//!   share's mounts are `nosuid,nodev` in the host's (monitor's) mount table,
//!   and a planted device node cannot be opened through the share.
//! - It cannot plant a name in the share's skeleton, and a symlink a pod's
//!   sandbox container tries to plant where the host will make the mount
//!   points of a member that joins later is not followed: the members join
//!   and nothing is made or mounted in the directory the link named.
//!
//! The guest reaches the share through the agent's own mount
//! (`/proc/1/root/run/husk/share`: the attacking container shares the
//! guest's pid namespace and has every capability); it first tries a fresh
//! `mount -t virtiofs husk-share`, which in this guest kernel mounts but does
//! not show the sandbox's entries (9p cannot be mounted twice).

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use husk_e2e::containerd::{Containerd, IMAGE};
use husk_e2e::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(180);

/// Reaches the share as a guest root can, at `$S`: it mounts it afresh
/// (virtio-fs, or 9p where that is the driver) at /dev/shm/s; where that
/// fresh mount does not show the sandbox's entries, it goes through the
/// agent's own mount (`/proc/1/root/run/husk/share`: the container shares
/// the guest's pid namespace and has every capability).
fn reach_share(cid: &str) -> String {
    format!(
        "mkdir -p /dev/shm/s; \
         {{ mount -t virtiofs husk-share /dev/shm/s || \
           mount -t 9p -o trans=virtio,version=9p2000.L husk-share /dev/shm/s; }} && echo share-mounted; \
         if [ -d /dev/shm/s/{cid} ]; then S=/dev/shm/s; else S=/proc/1/root/run/husk/share; fi; \
         echo share-at=$S; ls -la $S $S/{cid} 2>&1 | head -20"
    )
}

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
    let _leaks = LeakGuard::new();
    privileged_guest_attacks(Share::Virtiofs);
}

#[test]
fn vm_privileged_guest_cannot_write_read_only_binds_over_9p() {
    let _leaks = LeakGuard::new();
    privileged_guest_attacks(Share::NineP);
}

fn privileged_guest_attacks(driver: Share) {
    let env = Env::with("share-ro", driver, |_| {});
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
    b.set_capabilities(husk_protocol::CAPABILITIES);
    b.spec["process"]["noNewPrivileges"] = json!(false);
    // The guest's pid namespace: PID 1 (the agent) and its mounts in reach.
    b.spec["linux"]["namespaces"] =
        json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]);
    let s = format!("$S/{id}");
    let script = format!(
        "{}; \
         echo pwned > {s}/mounts/{n_ro}/secret && echo ro-bind-written; \
         echo pwned > {s}/rootfs/etc/passwd && echo rootfs-written; \
         echo pwned > {s}/rootfs/planted && echo rootfs-planted; \
         mknod {s}/mounts/{n_rw}/mem c 1 3 && echo mknod-done; \
         cp /bin/busybox {s}/mounts/{n_rw}/suid && chmod 4755 {s}/mounts/{n_rw}/suid && echo suid-done; \
         ln -s / $S/next && echo top-level-planted; \
         echo attack-over; exec sleep 1000",
        reach_share(id)
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
    let done = try_wait_until(T, || output_of(&env, id).contains("attack-over")).is_some();
    let out = output_of(&env, id);
    assert!(done, "the attack did not finish: {out}");
    assert!(
        out.contains("share-at="),
        "the guest reaches the share: {out}"
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
    let _leaks = LeakGuard::new();
    let c = Containerd::start("share-join");
    let target = TempDir::new("share-target");
    let t = target.path().to_string_lossy().to_string();
    // The pod's sandbox container: every capability, the guest's pid
    // namespace (a full spec through `ctr run --config`). Where the host will
    // make the mount points of the member that joins later (`sj1-app/...`),
    // it plants symlinks to a host directory.
    let script = format!(
        "{}; ln -s {t} $S/sj1-app && echo planted; \
         mkdir $S/sj1-app2 && ln -s {t} $S/sj1-app2/rootfs && echo planted2; \
         echo plant-over; exec sleep 1000",
        reach_share("sj1")
    );
    let mut b = Bundle::busybox(&["sh", "-c", &script]);
    b.set_capabilities(husk_protocol::CAPABILITIES);
    b.spec["process"]["noNewPrivileges"] = json!(false);
    b.spec["root"]["path"] = json!(b.rootfs());
    b.spec["linux"]["namespaces"] =
        json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]);
    b.spec["annotations"] = json!({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": "sj1",
    });
    b.save();
    let spec = b.dir().join("config.json").to_string_lossy().to_string();
    let log = b.dir().join("out.log");
    let log_uri = format!("file://{}", log.display());
    let cmd = c.run_cmd(&["-d", "--log-uri", &log_uri, "--config", &spec, "sj1"]);
    let o = c.output(cmd, b"");
    assert_exit(&o, 0);
    c.wait_status("sj1", "RUNNING");
    c.note_socket("sj1");
    let planted = try_wait_until(T, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("plant-over")
    })
    .is_some();
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("the sandbox container said:\n{said}");
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=sj1",
    ];
    // The members join (on main: their mount points are made through the
    // planted links, in the host directory).
    let mut joined = Vec::new();
    for app in ["sj1-app", "sj1-app2"] {
        let mut a = vec!["-d", "--null-io"];
        a.extend_from_slice(&member);
        a.extend_from_slice(&[IMAGE, app, "sleep", "1000"]);
        let o = c.output(c.run_cmd(&a), b"");
        if o.status.code() == Some(0) {
            c.wait_status(app, "RUNNING");
            joined.push(app);
        } else {
            eprintln!("{app} did not join: {}", stderr(&o));
        }
    }
    let left: Vec<_> = std::fs::read_dir(target.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let shim_mounts: Vec<String> = c
        .shims()
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&t))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    for id in ["sj1-app2", "sj1-app", "sj1"] {
        if c.task_status(id).is_some() {
            let _ = c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]);
            c.wait_status(id, "STOPPED");
            let _ = c.ctr_out(&["task", "delete", id]);
        }
        let _ = c.ctr_out(&["container", "rm", id]);
    }
    assert!(planted, "the sandbox container did not finish: {said}");
    assert!(said.contains("share-at="), "{said}");
    assert!(
        shim_mounts.is_empty(),
        "the host mounted through a planted symlink: {shim_mounts:?}"
    );
    assert!(
        left.is_empty(),
        "the host made mount points through a planted symlink: {left:?}"
    );
    assert_eq!(
        joined,
        ["sj1-app", "sj1-app2"],
        "members could not join the pod"
    );
    c.assert_no_leaks();
}
