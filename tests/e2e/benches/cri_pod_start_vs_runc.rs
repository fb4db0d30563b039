//! Pod start through containerd's CRI (RunPodSandbox through the first
//! container RUNNING) and a second container in a running pod, the `husk`
//! handler against runc through the same containerd in the same run;
//! prints the medians and ratios. Root; boots real VMs. `make bench`.

use std::time::{Duration, Instant};

use husk_e2e::cri::{self, Cri};
use husk_e2e::LeakGuard;
use k8s_cri::v1 as api;

fn main() {
    let _leaks = LeakGuard::named("cri_pod_start_vs_runc");
    let c = Cri::start("bench");
    const RUNS: usize = 5;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut results = Vec::new();
    for handler in ["runc", cri::HANDLER] {
        let (mut starts, mut seconds) = (Vec::new(), Vec::new());
        for i in 0..RUNS {
            let pc = c.pod_config(&format!("b-{handler}-{i}"));
            let t = Instant::now();
            let pod = c.run_pod_with(&pc, handler);
            let first =
                c.run_container(&pod, &pc, Cri::container_config("one", &["sleep", "1000"]));
            c.wait_state(&first, api::ContainerState::ContainerRunning);
            starts.push(t.elapsed());
            let t = Instant::now();
            let second =
                c.run_container(&pod, &pc, Cri::container_config("two", &["sleep", "1000"]));
            c.wait_state(&second, api::ContainerState::ContainerRunning);
            seconds.push(t.elapsed());
            c.stop_remove_pod(&pod);
        }
        println!("{handler}: pod start {starts:?}, second container {seconds:?}");
        results.push((handler, median(starts), median(seconds)));
    }
    for (h, p, s) in &results {
        println!("{h}: pod start median {p:?}, second container median {s:?}");
    }
    let (r, h) = (results[0], results[1]);
    println!(
        "husk/runc: pod start {:.1}x, second container {:.1}x",
        h.1.as_secs_f64() / r.1.as_secs_f64(),
        h.2.as_secs_f64() / r.2.as_secs_f64()
    );
    c.assert_no_leaks();
}
