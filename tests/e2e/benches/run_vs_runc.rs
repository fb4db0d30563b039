//! `husk run` against `runc run` of the same busybox bundle, in the same run:
//! median and p90 of N runs each, the ratio, and where husk's time goes
//! (from its `husk_timing` log events). Root; boots real VMs.
//!
//! `make bench` runs it; `BENCH_RUNS` changes N (default 10).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use husk_e2e::{Bundle, Env, TempDir};

use husk_e2e::bench::stats;

fn time(mut cmd: Command) -> f64 {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        out.status.success(),
        "benchmark command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ms
}

/// The timing spans of one run's JSON log, as `<phase>_ms`.
fn phases(log: &Path) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    husk_e2e::timing::phases(&text)
        .into_iter()
        .map(|(name, ms)| (format!("{name}_ms"), ms))
        .collect()
}

fn main() {
    let _leaks = husk_e2e::LeakGuard::named("run_vs_runc");
    // `cargo bench` passes --bench; nothing else is accepted.
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let env = Env::new("bench");
    let bundle = Bundle::busybox(&["true"]);
    let logs = TempDir::new("bench-logs");
    let runc_root = TempDir::new("bench-runc");

    let husk = |i: usize| {
        let mut c = env.husk();
        let log = logs.path().join(format!("husk-{i}.json"));
        c.env("HUSK_LOG", "husk_timing=info")
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json", "run", "--bundle"])
            .arg(bundle.dir())
            .arg(format!("bench-husk-{i}"));
        (c, log)
    };
    let runc = |i: usize| {
        let mut c = Command::new("runc");
        c.arg("--root")
            .arg(runc_root.path())
            .args(["run", "--bundle"])
            .arg(bundle.dir())
            .arg(format!("bench-runc-{i}"));
        c
    };

    // One warm-up of each (page cache, binaries).
    time(husk(usize::MAX).0);
    time(runc(usize::MAX));

    let mut husk_ms = Vec::new();
    let mut runc_ms = Vec::new();
    let mut breakdown: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..runs {
        // Interleave so drift on the machine hits both alike.
        let (c, log) = husk(i);
        husk_ms.push(time(c));
        let run = phases(&log);
        let phase = |name: &str| run.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        if let (Some(c), Some(s)) = (phase("create_ms"), phase("start_ms")) {
            breakdown
                .entry("create_start_ms".into())
                .or_default()
                .push(c + s);
        }
        for (k, v) in run {
            breakdown.entry(k).or_default().push(v);
        }
        runc_ms.push(time(runc(i)));
    }
    env.assert_no_leaks();

    let h = stats(husk_ms);
    let r = stats(runc_ms);
    println!(
        "husk run vs runc run of `true` (busybox bundle), {runs} runs each, same machine, same run"
    );
    println!("{:<28} {:>10} {:>10}", "", "median ms", "p90 ms");
    println!("{:<28} {:>10.1} {:>10.1}", "runc run", r.median, r.p90);
    println!("{:<28} {:>10.1} {:>10.1}", "husk run", h.median, h.p90);
    println!(
        "{:<28} {:>10.1} {:>10.1}",
        "ratio husk/runc",
        h.median / r.median,
        h.p90 / r.p90
    );
    println!();
    println!("husk phases (median ms):");
    for (name, label) in [
        ("vm_start_ms", "QEMU start (to sockets ready)"),
        ("agent_ready_ms", "kernel boot to agent ready"),
        ("create_ms", "container create (in the guest)"),
        ("start_ms", "container start"),
        ("create_start_ms", "container create+start"),
        ("teardown_ms", "teardown"),
        ("pod_boot_ms", "sandbox boot (total)"),
    ] {
        if let Some(v) = breakdown.get(name) {
            println!("  {:<32} {:>8.1}", label, stats(v.clone()).median);
        } else {
            println!("  {:<32} {:>8}", label, "n/a");
        }
    }
}
