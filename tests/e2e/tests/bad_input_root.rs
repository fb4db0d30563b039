//! Bad input to `husk run` (as root): one clear error line, a non-zero exit,
//! and nothing left behind.

use husk_e2e::*;

#[test]
fn root_missing_bundle() {
    let _leaks = LeakGuard::new();
    let env = Env::new("nobundle");
    let o = env
        .husk()
        .args(["run", "--bundle", "/nonexistent/bundle", "x"])
        .output()
        .unwrap();
    assert_one_line_error(&o, "/nonexistent/bundle");
    env.assert_no_leaks();
}

#[test]
fn root_malformed_config_json() {
    let _leaks = LeakGuard::new();
    let env = Env::new("badjson");
    let b = Bundle::busybox(&["true"]);
    std::fs::write(b.dir().join("config.json"), "{ \"ociVersion\": ").unwrap();
    let o = env
        .husk()
        .arg("run")
        .arg("--bundle")
        .arg(b.dir())
        .arg("x")
        .output()
        .unwrap();
    assert_one_line_error(&o, "config.json");
    env.assert_no_leaks();
}

#[test]
fn root_invalid_id() {
    let _leaks = LeakGuard::new();
    let env = Env::new("badid");
    let b = Bundle::busybox(&["true"]);
    let o = env
        .husk()
        .arg("run")
        .arg("--bundle")
        .arg(b.dir())
        .arg("../evil")
        .output()
        .unwrap();
    assert_one_line_error(&o, "invalid");
    env.assert_no_leaks();
}

#[test]
fn root_missing_kernel() {
    let _leaks = LeakGuard::new();
    let env = Env::with("nokernel", Share::Auto, |t| {
        t["hypervisor"]["kernel"] = toml_edit::value("/nonexistent/vmlinux");
    });
    let b = Bundle::busybox(&["true"]);
    let o = env
        .husk()
        .arg("run")
        .arg("--bundle")
        .arg(b.dir())
        .arg("x")
        .output()
        .unwrap();
    assert_one_line_error(&o, "/nonexistent/vmlinux");
    env.assert_no_leaks();
}

#[test]
fn root_missing_qemu() {
    let _leaks = LeakGuard::new();
    let env = Env::with("noqemu", Share::Auto, |t| {
        t["hypervisor"]["path"] = toml_edit::value("/nonexistent/qemu-system-x86_64");
    });
    let b = Bundle::busybox(&["true"]);
    let o = env
        .husk()
        .arg("run")
        .arg("--bundle")
        .arg(b.dir())
        .arg("x")
        .output()
        .unwrap();
    assert_one_line_error(&o, "/nonexistent/qemu-system-x86_64");
    env.assert_no_leaks();
}

#[test]
fn root_missing_config_file() {
    let _leaks = LeakGuard::new();
    let env = Env::new("noconfig");
    let b = Bundle::busybox(&["true"]);
    let o = std::process::Command::new(husk_bin())
        .arg("--root")
        .arg(env.root())
        .args(["--config", "/nonexistent/husk.toml", "run", "--bundle"])
        .arg(b.dir())
        .arg("x")
        .output()
        .unwrap();
    assert_one_line_error(&o, "/nonexistent/husk.toml");
    env.assert_no_leaks();
}

/// A spec whose namespaces leave out the network one asks for the host's
/// network stack (`--network host`), which a VM cannot share: refused at
/// create with what to use instead, nothing booted.
#[test]
fn root_host_network_is_refused() {
    let _leaks = LeakGuard::new();
    let env = Env::new("hostnet");
    let mut b = Bundle::busybox(&["true"]);
    b.spec["linux"]["namespaces"] =
        serde_json::json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    b.save();
    for verb in ["run", "create"] {
        let o = env
            .husk()
            .arg(verb)
            .arg("--bundle")
            .arg(b.dir())
            .arg("hostnet")
            .output()
            .unwrap();
        assert_one_line_error(&o, "cannot share the host's network stack");
        let err = stderr(&o);
        assert!(err.contains("--network none"), "{err}");
        assert!(err.contains("slirp4netns"), "{err}");
    }
    env.assert_no_leaks();
}
