//! The lifecycle without root and without QEMU: a fake agent, a fake VM and
//! a fake share behind the real [`Sandbox`].

use std::time::Duration;

use husk_testutil::TempDir;

use super::fake::{self, FakeSandbox};
use super::*;
use crate::status::Status;

/// A state root for one test (husk-testutil's temp dir).
type Root = TempDir;

fn root(name: &str) -> Root {
    TempDir::new(&format!("lc-{name}"))
}

#[test]
fn the_leak_guard_watches_the_default_root() {
    assert_eq!(
        husk_testutil::leak::HUSK_STATE_ROOT,
        crate::sandbox_dir::DEFAULT_ROOT
    );
}

pub(super) fn bundle(dir: &Path, hooks: serde_json::Value) -> Bundle {
    let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "hooks": hooks,
    }))
    .unwrap();
    Bundle {
        dir: dir.to_path_buf(),
        spec,
        rootfs: dir.join("rootfs"),
    }
}

async fn up(name: &str) -> (Root, FakeSandbox) {
    let r = root(name);
    let f = fake::sandbox(&r.0, "c1");
    f.sandbox
        .create("c1", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap();
    (r, f)
}

async fn running(name: &str) -> (Root, FakeSandbox) {
    let (r, f) = up(name).await;
    f.sandbox.start("c1").await.unwrap();
    (r, f)
}

async fn exit_of(s: &Sandbox, cid: &str, exec_id: &str) -> Exit {
    let mut rx = s.wait(cid, exec_id).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some))
        .await
        .expect("the process ends")
        .unwrap();
    e.expect("waited for Some")
}

fn refused(r: Result<impl std::fmt::Debug, SandboxError>, needle: &str) {
    match r {
        Err(SandboxError::Refused(m)) => assert!(m.contains(needle), "{m}"),
        other => panic!("expected a refusal naming {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn create_binds_the_rootfs_and_records_created() {
    let (r, f) = up("create").await;
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Created);
    assert_eq!(f.share.bound(), vec!["c1"]);
    assert!(f.agent.holds("c1"));
    let rec = crate::state::ContainerState::load(&r.0.join("c1"), "c1").unwrap();
    assert_eq!(rec.status, Status::Created);
    assert_eq!(rec.vm_pid, Some(4242));
}

#[tokio::test]
async fn a_second_create_of_the_same_id_is_refused() {
    let (r, f) = up("dup").await;
    let e = f
        .sandbox
        .create("c1", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::Exists(_)), "{e}");
}

#[tokio::test]
async fn a_create_the_agent_refuses_leaves_nothing() {
    let r = root("create-fails");
    let f = fake::sandbox(&r.0, "c1");
    f.agent.fail("CreateContainer", "no such file: /bin/sh");
    let e = f
        .sandbox
        .create("c1", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
    assert!(f.share.bound().is_empty());
    assert!(f.vm.exited(), "the owner's failed create takes the VM");
    assert!(!r.0.join("c1").exists(), "the state dir is gone");
}

#[tokio::test]
async fn a_failing_create_runtime_hook_removes_the_container() {
    let r = root("hook-fails");
    let f = fake::sandbox(&r.0, "p");
    f.sandbox
        .create("p", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap();
    let hooks = serde_json::json!({"createRuntime": [{"path": "/bin/false"}]});
    let e = f
        .sandbox
        .create("m", &bundle(&r.0, hooks), Stdio::null())
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::Hook(_)), "{e}");
    assert!(!f.sandbox.holds("m"));
    assert!(!f.agent.holds("m"), "the guest forgot it too");
    assert_eq!(f.share.bound(), vec!["p"]);
}

#[tokio::test]
async fn a_failing_bind_is_reported_before_the_agent_is_asked() {
    let r = root("bind-fails");
    let f = fake::sandbox(&r.0, "c1");
    *f.share.fail.lock().unwrap() = Some("/missing".into());
    let e = f
        .sandbox
        .create("c1", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::Share(_)), "{e}");
    assert_eq!(f.agent.count("CreateContainer"), 0);
}

#[tokio::test]
async fn start_runs_and_a_second_start_is_refused() {
    let (_r, f) = running("start").await;
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Running);
    refused(f.sandbox.start("c1").await, "it is running");
    assert_eq!(f.agent.count("StartContainer"), 1);
}

#[tokio::test]
async fn the_init_exit_is_recorded_once_and_reported() {
    let (r, f) = running("exit").await;
    let mut events = f.sandbox.events();
    f.agent.exit("c1", "", 3);
    let exit = exit_of(&f.sandbox, "c1", "").await;
    assert_eq!(exit.status.status, 3);
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Stopped);
    match events.recv().await.unwrap() {
        Event::Exited { cid, exec_id, exit } => {
            assert_eq!(
                (cid.as_str(), exec_id.as_str(), exit.status.status),
                ("c1", "", 3)
            )
        }
        e => panic!("{e:?}"),
    }
    let rec = crate::state::ContainerState::load(&r.0.join("c1"), "c1").unwrap();
    assert_eq!((rec.status, rec.exit_status), (Status::Stopped, Some(3)));
}

#[tokio::test]
async fn kill_signals_a_created_container_and_refuses_a_stopped_one() {
    let (_r, f) = up("kill-created").await;
    f.sandbox
        .kill("c1", "", libc::SIGTERM, false)
        .await
        .unwrap();
    assert_eq!(exit_of(&f.sandbox, "c1", "").await.status.status, 143);
    let e = f
        .sandbox
        .kill("c1", "", libc::SIGTERM, false)
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::Finished { .. }), "{e}");
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws_the_container() {
    let (_r, f) = running("pause").await;
    f.sandbox.pause("c1").await.unwrap();
    assert!(f.agent.is_paused("c1"));
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Paused);
    refused(f.sandbox.pause("c1").await, "paused");
    f.sandbox.resume("c1").await.unwrap();
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Running);
    refused(f.sandbox.resume("c1").await, "running");
    assert_eq!(f.vm.shutdowns(), 0, "pause does not touch the VM");
}

#[tokio::test]
async fn a_signal_to_a_paused_container_waits_for_resume() {
    let (_r, f) = running("kill-paused").await;
    f.sandbox.pause("c1").await.unwrap();
    f.sandbox
        .kill("c1", "", libc::SIGTERM, false)
        .await
        .unwrap();
    assert_eq!(f.sandbox.exited("c1", "").unwrap(), None);
    f.sandbox.resume("c1").await.unwrap();
    assert_eq!(exit_of(&f.sandbox, "c1", "").await.status.status, 143);
}

#[tokio::test]
async fn sigkill_ends_a_paused_container_at_once() {
    let (_r, f) = running("kill9-paused").await;
    f.sandbox.pause("c1").await.unwrap();
    f.sandbox
        .kill("c1", "", libc::SIGKILL, false)
        .await
        .unwrap();
    assert_eq!(exit_of(&f.sandbox, "c1", "").await.status.status, 137);
}

#[tokio::test]
async fn exec_needs_a_running_container() {
    let (_r, f) = up("exec-created").await;
    refused(
        f.sandbox
            .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
            .await,
        "created",
    );
    f.sandbox.start("c1").await.unwrap();
    f.sandbox.pause("c1").await.unwrap();
    refused(
        f.sandbox
            .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
            .await,
        "resume it first",
    );
    f.sandbox.resume("c1").await.unwrap();
    f.agent.exit("c1", "", 0);
    exit_of(&f.sandbox, "c1", "").await;
    refused(
        f.sandbox
            .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
            .await,
        "stopped",
    );
    assert_eq!(f.agent.count("ExecProcess"), 0);
}

#[tokio::test]
async fn an_exec_runs_ends_and_is_deleted_and_its_id_can_be_reused() {
    let (_r, f) = running("exec").await;
    f.sandbox
        .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
        .await
        .unwrap();
    let e = f
        .sandbox
        .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::ExecExists { .. }), "{e}");
    let e = f.sandbox.delete_exec("c1", "e1").await.unwrap_err();
    assert!(matches!(e, SandboxError::ExecRunning { .. }), "{e}");
    f.agent.exit("c1", "e1", 7);
    assert_eq!(exit_of(&f.sandbox, "c1", "e1").await.status.status, 7);
    assert_eq!(
        f.sandbox
            .delete_exec("c1", "e1")
            .await
            .unwrap()
            .status
            .status,
        7
    );
    // The guest still knows "e1": the reuse gets a fresh guest id.
    f.sandbox
        .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
        .await
        .unwrap();
    f.agent.exit("c1", "e1+1", 0);
    assert_eq!(exit_of(&f.sandbox, "c1", "e1").await.status.status, 0);
}

#[tokio::test]
async fn an_exec_the_agent_refuses_is_not_recorded() {
    let (_r, f) = running("exec-fails").await;
    f.agent.fail("ExecProcess", "no such binary");
    assert!(f
        .sandbox
        .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
        .await
        .is_err());
    assert!(matches!(
        f.sandbox.wait("c1", "e1"),
        Err(SandboxError::NoProcess { .. })
    ));
}

#[tokio::test]
async fn delete_of_a_running_container_needs_force() {
    let (r, f) = running("delete-running").await;
    refused(f.sandbox.delete("c1", false).await, "use --force");
    assert!(f.sandbox.holds("c1"));
    let exit = f.sandbox.delete("c1", true).await.unwrap();
    assert_eq!(exit.status.status, 137);
    assert!(f.vm.exited(), "deleting the owner stops the VM");
    assert!(*f.share.torn_down.lock().unwrap());
    assert!(!r.0.join("c1").exists());
}

#[tokio::test]
async fn delete_of_a_created_container_kills_it() {
    let (_r, f) = up("delete-created").await;
    let exit = f.sandbox.delete("c1", false).await.unwrap();
    assert_eq!(exit.status, crate::agent::ExitStatus::KILLED);
    assert!(!f.sandbox.holds("c1"));
}

#[tokio::test]
async fn deleting_a_member_keeps_the_pod() {
    let (r, f) = running("member").await;
    f.sandbox
        .create("m1", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap();
    assert_eq!(f.share.bound(), vec!["c1", "m1"]);
    f.sandbox.delete("m1", true).await.unwrap();
    assert_eq!(f.share.bound(), vec!["c1"]);
    assert!(!f.agent.holds("m1"));
    assert!(!f.vm.exited());
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Running);
}

#[tokio::test]
async fn deleting_the_owner_ends_every_member() {
    let (r, f) = running("owner").await;
    f.sandbox
        .create("m1", &bundle(&r.0, serde_json::json!({})), Stdio::null())
        .await
        .unwrap();
    f.sandbox.start("m1").await.unwrap();
    let mut m1 = f.sandbox.wait("m1", "").unwrap();
    f.sandbox.delete("c1", true).await.unwrap();
    let e = m1.wait_for(Option::is_some).await.unwrap().unwrap();
    assert_eq!(e.status, crate::agent::ExitStatus::KILLED);
    assert!(!f.sandbox.holds("m1"));
    assert!(f.vm.exited());
}

#[tokio::test]
async fn the_vm_dying_ends_every_process_with_255() {
    let (_r, f) = running("vm-dies").await;
    f.sandbox
        .exec("c1", "e1", b"{}".to_vec(), Stdio::null())
        .await
        .unwrap();
    f.vm.die();
    assert_eq!(exit_of(&f.sandbox, "c1", "").await.status.status, 255);
    assert_eq!(exit_of(&f.sandbox, "c1", "e1").await.status.status, 255);
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Stopped);
    let e = f
        .sandbox
        .create(
            "c2",
            &bundle(Path::new("/b"), serde_json::json!({})),
            Stdio::null(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::Gone(_)), "{e}");
}

#[tokio::test]
async fn the_vm_dying_during_a_call_is_named_as_the_cause() {
    let r = root("vm-dies-create");
    let f = fake::sandbox(&r.0, "c1");
    f.agent.hang("CreateContainer");
    let s = f.sandbox.clone();
    let b = bundle(&r.0, serde_json::json!({}));
    let create = tokio::spawn(async move { s.create("c1", &b, Stdio::null()).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    f.vm.die();
    let e = create.await.unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            SandboxError::VmDied {
                when: "while creating the container",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_start_times_out() {
    let (_r, f) = up("start-hangs").await;
    f.agent.hang("StartContainer");
    let e = f.sandbox.start("c1").await.unwrap_err();
    assert!(
        matches!(e, SandboxError::Agent(AgentError::Timeout { .. })),
        "{e}"
    );
    assert_eq!(
        f.sandbox.status("c1").unwrap(),
        Status::Created,
        "still startable"
    );
}

#[tokio::test]
async fn an_agent_error_is_passed_on_and_changes_nothing() {
    let (_r, f) = running("pause-fails").await;
    f.agent
        .fail("PauseContainer", "cgroup.freeze: no such file");
    let e = f.sandbox.pause("c1").await.unwrap_err();
    assert!(e.to_string().contains("cgroup.freeze"), "{e}");
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Running);
}

#[tokio::test]
async fn a_lost_agent_connection_ends_the_processes() {
    let (_r, f) = running("agent-lost").await;
    f.agent.disconnect();
    assert_eq!(
        exit_of(&f.sandbox, "c1", "").await.status,
        crate::agent::ExitStatus::LOST
    );
}

#[tokio::test]
async fn oom_events_for_containers_not_held_are_dropped() {
    let (_r, f) = running("oom").await;
    let mut events = f.sandbox.events();
    f.agent.oom("someone-else");
    f.agent.oom("c1");
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev, Event::Oom { cid: "c1".into() });
    assert!(f.sandbox.oom_killed("c1").unwrap());
}

#[tokio::test]
async fn oom_events_are_rate_limited() {
    let (_r, f) = running("oom-flood").await;
    let mut events = f.sandbox.events();
    for _ in 0..1000 {
        f.agent.oom("c1");
    }
    let mut got = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        got += 1;
    }
    assert!(
        got >= 1 && got <= 2 * OOM_EVENTS_PER_SEC as usize,
        "{got} events passed"
    );
}

#[tokio::test]
async fn an_exit_for_a_container_not_held_changes_nothing() {
    let (_r, f) = running("foreign-exit").await;
    f.sandbox
        .record_exit("nobody", "", crate::agent::ExitStatus::KILLED);
    f.sandbox
        .record_exit("c1", "no-such-exec", crate::agent::ExitStatus::KILLED);
    assert_eq!(f.sandbox.status("c1").unwrap(), Status::Running);
    assert!(!f.sandbox.holds("nobody"));
}

#[tokio::test]
async fn every_verb_on_a_container_not_held_is_not_found() {
    let (_r, f) = running("absent").await;
    let s = &f.sandbox;
    for r in [
        s.start("x").await.map(drop),
        s.kill("x", "", 9, false).await,
        s.pause("x").await,
        s.resume("x").await,
        s.delete("x", true).await.map(drop),
        s.update("x", b"{}".to_vec()).await,
        s.ps("x").await.map(drop),
        s.stats("x").await.map(drop),
    ] {
        assert!(matches!(r, Err(SandboxError::NotFound(_))), "{r:?}");
    }
}

#[tokio::test]
async fn stdin_and_stdout_are_relayed() {
    let r = root("stdio");
    let f = fake::sandbox(&r.0, "c1");
    let (out_r, out_w) = tokio::io::duplex(1024);
    let stdio = Stdio {
        stdin: Some(Box::new(std::io::Cursor::new(b"hello".to_vec()))),
        stdout: Box::new(out_w),
        stderr: Box::new(tokio::io::sink()),
        terminal: false,
    };
    f.sandbox
        .create("c1", &bundle(&r.0, serde_json::json!({})), stdio)
        .await
        .unwrap();
    f.agent.push_stdout("c1", "", b"out!");
    assert!(husk_wait(|| f.agent.stdin_of("c1", "") == (b"hello".to_vec(), true)).await);
    f.sandbox.start("c1").await.unwrap();
    f.agent.exit("c1", "", 0);
    exit_of(&f.sandbox, "c1", "").await;
    f.sandbox.delete("c1", false).await.unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut { out_r }, &mut got)
        .await
        .unwrap();
    assert_eq!(got, b"out!");
}

async fn husk_wait(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn poststop_hooks_run_after_delete_with_the_stopped_state() {
    let r = root("poststop");
    let out = r.0.join("poststop.out");
    let f = fake::sandbox(&r.0, "c1");
    let hooks = serde_json::json!({"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]}]});
    f.sandbox
        .create("c1", &bundle(&r.0, hooks), Stdio::null())
        .await
        .unwrap();
    let rec = f.sandbox.record();
    assert_eq!(rec.poststop.len(), 1, "recorded at create");
    f.sandbox.delete("c1", false).await.unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(state["status"], "stopped");
    assert_eq!(state["id"], "c1");
}

#[tokio::test]
async fn a_second_teardown_waits_for_the_first_and_returns() {
    let (_r, f) = up("teardown-twice").await;
    f.sandbox.teardown(false).await;
    tokio::time::timeout(Duration::from_secs(5), f.sandbox.teardown(false))
        .await
        .expect("a teardown after a finished one returns at once");
    assert!(f.sandbox.is_torn_down());
    assert_eq!(f.vm.shutdowns(), 1);
}

#[tokio::test]
async fn the_owner_gets_the_network_between_create_and_start_and_members_do_not() {
    let r = root("net");
    let net = crate::net::GuestNetwork {
        interfaces: vec![crate::net::GuestInterface {
            boot_mac: "0a:58:0a:58:00:05".into(),
            mac: "0a:58:0a:58:00:05".into(),
            name: "eth0".into(),
            mtu: 1500,
            addresses: vec!["10.88.0.5/16".into()],
        }],
        ..Default::default()
    };
    let dir = SandboxDir::create(&r.0, "c1").unwrap();
    let f = fake::sandbox_with_network(dir, "c1", &r.0, Some(net));
    let b = bundle(&r.0, serde_json::json!({}));
    f.sandbox.create("c1", &b, Stdio::null()).await.unwrap();
    f.sandbox.create("m1", &b, Stdio::null()).await.unwrap();
    f.sandbox.start("c1").await.unwrap();
    let calls: Vec<&str> = f
        .agent
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                *c,
                "CreateContainer" | "ConfigureNetwork" | "StartContainer"
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            "CreateContainer",
            "ConfigureNetwork",
            "CreateContainer",
            "StartContainer"
        ]
    );
}

#[tokio::test]
async fn a_sandbox_without_interfaces_tells_the_guest_nothing() {
    let r = root("nonet");
    let dir = SandboxDir::create(&r.0, "c1").unwrap();
    let f = fake::sandbox_with_network(dir, "c1", &r.0, Some(Default::default()));
    let b = bundle(&r.0, serde_json::json!({}));
    f.sandbox.create("c1", &b, Stdio::null()).await.unwrap();
    assert_eq!(f.agent.count("ConfigureNetwork"), 0);
}
