//! VM templates end to end, as root, with real QEMU (TCG) restoring the real
//! guest: clones get identities of their own, the template follows its
//! inputs, the verbs build/show/remove it, and `template.enabled = false`
//! boots every guest.

use std::path::Path;

use husk_e2e::*;

/// An environment whose templates live in its own directory (so removing
/// them cannot disturb other tests), with `enabled` and the initrd path.
fn env(tag: &str, enabled: bool, initrd: Option<&Path>) -> Env {
    Env::with(tag, Share::Auto, |t| {
        let mut tpl = toml_edit::Table::new();
        tpl.insert("enabled", toml_edit::value(enabled));
        tpl.insert("dir", toml_edit::value("PLACEHOLDER"));
        t.insert("template", toml_edit::Item::Table(tpl));
        if let Some(i) = initrd {
            t["hypervisor"]["initrd"] = toml_edit::value(i.to_string_lossy().to_string());
        }
    })
    .with_template_dir()
}

trait TemplateDir {
    fn with_template_dir(self) -> Self;
    fn templates(&self) -> std::path::PathBuf;
}

impl TemplateDir for Env {
    /// Points `template.dir` into the environment's own directory.
    fn with_template_dir(self) -> Env {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let dir = self.templates();
        std::fs::write(
            &self.config,
            text.replace("\"PLACEHOLDER\"", &format!("{:?}", dir.to_string_lossy())),
        )
        .unwrap();
        self
    }
    fn templates(&self) -> std::path::PathBuf {
        self.dir.path().join("templates")
    }
}

fn template_ids(env: &Env) -> Vec<String> {
    let o = env
        .husk()
        .args(["template", "show", "--format", "json"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// The filesystem type of the container's rootfs (the share).
const ROOTFS_KIND: &str = "awk '$2 == \"/\" { print $3 }' /proc/mounts | tail -1";

const IDENTITY: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
     cat /proc/sys/kernel/random/boot_id; date +%s; cat /proc/sys/kernel/hostname";

#[test]
fn vm_template_clones_get_their_own_rng_boot_id_clock_and_hostname() {
    let _leaks = LeakGuard::new();
    let env = env("tpl-identity", true, None);
    let o = env.husk().args(["template", "build"]).output().unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("built in"), "{}", stdout(&o));
    let ids = template_ids(&env);
    assert_eq!(ids.len(), 1, "{ids:?}");
    // No UTS namespace: the guest's own hostname is what the container sees.
    let mut b = Bundle::busybox(&["sh", "-c", IDENTITY]);
    let ns = b.spec["linux"]["namespaces"].as_array_mut().unwrap();
    ns.retain(|n| n["type"] != "uts");
    b.spec.as_object_mut().unwrap().remove("hostname");
    b.save();
    let mut seen = Vec::new();
    for id in ["tpl-clone-a", "tpl-clone-b"] {
        let o = env.run(&b, id, b"");
        assert_exit(&o, 0);
        let out = stdout(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let guest: i64 = lines[2].parse().unwrap();
        assert!((now - guest).abs() <= 5, "guest clock {guest}, host {now}");
        assert_eq!(lines[3], id, "the clone's hostname");
        seen.push((lines[0].to_string(), lines[1].to_string()));
    }
    let o = env.run(
        &Bundle::busybox(&["sh", "-c", ROOTFS_KIND]),
        "tpl-kind",
        b"",
    );
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), "9p", "a templated guest's share is 9p");
    assert_ne!(
        seen[0].0, seen[1].0,
        "two clones read the same random bytes"
    );
    assert_ne!(seen[0].1, seen[1].1, "two clones share a boot_id");
    // Both were restored from the template: no second one was built.
    assert_eq!(template_ids(&env), ids);
    let o = env.husk().args(["template", "remove"]).output().unwrap();
    assert_exit(&o, 0);
    assert!(template_ids(&env).is_empty());
    env.assert_no_leaks();
}

#[test]
fn vm_template_is_rebuilt_when_the_initrd_changes_and_off_means_cold_boot() {
    let _leaks = LeakGuard::new();
    let scratch = husk_testutil::TempDir::new("tpl-initrd");
    let initrd = scratch.path().join("initrd.img");
    std::fs::copy(guest_dir().join("initrd.img"), &initrd).unwrap();
    let env1 = env("tpl-rebuild", true, Some(&initrd));
    let b = Bundle::busybox(&["true"]);
    // The first sandbox builds the template itself.
    assert_exit(&env1.run(&b, "tpl-first", b""), 0);
    let first = template_ids(&env1);
    assert_eq!(first.len(), 1, "{first:?}");
    // A new initrd (same bytes, new file): another key, built on next use.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let bytes = std::fs::read(&initrd).unwrap();
    std::fs::remove_file(&initrd).unwrap();
    std::fs::write(&initrd, bytes).unwrap();
    assert_exit(&env1.run(&b, "tpl-second", b""), 0);
    // The new template replaced the old one.
    let second = template_ids(&env1);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    // refresh rebuilds the current one (same key, new build).
    let o = env1.husk().args(["template", "refresh"]).output().unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("built in"), "{}", stdout(&o));
    assert_eq!(template_ids(&env1), second);
    let o = env1
        .husk()
        .args(["template", "remove", "0000000000000000"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("no template 0000000000000000"),
        "{}",
        stderr(&o)
    );
    env1.husk().args(["template", "remove"]).output().unwrap();

    // Off: the guest boots, over virtio-fs, and no template is made.
    let env2 = env("tpl-off", false, None);
    let b = Bundle::busybox(&["sh", "-c", ROOTFS_KIND]);
    let o = env2.run(&b, "tpl-cold", b"");
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), "virtiofs");
    assert!(
        !env2.templates().exists(),
        "a template was made with templates off"
    );
    env1.assert_no_leaks();
}
