//! `podman run --rm IMG true` with `--runtime husk` against the same with
//! `--runtime runc`, same image, same podman setup, same run: median and
//! p90 of N runs each (interleaved), and the ratio. Root; boots real VMs.
//!
//! `make bench` runs it; `BENCH_RUNS` changes N (default 10).

use std::time::Instant;

use husk_e2e::podman::{Podman, Runtime, IMAGE};
use husk_e2e::{assert_exit, stderr};

use husk_e2e::bench::stats;

/// One `podman run --rm IMG true`; returns its wall time in ms.
fn run(p: &Podman, runtime: Runtime) -> f64 {
    let t = Instant::now();
    let (o, _) = p.run_with(runtime, &["--rm", IMAGE, "true"], b"");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !o.status.success() {
        eprintln!("podman run ({runtime:?}) failed: {}", stderr(&o));
    }
    assert_exit(&o, 0);
    ms
}

fn main() {
    let _leaks = husk_e2e::LeakGuard::named("podman_run_vs_runc");
    // `cargo bench` passes --bench; nothing else is accepted.
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let p = Podman::new();
    // One warm-up of each (page cache, binaries, podman's database).
    run(&p, Runtime::Husk);
    run(&p, Runtime::Runc);

    let mut husk_ms = Vec::new();
    let mut runc_ms = Vec::new();
    for _ in 0..runs {
        // Interleaved, so drift on the machine hits both alike.
        husk_ms.push(run(&p, Runtime::Husk));
        runc_ms.push(run(&p, Runtime::Runc));
    }
    p.finish();

    let h = stats(husk_ms);
    let r = stats(runc_ms);
    println!(
        "podman run --rm of `true` (busybox image), --runtime husk vs --runtime runc, \
         {runs} runs each, same machine, same run"
    );
    println!("{:<28} {:>10} {:>10}", "", "median ms", "p90 ms");
    println!("{:<28} {:>10.1} {:>10.1}", "podman + runc", r.median, r.p90);
    println!("{:<28} {:>10.1} {:>10.1}", "podman + husk", h.median, h.p90);
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "ratio husk/runc",
        h.median / r.median,
        h.p90 / r.p90
    );
    println!(
        "{:<28} {:>10.1} {:>10.1}",
        "husk's extra (ms)",
        h.median - r.median,
        h.p90 - r.p90
    );
}
