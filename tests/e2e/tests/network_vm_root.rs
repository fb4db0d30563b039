//! The container's network carried into its VM, end to end (root, real QEMU
//! under TCG, real podman): each test makes a network namespace of its own
//! and runs podman inside it (`nsenter --net`), so the bridge, the veths,
//! the port forwards and every address exist only there; the only traffic
//! is between that namespace and the containers' VMs.

use husk_e2e::podman::{Podman, Runtime, IMAGE, PODMAN_TIMEOUT};
use husk_e2e::*;
use husk_testutil::netns::TestNetns;

/// busybox httpd on port 8080 serving a page that says `husk-net-ok`.
const HTTPD: &str =
    "mkdir -p /www && echo husk-net-ok > /www/index.html && exec httpd -f -p 8080 -h /www";

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(p: &Podman, args: &[&str]) -> String {
    let o = p.cmd(args);
    assert!(o.status.success(), "podman {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// An HTTP GET from the test's namespace (busybox `nc`: busybox-static's
/// `wget` crashes on non-loopback addresses).
fn get(ns: &TestNetns, addr: &str, port: u16) -> String {
    let o = ns.try_sh(&format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {addr} {port}"
    ));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until the page is served at `addr:port` from the namespace.
fn served(ns: &TestNetns, addr: &str, port: u16) {
    wait_until(
        std::time::Duration::from_secs(90),
        &format!("httpd answering on {addr}:{port}"),
        || get(ns, addr, port).contains("husk-net-ok"),
    );
}

/// Runs `HTTPD` detached on `network` with `publish`; returns its id.
fn httpd(p: &Podman, network: &str, publish: &str) -> String {
    let (o, id) = p.run_on(
        network,
        Runtime::Husk,
        &["-d", "-p", publish, IMAGE, "sh", "-c", HTTPD],
        b"",
    );
    assert!(o.status.success(), "podman run: {}", text(&o));
    id.expect("container id")
}

fn mtu_of(ns: &TestNetns, dev: &str) -> String {
    let l = ns.sh(&format!("ip -o link show {dev}"));
    l.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn vm_podman_bridge_gives_eth0_its_address_mac_and_mtu_publishes_and_connects_containers() {
    let _leaks = LeakGuard::new();
    let ns = TestNetns::new("pbridge");
    let p = Podman::in_netns(&ns.path());
    let id = httpd(&p, "bridge", "127.0.0.1:18080:8080");

    let inspect = ok(
        &p,
        &[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.MacAddress}}",
            &id,
        ],
    );
    let (ip, mac) = inspect.split_once(' ').expect("ip and mac");
    assert!(!ip.is_empty() && !mac.is_empty(), "{inspect}");
    // eth0 in the container (in the VM) has what podman recorded.
    let addr = ok(&p, &["exec", &id, "ip", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{ip}/")), "{addr} lacks {ip}");
    let guest_mac = ok(&p, &["exec", &id, "cat", "/sys/class/net/eth0/address"]);
    assert_eq!(guest_mac, mac);
    // ... and the bridge's MTU.
    let bridge = ns
        .sh("ip -o link show type bridge")
        .lines()
        .next()
        .and_then(|l| l.split(": ").nth(1))
        .expect("podman's bridge in the test namespace")
        .to_string();
    let guest_mtu = ok(&p, &["exec", &id, "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(guest_mtu, mtu_of(&ns, &bridge));
    // The kernel is the guest's: this really is the VM answering.
    assert_eq!(ok(&p, &["exec", &id, "uname", "-r"]), guest_release());

    // Published on 127.0.0.1 of the test's namespace.
    served(&ns, "127.0.0.1", 18080);
    // Reached by address from the bridge's side...
    served(&ns, ip, 8080);
    // ... and from another container on the bridge (its own VM).
    let (o, _) = p.run_on(
        "bridge",
        Runtime::Husk,
        &[
            "--rm",
            IMAGE,
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} 8080"),
        ],
        b"",
    );
    assert!(text(&o).contains("husk-net-ok"), "{}", text(&o));

    ok(&p, &["rm", "--force", "--time", "0", &id]);
    p.assert_container_gone(&id);
    assert_eq!(ns.husk_traces(), Vec::<String>::new());
    p.finish();
}

/// slirp4netns forwarding the port itself (`port_handler=slirp4netns`):
/// slirp reaches the guest through `tap0`. podman's default handler,
/// rootlessport, dials the port inside the container's namespace on the
/// host, where nothing listens (the container is in the VM); see
/// docs/networking.md.
#[test]
fn vm_podman_slirp4netns_publishes_a_port() {
    let _leaks = LeakGuard::new();
    let ns = TestNetns::new("pslirp");
    let p = Podman::in_netns(&ns.path());
    let id = httpd(
        &p,
        "slirp4netns:port_handler=slirp4netns",
        "127.0.0.1:18081:8080",
    );
    let addr = ok(&p, &["exec", &id, "ip", "-o", "addr", "show"]);
    assert!(
        addr.contains("10.0.2.100/24"),
        "slirp4netns's address: {addr}"
    );
    served(&ns, "127.0.0.1", 18081);
    ok(&p, &["rm", "--force", "--time", "0", &id]);
    p.assert_container_gone(&id);
    p.finish();
}

#[test]
fn vm_podman_network_none_has_only_loopback() {
    let _leaks = LeakGuard::new();
    let ns = TestNetns::new("pnone");
    let p = Podman::in_netns(&ns.path());
    let (o, id) = p.run_on(
        "none",
        Runtime::Husk,
        &["--rm", IMAGE, "sh", "-c", "ls /sys/class/net"],
        b"",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "lo");
    if let Some(id) = id {
        p.assert_container_gone(&id);
    }
    let _ = PODMAN_TIMEOUT;
    p.finish();
}

// ---- the CLI, as Docker drives it (a new namespace without a path, a
// prestart hook that configures the namespace of the pid husk reports)

const T: std::time::Duration = std::time::Duration::from_secs(120);

fn husk(env: &Env, args: &[&str]) -> std::process::Output {
    let mut c = env.husk();
    c.args(args);
    run_timeout(c, T)
}

fn run_detached(env: &Env, b: &Bundle, id: &str) {
    let mut c = env.husk();
    c.arg("run").arg("-d").arg("--bundle").arg(b.dir()).arg(id);
    assert_exit(&run_to_files(c, &env.dir.path().join(id), T), 0);
}

fn monitor_pid(env: &Env, id: &str) -> i32 {
    let o = husk(env, &["state", id]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["pid"].as_i64().expect("pid") as i32
}

/// As Docker's `libnetwork-setkey`: a prestart hook puts a veth (its peer
/// in the test's namespace) and an address into `/proc/PID/ns/net` of the
/// pid husk reports. That namespace is a new one, not the host's, and what
/// the hook made there reaches the container in the VM.
#[test]
fn vm_a_prestart_hook_configures_the_reported_pid_s_namespace_and_the_guest_gets_it() {
    let _leaks = LeakGuard::new();
    let env = Env::new("net-hook");
    let peer = TestNetns::new("hookpeer");
    let hook = env.dir.path().join("setkey.sh");
    std::fs::write(
        &hook,
        format!(
            r#"pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
[ -n "$pid" ] || exit 2
# never the host's namespace
[ "$(readlink /proc/$pid/ns/net)" != "$(readlink /proc/1/ns/net)" ] || exit 3
nsenter --net=/proc/$pid/ns/net sh -c 'ip link add eth0 type veth peer name p-eth0 netns {peer} && ip link set eth0 address 02:42:ac:11:00:05 up && ip addr add 10.99.0.5/24 dev eth0 && ip route add default via 10.99.0.1' || exit 4
nsenter --net=/run/netns/{peer} sh -c 'ip link set p-eth0 up && ip addr add 10.99.0.1/24 dev p-eth0' || exit 5
"#,
            peer = peer.name()
        ),
    )
    .unwrap();
    let mut b = Bundle::busybox(&[
        "sh",
        "-c",
        "cat /sys/class/net/eth0/address; ip route; nc -l -p 8080 -e echo from-the-vm",
    ]);
    b.spec["hooks"] = serde_json::json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", hook.to_str().unwrap()]}]
    });
    b.save();
    run_detached(&env, &b, "hk");
    let got = wait_until(T, "the container's answer from the peer namespace", || {
        let o = peer.try_sh("echo | busybox nc -w 5 10.99.0.5 8080");
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.contains("from-the-vm").then_some(s)
    });
    assert!(got.contains("from-the-vm"));
    let out = std::fs::read_to_string(env.dir.path().join("hk.out")).unwrap_or_default();
    assert!(
        out.contains("02:42:ac:11:00:05"),
        "the guest NIC takes eth0's MAC: {out}"
    );
    assert!(out.contains("default via 10.99.0.1"), "{out}");
    let _ = husk(&env, &["delete", "--force", "hk"]);
    env.assert_no_leaks();
}

/// kill -9 of the monitor: `delete` removes the filters it left on the
/// namespace's interface (the tap goes with QEMU).
#[test]
fn vm_delete_after_the_monitor_was_killed_removes_the_network() {
    let _leaks = LeakGuard::new();
    let env = Env::new("net-kill");
    let ns = TestNetns::new("killns");
    let peer = TestNetns::new("killpeer");
    ns.sh(&format!(
        "ip link add eth0 type veth peer name p-eth0 netns {} && ip link set eth0 up && \
         ip addr add 10.98.0.5/24 dev eth0",
        peer.name()
    ));
    let mut b = Bundle::busybox(&["sleep", "1000"]);
    for n in b.spec["linux"]["namespaces"].as_array_mut().unwrap() {
        if n["type"] == "network" {
            n["path"] = ns.path().to_string_lossy().into_owned().into();
        }
    }
    b.save();
    run_detached(&env, &b, "kn");
    assert!(ns
        .sh("tc filter show dev eth0 ingress")
        .contains("husktap0"));
    let pid = monitor_pid(&env, "kn");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(T, "the monitor to die", || !alive(pid));
    let o = husk(&env, &["delete", "--force", "kn"]);
    assert_exit(&o, 0);
    wait_until(T, "no husk traces in the namespace", || {
        ns.husk_traces().is_empty()
    });
    env.assert_no_leaks();
}

// ---- containerd without CRI: `ctr run --cni`

/// A CNI bridge config for `ctr run --cni` when the host has none (ctr
/// 1.6 reads the first config in /etc/cni/net.d and has no flag for
/// another directory); removed on drop. With one present (podman writes
/// `87-podman-bridge.conflist`), ctr uses it and this does nothing.
struct CniConf(Option<std::path::PathBuf>);

impl CniConf {
    fn ensure() -> CniConf {
        let dir = std::path::Path::new("/etc/cni/net.d");
        let has_one = std::fs::read_dir(dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".conf") || n.ends_with(".conflist")
            })
        });
        if has_one {
            return CniConf(None);
        }
        std::fs::create_dir_all(dir).unwrap();
        let f = dir.join("99-husk-e2e.conflist");
        std::fs::write(
            &f,
            r#"{"cniVersion":"0.4.0","name":"husk-e2e","plugins":[{"type":"bridge","bridge":"husk-e2e0","isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.89.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}]}}]}"#,
        )
        .unwrap();
        CniConf(Some(f))
    }
}

impl Drop for CniConf {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Waits until `echo | nc addr 8080` from the namespace prints `needle`.
fn served_text(ns: &TestNetns, addr: &str, needle: &str) {
    wait_until(T, &format!("{needle} from {addr}:8080"), || {
        let o = ns.try_sh(&format!("echo | busybox nc -w 5 {addr} 8080"));
        String::from_utf8_lossy(&o.stdout).contains(needle)
    });
}

/// `ctr run --cni` (ctr runs the CNI plugins in its own network
/// namespace, the test's, so the bridge is made there): the task gets an
/// address in the CNI range and serves the test's namespace from its VM.
#[test]
fn vm_ctr_run_cni_gives_the_task_an_address_reachable_from_the_namespace() {
    use husk_e2e::containerd::{Containerd, IMAGE as CTR_IMAGE, RUNTIME};
    let _leaks = LeakGuard::new();
    let _conf = CniConf::ensure();
    let ns = TestNetns::new("ctrcni");
    let c = Containerd::start("cni");
    c.note_socket("cni1");
    let mut run = ns.command("ctr");
    run.arg("--address")
        .arg(c.socket())
        .args(["-n", "default", "run", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(c.dir.path().join("fifo"))
        .args([
            "--rm",
            "--cni",
            CTR_IMAGE,
            "cni1",
            "sh",
            "-c",
            "ip -o -4 addr show eth0; nc -l -p 8080 -e echo from-ctr-cni",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = run.spawn().unwrap();
    // The task's address, as CNI's host-local IPAM recorded it (a file
    // named by the address, holding the container's id).
    let addr = try_wait_until(T, || {
        std::fs::read_dir("/var/lib/cni/networks")
            .ok()?
            .flatten()
            .flat_map(|net| {
                std::fs::read_dir(net.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .find(|f| std::fs::read_to_string(f.path()).is_ok_and(|s| s.contains("cni1")))
            .map(|f| f.file_name().to_string_lossy().into_owned())
    });
    let Some(addr) = addr else {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "no address from CNI's IPAM for the task; ctr said: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    served_text(&ns, &addr, "from-ctr-cni");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("inet {addr}/")),
        "eth0 in the guest: {text}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_no_leaks();
}
