//! The agent is the guest's, so the attacker's: whatever it answers, to
//! whichever call, the host neither panics nor hangs, every verb returns,
//! and teardown leaves nothing bound. Generated replies (proptest, bounded
//! to a few seconds) stand in for a hostile agent.

use std::time::Duration;

use proptest::prelude::*;

use super::fake;
use super::*;
use crate::agent::{AgentInfo, ExitStatus, ProcessInfo, Reply, Stats};

/// Every call the host makes after the handshake.
const CALLS: &[&str] = &[
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "PauseContainer",
    "ResumeContainer",
    "ExecProcess",
    "WaitProcess",
    "SignalProcess",
    "WriteStdin",
    "CloseStdin",
    "ReadStdout",
    "ReadStderr",
    "ResizePty",
    "ListProcesses",
    "UpdateContainer",
    "StatsContainer",
    "GetOOMEvent",
];

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        Just(Reply::Done),
        (any::<u32>(), ".{0,40}").prop_map(|(v, s)| Reply::Info(AgentInfo {
            api_version: v,
            agent_version: s.clone(),
            kernel_release: s,
        })),
        (any::<i32>(), any::<i32>())
            .prop_map(|(status, signal)| Reply::Exit(ExitStatus { status, signal })),
        any::<usize>().prop_map(Reply::Written),
        prop::collection::vec(any::<u8>(), 0..4096).prop_map(Reply::Data),
        prop::collection::vec((any::<i32>(), any::<i32>(), ".{0,20}", ".{0,20}"), 0..64).prop_map(
            |v| Reply::Processes(
                v.into_iter()
                    .map(|(pid, ppid, command, exec_id)| ProcessInfo {
                        pid,
                        ppid,
                        uid: 0,
                        state: "R".into(),
                        command,
                        exec_id,
                    })
                    .collect()
            )
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Reply::Stats(Stats {
            cpu_usage_usec: a,
            memory_usage: b,
            memory_limit: b,
            ..Default::default()
        })),
        "[a-z0-9]{0,12}".prop_map(Reply::Oom),
    ]
}

fn with_stdin() -> Stdio {
    Stdio {
        stdin: Some(Box::new(std::io::Cursor::new(vec![b'x'; 70_000]))),
        ..Stdio::null()
    }
}

/// Every verb once, whatever each answers; then teardown.
async fn drive(f: &fake::FakeSandbox, dir: &Path) {
    let s = &f.sandbox;
    let _ = s
        .create(
            "c1",
            &super::tests::bundle(dir, serde_json::json!({})),
            with_stdin(),
        )
        .await;
    let _ = s.start("c1").await;
    let process = br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec();
    let _ = s.exec("c1", "e1", process, with_stdin()).await;
    let _ = s.ps("c1").await;
    let _ = s.stats("c1").await;
    let _ = s.update("c1", b"{}".to_vec()).await;
    let _ = s.resize("c1", "", 24, 80).await;
    let _ = s.pause("c1").await;
    let _ = s.resume("c1").await;
    let _ = s.kill("c1", "", libc::SIGKILL, false).await;
    let _ = s.status("c1");
    let _ = s.delete("c1", true).await;
    s.teardown(false).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_agent_reply_to_any_call_leaves_the_host_in_charge(
        replies in prop::collection::vec((prop::sample::select(CALLS), reply()), 1..4),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "husk-hostile-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Virtual time: the deadlines fire without waiting for them.
        let (f, done) = rt.block_on(async {
            let f = fake::sandbox(&dir, "c1");
            for (call, r) in &replies {
                f.agent.reply_with(call, r.clone());
            }
            let done = tokio::time::timeout(Duration::from_secs(600), drive(&f, &dir)).await;
            (f, done)
        });
        let _ = std::fs::remove_dir_all(&dir);
        prop_assert!(done.is_ok(), "a verb hung on replies {replies:?}");
        prop_assert!(f.share.bound().is_empty(), "binds left after teardown: {:?}", f.share.bound());
        prop_assert!(f.vm.exited(), "the VM outlived teardown");
    }
}
