//! The two front ends over one model: the same sequence of verbs through
//! the CLI's monitor API and through containerd's task API, each over a
//! sandbox of fakes (no root, no QEMU), must get the same answers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, ResumeRequest,
    StartRequest, StateRequest, WaitRequest,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::ttrpc;
use containerd_shim::{ExitSignal, Task, TtrpcContext};
use husk_runtime::agent::fake::FakeAgent;
use husk_runtime::bundle::Bundle;
use husk_runtime::config::Config;
use husk_runtime::monitor::api::{ExecStdio, Request, Response};
use husk_runtime::monitor::client::{ClientError, MonitorClient};
use husk_runtime::sandbox::{fake, Sandbox, SandboxError, Stdio};
use husk_runtime::sandbox_dir::SandboxDir;

use husk_testutil::TempDir;

use super::{Launch, TaskService};
use crate::events::Events;

/// A temp dir with a bundle (`bundle/`) of a plain spec.
fn root(name: &str) -> TempDir {
    let r = TempDir::new(&format!("fe-{name}"));
    let p = r.path();
    std::fs::create_dir_all(p.join("bundle/rootfs")).unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    });
    std::fs::write(p.join("bundle/config.json"), spec.to_string()).unwrap();
    r
}

/// Boots a sandbox of fakes and keeps its agent for the test to look at.
#[derive(Default)]
struct FakeLaunch {
    agents: Mutex<Vec<Arc<FakeAgent>>>,
}

#[async_trait]
impl Launch for Arc<FakeLaunch> {
    async fn launch(
        &self,
        _cfg: &Config,
        dir: SandboxDir,
        id: &str,
        owner: &Bundle,
        _agent_log: &str,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let f = fake::sandbox_in(dir, id, &owner.dir);
        self.agents.lock().unwrap().push(f.agent.clone());
        Ok(f.sandbox)
    }
}

/// One verb, as both front ends are asked it.
#[derive(Debug, Clone, Copy)]
enum Verb {
    Start,
    Pause,
    Resume,
    Kill(i32),
    Delete,
    Exec(&'static str),
}

/// What a front end answered: done, or refused with this message.
type Answer = Result<(), String>;

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

fn message(e: ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message,
        other => format!("{other:?}"),
    }
}

fn exec_process() -> serde_json::Value {
    serde_json::json!({"args": ["ps"], "cwd": "/", "user": {"uid": 0, "gid": 0}})
}

/// containerd's side: the shim's task service.
struct Shim {
    service: TaskService,
    launch: Arc<FakeLaunch>,
    events: Arc<Mutex<Vec<String>>>,
    bundle: PathBuf,
}

impl Shim {
    fn new(r: &TempDir) -> Shim {
        let launch = Arc::new(FakeLaunch::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let service = TaskService::new(
            Ok(Config::default()),
            r.path().join("shim"),
            false,
            Events::Recorded(events.clone()),
            Arc::new(ExitSignal::default()),
            Box::new(launch.clone()),
        );
        Shim {
            service,
            launch,
            events,
            bundle: r.path().join("bundle"),
        }
    }

    async fn create(&self, cid: &str) -> Answer {
        let req = CreateTaskRequest {
            id: cid.into(),
            bundle: self.bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        self.service
            .create(&ctx(), req)
            .await
            .map(drop)
            .map_err(message)
    }

    async fn ask(&self, cid: &str, verb: Verb) -> Answer {
        let s = &self.service;
        let r = match verb {
            Verb::Start => s
                .start(
                    &ctx(),
                    StartRequest {
                        id: cid.into(),
                        ..Default::default()
                    },
                )
                .await
                .map(drop),
            Verb::Pause => s
                .pause(
                    &ctx(),
                    PauseRequest {
                        id: cid.into(),
                        ..Default::default()
                    },
                )
                .await
                .map(drop),
            Verb::Resume => s
                .resume(
                    &ctx(),
                    ResumeRequest {
                        id: cid.into(),
                        ..Default::default()
                    },
                )
                .await
                .map(drop),
            Verb::Kill(signal) => s
                .kill(
                    &ctx(),
                    KillRequest {
                        id: cid.into(),
                        signal: signal as u32,
                        ..Default::default()
                    },
                )
                .await
                .map(drop),
            Verb::Delete => s
                .delete(
                    &ctx(),
                    DeleteRequest {
                        id: cid.into(),
                        ..Default::default()
                    },
                )
                .await
                .map(drop),
            // containerd's exec is two calls: register, then start.
            Verb::Exec(exec_id) => {
                let spec = Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                    value: exec_process().to_string().into_bytes(),
                    ..Default::default()
                };
                let added = s
                    .exec(
                        &ctx(),
                        ExecProcessRequest {
                            id: cid.into(),
                            exec_id: exec_id.into(),
                            spec: Some(spec).into(),
                            ..Default::default()
                        },
                    )
                    .await;
                match added {
                    Ok(_) => s
                        .start(
                            &ctx(),
                            StartRequest {
                                id: cid.into(),
                                exec_id: exec_id.into(),
                                ..Default::default()
                            },
                        )
                        .await
                        .map(drop),
                    Err(e) => Err(e),
                }
            }
        };
        r.map_err(message)
    }

    async fn status(&self, cid: &str) -> String {
        let st = self
            .service
            .state(
                &ctx(),
                StateRequest {
                    id: cid.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("state");
        format!("{:?}", st.status.enum_value_or_default()).to_lowercase()
    }

    async fn wait(&self, cid: &str) -> u32 {
        let c = ctx();
        let w = self.service.wait(
            &c,
            WaitRequest {
                id: cid.into(),
                ..Default::default()
            },
        );
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("the container ends")
            .expect("wait")
            .exit_status
    }

    fn agent(&self) -> Arc<FakeAgent> {
        self.launch.agents.lock().unwrap()[0].clone()
    }
}

/// The CLI's side: what `husk start`, `husk pause`, ... send to the
/// container's monitor, answered by the monitor's request handlers.
struct Cli {
    sandbox: fake::FakeSandbox,
    socket: PathBuf,
    /// Stands in for the terminal `husk exec` would pass.
    null: std::fs::File,
}

impl Cli {
    async fn new(r: &TempDir, cid: &str) -> Cli {
        let f = fake::sandbox(&r.path().join("cli"), cid);
        let bundle = Bundle::load(&r.path().join("bundle")).expect("bundle");
        f.sandbox
            .create(cid, &bundle, Stdio::null())
            .await
            .expect("the monitor creates its container");
        let socket = r.path().join("monitor.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(husk_runtime::monitor::serve_api(
            listener,
            f.sandbox.clone(),
        ));
        Cli {
            sandbox: f,
            socket,
            null: std::fs::File::open("/dev/null").unwrap(),
        }
    }

    /// What the CLI's verbs get: done, or the monitor's refusal.
    async fn call(&self, req: Request, fds: Vec<i32>) -> Answer {
        let path = self.socket.clone();
        tokio::task::spawn_blocking(move || {
            let stream = std::os::unix::net::UnixStream::connect(path).expect("monitor socket");
            let client = MonitorClient { stream };
            match client.call(&req, &fds) {
                Ok(Response::Done) => Ok(()),
                Err(ClientError::Refused(message)) => Err(message),
                other => panic!("unexpected monitor reply {other:?}"),
            }
        })
        .await
        .unwrap()
    }

    async fn ask(&self, verb: Verb) -> Answer {
        use std::os::fd::AsRawFd;
        let req = match verb {
            Verb::Start => Request::Start,
            Verb::Pause => Request::Pause,
            Verb::Resume => Request::Resume,
            Verb::Kill(signal) => Request::Kill {
                signal,
                all: false,
                exec_id: String::new(),
            },
            Verb::Delete => Request::Delete { force: false },
            Verb::Exec(exec_id) => Request::Exec {
                exec_id: exec_id.into(),
                process: Box::new(serde_json::from_value(exec_process()).unwrap()),
                stdio: ExecStdio::Fds,
            },
        };
        let fd = self.null.as_raw_fd();
        let fds = if matches!(verb, Verb::Exec(_)) {
            vec![fd, fd, fd]
        } else {
            Vec::new()
        };
        self.call(req, fds).await
    }

    fn status(&self, cid: &str) -> String {
        format!("{:?}", self.sandbox.sandbox.status(cid).expect("status")).to_lowercase()
    }
}

/// Pause, kill while paused, delete while running, exec into a stopped
/// container: each step gets the same answer from both front ends, and
/// both leave the container in the same state.
#[tokio::test]
async fn cli_and_shim_answer_the_same_sequence_alike() {
    let r = root("same");
    let shim = Shim::new(&r);
    shim.create("c1").await.expect("shim create");
    let cli = Cli::new(&r, "c1").await;

    let steps: [(Verb, bool); 10] = [
        (Verb::Start, true),
        (Verb::Pause, true),
        (Verb::Exec("e1"), false), // nothing runs in a frozen container
        (Verb::Kill(libc::SIGUSR1), true), // delivered once it thaws
        (Verb::Delete, false),     // paused is not stopped
        (Verb::Resume, true),
        (Verb::Delete, false), // running: only `delete --force` takes it
        (Verb::Kill(libc::SIGKILL), true),
        (Verb::Exec("e2"), false), // stopped: nothing to exec into
        (Verb::Pause, false),
    ];
    for (i, (verb, ok)) in steps.into_iter().enumerate() {
        let from_shim = shim.ask("c1", verb).await;
        let from_cli = cli.ask(verb).await;
        assert_eq!(
            from_shim, from_cli,
            "step {i} ({verb:?}): the shim and the CLI disagree"
        );
        assert_eq!(
            from_shim.is_ok(),
            ok,
            "step {i} ({verb:?}) answered {from_shim:?}"
        );
        if matches!(verb, Verb::Kill(libc::SIGKILL)) {
            assert_eq!(shim.wait("c1").await, 137);
            let mut rx = cli.sandbox.sandbox.wait("c1", "").unwrap();
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some))
                .await
                .expect("the CLI's container ends")
                .unwrap();
        }
        let (s, c) = (shim.status("c1").await, cli.status("c1"));
        assert_eq!(s, c, "step {i} ({verb:?}): the states differ");
    }
    // The signal sent while paused reached both containers, after the thaw.
    assert_eq!(
        shim.agent().signals("c1"),
        cli.sandbox.agent.signals("c1"),
        "both delivered the same signals"
    );
    assert!(shim.agent().signals("c1").contains(&libc::SIGUSR1));

    // A stopped container is deleted alike, and is gone for both.
    assert_eq!(shim.ask("c1", Verb::Delete).await, Ok(()));
    assert_eq!(cli.ask(Verb::Delete).await, Ok(()));
    let topics = shim.events.lock().unwrap().clone();
    let short: Vec<&str> = topics
        .iter()
        .map(|t| t.trim_start_matches("/tasks/"))
        .collect();
    assert_eq!(
        short,
        ["create", "start", "paused", "resumed", "exit", "delete"],
        "containerd hears of each change once, in order"
    );
    assert!(cli.sandbox.vm.shutdowns() >= 1, "the CLI's VM is shut down");
}
