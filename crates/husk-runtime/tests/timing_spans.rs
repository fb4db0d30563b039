//! The timing spans, as the front ends' loggers report them. Its own test
//! binary: the logger is process-wide (a thread's own would race the
//! callsite cache with the other tests' threads).

use std::sync::{Arc, Mutex};

use husk_runtime::bundle::Bundle;
use husk_runtime::sandbox::{fake, Stdio};

/// A writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_phase_is_a_timing_span_reported_when_it_closes() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("husk_timing=info")
        .with_span_events(husk_runtime::timing::SPAN_EVENTS)
        .with_writer(move || writer.clone())
        .json()
        .init();
    let tmp = husk_testutil::TempDir::new("spans");
    let root = tmp.path().to_path_buf();
    std::fs::create_dir_all(root.join("rootfs")).unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    });
    let bundle = Bundle {
        dir: root.clone(),
        spec: serde_json::from_value(spec).unwrap(),
        rootfs: root.join("rootfs"),
    };
    let f = fake::sandbox(&root, "c1");
    f.sandbox
        .create("c1", &bundle, Stdio::null())
        .await
        .unwrap();
    f.sandbox.start("c1").await.unwrap();
    f.sandbox.teardown(false).await;

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let closed: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| {
            v["target"] == husk_runtime::timing::TIMING && v["fields"]["message"] == "close"
        })
        .map(|v| {
            assert!(v["fields"]["time.busy"].is_string(), "{v}");
            assert!(v["fields"]["time.idle"].is_string(), "{v}");
            v["span"]["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(closed, ["create", "start", "teardown"], "{text}");
}
