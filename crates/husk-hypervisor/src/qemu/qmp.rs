//! A small QMP client: greeting, capability negotiation, commands, replies.
//!
//! QMP is line-delimited JSON. Asynchronous events (`{"event": ...}`) may
//! arrive between a command and its reply; they are logged and skipped.
//!
//! Every exchange has a deadline ([`QMP_DEADLINE`] unless set): a QEMU that
//! stops answering cannot pin husk. After a timeout the session is closed
//! (a late reply would be taken for the next command's).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection lost")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("unparsable reply {line:?}")]
    Parse {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU did not answer {command} within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("unexpected reply to {command}: {reply}")]
    Unexpected { command: String, reply: String },
}

/// What one line from QEMU is.
#[derive(Debug, PartialEq)]
pub enum QmpMessage {
    Greeting,
    Event(String),
    Return(Value),
    Error { class: String, desc: String },
}

/// The longest line accepted from QEMU: its replies are small, and a
/// compromised QEMU must not grow the host's memory without bound.
pub const MAX_LINE: u64 = 1 << 20;

/// Reads and classifies one line (at most [`MAX_LINE`] bytes).
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<QmpMessage, QmpError> {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let n = reader.take(MAX_LINE).read_until(b'\n', &mut raw).await?;
    if n == 0 {
        return Err(QmpError::Closed);
    }
    if raw.last() != Some(&b'\n') && n as u64 == MAX_LINE {
        return Err(QmpError::Unexpected {
            command: "a reply".into(),
            reply: format!("a line of more than {MAX_LINE} bytes"),
        });
    }
    parse_line(String::from_utf8_lossy(&raw).trim_end())
}

/// Classifies one QMP line.
pub fn parse_line(line: &str) -> Result<QmpMessage, QmpError> {
    let v: Value = serde_json::from_str(line).map_err(|source| QmpError::Parse {
        line: line.to_string(),
        source,
    })?;
    if v.get("QMP").is_some() {
        return Ok(QmpMessage::Greeting);
    }
    if let Some(ev) = v.get("event") {
        return Ok(QmpMessage::Event(ev.as_str().unwrap_or("?").to_string()));
    }
    if let Some(r) = v.get("return") {
        return Ok(QmpMessage::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        return Ok(QmpMessage::Error {
            class: e
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            desc: e
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
        });
    }
    Err(QmpError::Unexpected {
        command: String::new(),
        reply: line.to_string(),
    })
}

/// How long QEMU gets to answer one QMP command (or greet).
pub const QMP_DEADLINE: Duration = Duration::from_secs(5);

/// A negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    deadline: Duration,
    /// A command timed out: the stream is out of step; refuse more.
    broken: bool,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capability negotiation mode.
    /// QEMU creates the socket file a moment before it listens on it, so a
    /// refused connection is retried for up to a second.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Self::connect_with_deadline(path, QMP_DEADLINE).await
    }

    /// [`Self::connect`] with a deadline for the greeting and for every
    /// later command.
    pub async fn connect_with_deadline(path: &Path, deadline: Duration) -> Result<Qmp, QmpError> {
        let mut tries = 0;
        let stream = loop {
            // Through the directory's descriptor: the path may be longer
            // than `sun_path`.
            let connected = match husk_sys::socket_path::SocketPath::new(path) {
                Ok(short) => UnixStream::connect(short.path()).await,
                Err(e) => Err(e),
            };
            match connected {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 500 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            deadline,
            broken: false,
        };
        let greeting = tokio::time::timeout(deadline, qmp.next_message())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "the greeting".into(),
                after: deadline,
            })?;
        match greeting? {
            QmpMessage::Greeting => {}
            other => {
                return Err(QmpError::Unexpected {
                    command: "greeting".into(),
                    reply: format!("{other:?}"),
                })
            }
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The deadline of every later command.
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    async fn next_message(&mut self) -> Result<QmpMessage, QmpError> {
        read_message(&mut self.reader).await
    }

    /// Runs one command and returns its `return` value, failing with
    /// [`QmpError::Timeout`] when QEMU does not answer within the deadline.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        if self.broken {
            return Err(QmpError::Closed);
        }
        let deadline = self.deadline;
        match tokio::time::timeout(deadline, self.exchange(command, args)).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: deadline,
                })
            }
        }
    }

    async fn exchange(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            match self.next_message().await? {
                QmpMessage::Return(v) => return Ok(v),
                QmpMessage::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                QmpMessage::Event(ev) => tracing::debug!(event = %ev, "qmp event"),
                QmpMessage::Greeting => {
                    return Err(QmpError::Unexpected {
                        command: command.to_string(),
                        reply: "a second greeting".into(),
                    })
                }
            }
        }
    }

    /// The VM's run state (`running`, `paused`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Unexpected {
                command: "query-status".into(),
                reply: v.to_string(),
            })
    }

    /// Hands QEMU the descriptor `fd` under `name` (`getfd`, with the
    /// descriptor riding along as `SCM_RIGHTS`), for commands that take
    /// `fd:<name>`.
    pub async fn pass_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        if self.broken {
            return Err(QmpError::Closed);
        }
        let mut line = json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string();
        line.push('\n');
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[std::io::IoSlice::new(line.as_bytes())],
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == line.len() => break,
                // The descriptor went with the first part; a short send of
                // a line this small does not happen on a unix socket.
                Ok(n) => {
                    return Err(QmpError::Io(std::io::Error::other(format!(
                        "getfd: sent {n} of {} bytes",
                        line.len()
                    ))))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let deadline = self.deadline;
        let reply = async {
            loop {
                match self.next_message().await? {
                    QmpMessage::Return(_) => return Ok(()),
                    QmpMessage::Error { class, desc } => {
                        return Err(QmpError::Command {
                            command: "getfd".into(),
                            class,
                            desc,
                        })
                    }
                    QmpMessage::Event(ev) => tracing::debug!(event = %ev, "qmp event"),
                    QmpMessage::Greeting => {
                        return Err(QmpError::Unexpected {
                            command: "getfd".into(),
                            reply: "a second greeting".into(),
                        })
                    }
                }
            }
        };
        match tokio::time::timeout(deadline, reply).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(QmpError::Timeout {
                    command: "getfd".into(),
                    after: deadline,
                })
            }
        }
    }

    /// Turns on the migration capability `x-ignore-shared` (RAM in a shared
    /// file is not copied into the stream: it is the template's memory file).
    pub async fn ignore_shared_memory(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })),
        )
        .await
        .map(|_| ())
    }

    /// The status of the last migration (`active`, `completed`, `failed`, ...)
    /// and its error, if QEMU gave one.
    pub async fn migration_status(&mut self) -> Result<(String, Option<String>), QmpError> {
        let v = self.execute("query-migrate", None).await?;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        let error = v
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((status, error))
    }

    /// Asks QEMU to exit. QEMU may close the connection before replying.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_lines() {
        assert_eq!(
            parse_line(r#"{"QMP": {"version": {}, "capabilities": []}}"#).unwrap(),
            QmpMessage::Greeting
        );
        assert_eq!(
            parse_line(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
                .unwrap(),
            QmpMessage::Event("STOP".into())
        );
        assert_eq!(
            parse_line(r#"{"return": {"status": "running", "running": true}}"#).unwrap(),
            QmpMessage::Return(json!({"status": "running", "running": true}))
        );
        assert_eq!(
            parse_line(r#"{"error": {"class": "GenericError", "desc": "nope"}}"#).unwrap(),
            QmpMessage::Error {
                class: "GenericError".into(),
                desc: "nope".into()
            }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_line("not json"),
            Err(QmpError::Parse { .. })
        ));
        assert!(matches!(
            parse_line(r#"{"what": 1}"#),
            Err(QmpError::Unexpected { .. })
        ));
    }

    /// A peer that greets and accepts capabilities, then never answers.
    async fn silent_peer(
        tag: &str,
        greet: bool,
    ) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("husk-qmp-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            if greet {
                w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                    .await
                    .unwrap();
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
            }
            // Read and never answer.
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {}
        });
        (dir, peer)
    }

    #[tokio::test]
    async fn a_command_qemu_never_answers_times_out_within_the_deadline() {
        let (dir, peer) = silent_peer("mute", true).await;
        let deadline = Duration::from_millis(300);
        let mut q = Qmp::connect_with_deadline(&dir.join("qmp.sock"), deadline)
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        let e = q.status().await.unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("query-status"), "{e}");
        assert!(took >= deadline && took < deadline * 3, "{took:?}");
        // The session is out of step now: refused at once.
        assert!(matches!(
            q.execute("cont", None).await,
            Err(QmpError::Closed)
        ));
        drop(q);
        peer.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_never_greets_times_out() {
        let (dir, peer) = silent_peer("nogreet", false).await;
        let t0 = std::time::Instant::now();
        let e = Qmp::connect_with_deadline(&dir.join("qmp.sock"), Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        peer.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn talks_to_a_scripted_peer() {
        let dir = std::env::temp_dir().join(format!("husk-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("query-status"));
            w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"paused\", \"running\": false}}\n")
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("\"stop\""));
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"busy\"}}\n")
                .await
                .unwrap();
        });
        let mut q = Qmp::connect(&sock).await.unwrap();
        assert_eq!(q.status().await.unwrap(), "paused");
        let err = q.execute("stop", None).await.unwrap_err();
        assert_eq!(err.to_string(), "stop failed: GenericError: busy");
        peer.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A compromised QEMU is the guest's: whatever it writes, the reader
    /// returns a message or an error, never panics, never holds more than
    /// a line's limit.
    mod hostile {
        use super::*;
        use proptest::prelude::*;

        fn valid() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(r#"{"QMP": {"version": {}, "capabilities": []}}"#.to_string()),
                Just(r#"{"return": {"status": "running", "running": true}}"#.to_string()),
                Just(r#"{"error": {"class": "GenericError", "desc": "no"}}"#.to_string()),
                Just(r#"{"event": "SHUTDOWN", "data": {"guest": true}}"#.to_string()),
            ]
        }

        fn line() -> impl Strategy<Value = Vec<u8>> {
            let mutated = (
                valid(),
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            )
                .prop_map(|(v, flips)| {
                    let mut b = v.into_bytes();
                    for (at, x) in flips {
                        let i = at.index(b.len());
                        b[i] = x;
                    }
                    b
                });
            prop_oneof![
                valid().prop_map(String::into_bytes),
                mutated,
                prop::collection::vec(any::<u8>(), 0..256),
                ".{0,64}".prop_map(|s| format!("{{\"return\": {s}}}").into_bytes()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_line_is_a_message_or_an_error(bytes in line()) {
                let text = String::from_utf8_lossy(&bytes).to_string();
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let mut input = bytes.clone();
                input.push(b'\n');
                let got = rt.block_on(read_message(&mut &input[..]));
                // Only JSON is ever taken for a message.
                if got.is_ok() {
                    let json = serde_json::from_str::<Value>(text.trim_end());
                    prop_assert!(json.is_ok(), "accepted {text:?}");
                }
            }
        }

        #[tokio::test]
        async fn an_endless_line_is_refused_at_the_limit() {
            let long = vec![b'x'; (MAX_LINE as usize) * 2];
            let e = read_message(&mut &long[..]).await.unwrap_err();
            assert!(e.to_string().contains("more than"), "{e}");
        }
    }
}
