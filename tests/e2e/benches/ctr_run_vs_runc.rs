//! containerd with the husk shim against containerd with runc's shim, in
//! the same run on the same private containerd: `ctr run --rm IMAGE id
//! true` N times each (interleaved), median and p90 and their ratio; then a
//! container started into a running pod (the VM is already there) against
//! a new pod. Root; boots real VMs.
//!
//! `BENCH_RUNS` changes N (default 10).

use std::process::Stdio;
use std::time::Instant;

use husk_e2e::containerd::{Containerd, IMAGE, RUNTIME};

use husk_e2e::bench::{stats, Stats};

/// Times `ctr run --rm --runtime RUNTIME OPTS IMAGE id true`, in ms.
fn run(c: &Containerd, runtime: &str, opts: &[&str], id: &str) -> f64 {
    let mut a = vec!["--rm", "--null-io"];
    a.extend_from_slice(opts);
    a.extend_from_slice(&[IMAGE, id, "true"]);
    let mut cmd = c.ctr();
    cmd.args(["run", "--runtime", runtime])
        .args(&a)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output().expect("spawn ctr");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        out.status.success(),
        "ctr run ({runtime}) failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tail()
    );
    ms
}

/// The shim's timing spans (they reach containerd's log through the
/// shim's log FIFO), as `<phase>_ms`.
fn phases(log: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let mut out: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for (name, ms) in husk_e2e::timing::phases(&text) {
        out.entry(format!("{name}_ms")).or_default().push(ms);
    }
    out
}

fn row(label: &str, s: &Stats) {
    println!("{label:<40} {:>10.1} {:>10.1}", s.median, s.p90);
}

fn main() {
    let _leaks = husk_e2e::LeakGuard::named("ctr_run_vs_runc");
    // `cargo bench` passes --bench; nothing else is accepted.
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let c = Containerd::start("bench");
    const RUNC: &str = "io.containerd.runc.v2";

    // One warm-up of each (page cache, binaries, snapshots).
    run(&c, RUNTIME, &[], "warm-husk");
    run(&c, RUNC, &[], "warm-runc");

    let mut husk = Vec::new();
    let mut runc = Vec::new();
    for i in 0..runs {
        // Interleaved, so drift on the machine hits both alike.
        husk.push(run(&c, RUNTIME, &[], &format!("husk-{i}")));
        runc.push(run(&c, RUNC, &[], &format!("runc-{i}")));
    }

    // A pod: its sandbox container boots the VM once; each member starts
    // in the running guest.
    let pod = "bench-pod";
    let sandbox = format!("io.kubernetes.cri.sandbox-id={pod}");
    let o = c.ctr_out(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        &sandbox,
        IMAGE,
        pod,
        "sleep",
        "100000",
    ]);
    assert!(o.status.success(), "pod sandbox: {}", husk_e2e::stderr(&o));
    c.wait_status(pod, "RUNNING");
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &sandbox,
    ];
    run(&c, RUNTIME, &member, "member-warm");
    let mut members = Vec::new();
    for i in 0..runs {
        members.push(run(&c, RUNTIME, &member, &format!("member-{i}")));
    }
    let o = c.ctr_out(&["task", "kill", "-s", "SIGKILL", pod]);
    assert!(o.status.success(), "{}", husk_e2e::stderr(&o));
    c.wait_status(pod, "STOPPED");
    c.ctr_out(&["task", "delete", pod]);
    c.ctr_out(&["container", "rm", pod]);
    c.assert_no_leaks();

    let breakdown = phases(&c.dir.path().join("containerd.log"));
    let h = stats(husk);
    let r = stats(runc);
    let m = stats(members);
    println!(
        "ctr run --rm IMAGE id true through containerd 1.6, {runs} runs each, same machine, same run"
    );
    println!("{:<40} {:>10} {:>10}", "", "median ms", "p90 ms");
    row("runc shim (io.containerd.runc.v2)", &r);
    row("husk shim, new pod (new VM)", &h);
    row("husk shim, container into a running pod", &m);
    println!(
        "{:<40} {:>10.1} {:>10.1}",
        "ratio husk new pod / runc",
        h.median / r.median,
        h.p90 / r.p90
    );
    println!(
        "{:<40} {:>10.1} {:>10.1}",
        "ratio husk into pod / runc",
        m.median / r.median,
        m.p90 / r.p90
    );
    println!(
        "{:<40} {:>10.2} {:>10.2}",
        "ratio into pod / new pod",
        m.median / h.median,
        m.p90 / h.p90
    );
    println!();
    println!("husk phases, all runs (median ms):");
    for (name, label) in [
        ("vm_start_ms", "QEMU start (to sockets ready)"),
        ("agent_ready_ms", "kernel boot to agent ready"),
        ("pod_boot_ms", "pod boot (total)"),
        ("create_ms", "container create in the guest"),
        ("teardown_ms", "pod teardown"),
    ] {
        match breakdown.get(name) {
            Some(v) => println!("  {label:<36} {:>8.1}", stats(v.clone()).median),
            None => println!("  {label:<36} {:>8}", "n/a"),
        }
    }
}
