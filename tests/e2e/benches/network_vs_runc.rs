//! Network figures of a container under husk against the same container
//! under runc, same podman setup, same bridge, same run (root; boots real
//! VMs). podman runs in a network namespace the benchmark makes and
//! removes; every address and all traffic stay there.
//!
//! - TCP throughput container → peer: `dd` of 256 MiB from /dev/zero
//!   through `nc` to a listener on the bridge's address (dd's own timing);
//! - request rate of busybox `httpd` in the container, from a client in the
//!   test's namespace (sequential HTTP/1.0 GETs, one connection each);
//! - connect latency (TCP handshake) to it.
//!
//! `make bench` runs it; `BENCH_REQUESTS` changes the request count
//! (default 200). No target under TCG yet: this is the baseline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use husk_e2e::bench::stats;
use husk_e2e::podman::{Podman, Runtime, IMAGE};
use husk_testutil::netns::TestNetns;

const HTTPD: &str =
    "mkdir -p /www && echo husk-bench > /www/index.html && exec httpd -f -p 8080 -h /www";
const MIB: u64 = 256;

struct Figures {
    throughput_mib_s: f64,
    requests_per_s: f64,
    connect_ms: f64,
}

fn ok(p: &Podman, runtime: Runtime, args: &[&str]) -> String {
    let mut c = p.podman_with(runtime);
    c.args(args);
    let o = husk_e2e::run_timeout(c, husk_e2e::podman::PODMAN_TIMEOUT);
    assert!(
        o.status.success(),
        "podman {args:?}: {}",
        husk_e2e::stderr(&o)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Runs `f` on a thread inside the namespace at `ns`.
fn in_netns<T: Send>(ns: &TestNetns, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn get(addr: &str) -> (Duration, bool) {
    let t = Instant::now();
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return (t.elapsed(), false),
    };
    let connect = t.elapsed();
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    (connect, body.contains("husk-bench"))
}

fn measure(
    p: &Podman,
    ns: &TestNetns,
    runtime: Runtime,
    bridge_ip: &str,
    requests: usize,
) -> Figures {
    let id = ok(
        p,
        runtime,
        &[
            "run",
            "-d",
            "--pull=never",
            "--network",
            "bridge",
            IMAGE,
            "sh",
            "-c",
            HTTPD,
        ],
    );
    let ip = ok(
        p,
        runtime,
        &["inspect", "--format", "{{.NetworkSettings.IPAddress}}", &id],
    );
    let addr = format!("{ip}:8080");
    // Up?
    let t = Instant::now();
    while !in_netns(ns, || get(&addr).1) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "httpd at {addr} does not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Requests and connects.
    let (elapsed, connects) = in_netns(ns, || {
        let t = Instant::now();
        let mut connects = Vec::new();
        for _ in 0..requests {
            let (c, ok) = get(&addr);
            assert!(ok, "a request to {addr} failed");
            connects.push(c.as_secs_f64() * 1e3);
        }
        (t.elapsed(), connects)
    });
    // Throughput: container -> a listener on the bridge's address, timed
    // by the listener from the first byte to the last (the sender's nc
    // never closes its end, so the listener stops at the byte count).
    let total = MIB << 20;
    let listen = format!("{bridge_ip}:19000");
    let secs = std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let listen = listen.as_str();
        let rx = s.spawn(move || {
            in_netns(ns, move || {
                let l = std::net::TcpListener::bind(listen).unwrap();
                ready_tx.send(()).unwrap();
                let (mut c, _) = l.accept().unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut got = 0u64;
                let mut first = None;
                while got < total {
                    let n = c.read(&mut buf).unwrap();
                    assert!(n > 0, "the sender stopped after {got} bytes");
                    first.get_or_insert_with(Instant::now);
                    got += n as u64;
                }
                first.unwrap().elapsed().as_secs_f64()
            })
        });
        ready_rx.recv().unwrap();
        let mut c = p.podman_with(runtime);
        c.args([
            "exec",
            &id,
            "sh",
            "-c",
            &format!(
                "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {bridge_ip} 19000",
                MIB * 16
            ),
        ]);
        // It ends when the listener closes the connection.
        let o = husk_e2e::run_timeout(c, Duration::from_secs(300));
        if !rx.is_finished() {
            panic!(
                "the sender ended before the listener had {MIB} MiB: {}",
                husk_e2e::stderr(&o)
            );
        }
        rx.join().unwrap()
    });
    ok(p, runtime, &["rm", "--force", "--time", "0", &id]);
    Figures {
        throughput_mib_s: MIB as f64 / secs,
        requests_per_s: requests as f64 / elapsed.as_secs_f64(),
        connect_ms: stats(connects).median,
    }
}

fn main() {
    let _leaks = husk_e2e::LeakGuard::named("network_vs_runc");
    let requests: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let ns = TestNetns::new("bench");
    let p = Podman::in_netns(&ns.path());
    // One container first, so podman's bridge exists and has its address.
    let warm = ok(
        &p,
        Runtime::Runc,
        &[
            "run",
            "--rm",
            "--pull=never",
            "--network",
            "bridge",
            IMAGE,
            "true",
        ],
    );
    drop(warm);
    let bridge = ns
        .sh("ip -o link show type bridge")
        .lines()
        .next()
        .and_then(|l| l.split(": ").nth(1))
        .expect("podman's bridge in the bench's namespace")
        .to_string();
    let bridge_ip = ns
        .sh(&format!("ip -o -4 addr show dev {bridge}"))
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next().map(str::to_string))
        .expect("podman's bridge has an IPv4 address");
    let r = measure(&p, &ns, Runtime::Runc, &bridge_ip, requests);
    let h = measure(&p, &ns, Runtime::Husk, &bridge_ip, requests);
    p.finish();
    println!(
        "network over podman's bridge, --runtime husk vs --runtime runc, same namespace layout, same run \
         ({MIB} MiB through nc; {requests} sequential HTTP/1.0 GETs to busybox httpd)"
    );
    println!(
        "{:<26} {:>12} {:>12} {:>10}",
        "", "runc", "husk", "husk/runc"
    );
    println!(
        "{:<26} {:>12.1} {:>12.1} {:>10.2}",
        "throughput MiB/s (c->peer)",
        r.throughput_mib_s,
        h.throughput_mib_s,
        h.throughput_mib_s / r.throughput_mib_s
    );
    println!(
        "{:<26} {:>12.1} {:>12.1} {:>10.2}",
        "requests/s",
        r.requests_per_s,
        h.requests_per_s,
        h.requests_per_s / r.requests_per_s
    );
    println!(
        "{:<26} {:>12.3} {:>12.3} {:>10.2}",
        "connect ms (median)",
        r.connect_ms,
        h.connect_ms,
        h.connect_ms / r.connect_ms
    );
}
