//! The monitor's API: what the CLI verbs ask the sandbox monitor over its
//! unix socket (`<root>/<id>/monitor.sock`), and how it is framed.
//!
//! One request per connection. A frame is a 4-byte big-endian length and a
//! JSON body. File descriptors (an exec's stdio) ride as `SCM_RIGHTS` on the
//! request's length bytes. A reply is one frame; `Exec` gets two: `Ok` once
//! the process runs, then `Exit` when it ends.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use oci_spec::runtime::{LinuxResources, Process};
use serde::{Deserialize, Serialize};

use crate::agent::{ProcessInfo, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest frame accepted (a process JSON is a few KiB).
pub const MAX_FRAME: u32 = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Release the container's init.
    Start,
    /// Signal the init (`exec_id` empty) or an exec'd process; `all`
    /// signals every process of the container.
    Kill {
        signal: i32,
        all: bool,
        exec_id: String,
    },
    /// Run `process` (an OCI process) in the container.
    Exec {
        exec_id: String,
        process: Box<Process>,
        stdio: ExecStdio,
    },
    /// Set the terminal size of the init (`exec_id` empty) or an exec.
    Resize {
        exec_id: String,
        rows: u16,
        cols: u16,
    },
    /// The container's processes.
    Ps,
    /// cgroup statistics.
    Stats,
    /// New resource limits (OCI `linux.resources`).
    Update {
        resources: Box<LinuxResources>,
    },
    Pause,
    Resume,
    /// Stop the container (SIGKILL) if it runs, tear the sandbox down, reply,
    /// and exit. Without `force`, refused while the container runs.
    Delete {
        force: bool,
    },
}

/// Where an exec's stdio goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStdio {
    /// Three descriptors (stdin, stdout, stderr) ride with the request.
    Fds,
    /// A pty whose master is sent to this console socket (runc's protocol).
    ConsoleSocket(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The request was carried out; nothing to report.
    Done,
    /// `Ps`: the container's processes (guest pids).
    Processes {
        processes: Vec<ProcessInfo>,
    },
    /// `Stats`: the container's cgroup statistics.
    Stats {
        stats: Stats,
    },
    Error {
        message: String,
    },
    /// An exec'd process ended with this status (code, or 128 + signal).
    Exit {
        status: i32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("monitor connection")]
    Io(#[from] std::io::Error),
    #[error("monitor connection")]
    Sys(#[from] nix::Error),
    #[error("malformed monitor message")]
    Json(#[from] serde_json::Error),
    #[error("monitor message of {0} bytes is too large")]
    TooLarge(u32),
    #[error("the monitor closed the connection")]
    Closed,
}

fn check_len(len: u32) -> Result<usize, ApiError> {
    if len > MAX_FRAME {
        return Err(ApiError::TooLarge(len));
    }
    Ok(len as usize)
}

// ---- client side (blocking; the CLI is a short-lived synchronous program)

/// Sends `req` with `fds` attached.
pub fn send_request(
    stream: &mut StdUnixStream,
    req: &Request,
    fds: &[RawFd],
) -> Result<(), ApiError> {
    let body = serde_json::to_vec(req)?;
    let len = (body.len() as u32).to_be_bytes();
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let mut sent = 0;
    while sent < len.len() {
        let n = sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&len[sent..])],
            if sent == 0 { &cmsgs } else { &[] },
            MsgFlags::empty(),
            None,
        )?;
        sent += n;
    }
    stream.write_all(&body)?;
    Ok(())
}

/// Reads one response.
pub fn recv_response(stream: &mut StdUnixStream) -> Result<Response, ApiError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ApiError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; check_len(u32::from_be_bytes(len))?];
    stream.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

// ---- server side (async)

/// Reads one request and the descriptors that came with it.
pub async fn read_request(stream: &mut UnixStream) -> Result<(Request, Vec<OwnedFd>), ApiError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    let mut fds = Vec::new();
    while got == 0 {
        stream.readable().await?;
        let r = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [IoSliceMut::new(&mut len)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut raw = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(list) = c {
                    raw.extend(list);
                }
            }
            Ok((msg.bytes, raw))
        });
        match r {
            Ok((0, _)) => return Err(ApiError::Closed),
            Ok((n, raw)) => {
                got = n;
                // SAFETY: SCM_RIGHTS just installed these descriptors in this
                // process; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    stream.read_exact(&mut len[got..]).await?;
    let mut body = vec![0u8; check_len(u32::from_be_bytes(len))?];
    stream.read_exact(&mut body).await?;
    Ok((serde_json::from_slice(&body)?, fds))
}

/// Writes one response.
pub async fn write_response(stream: &mut UnixStream, resp: &Response) -> Result<(), ApiError> {
    let body = serde_json::to_vec(resp)?;
    stream.write_all(&(body.len() as u32).to_be_bytes()).await?;
    stream.write_all(&body).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_json() {
        let r = Request::Kill {
            signal: 15,
            all: true,
            exec_id: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"kill","signal":15,"all":true,"exec_id":""}"#
        );
        let e = Request::Exec {
            exec_id: "e1".into(),
            process: Box::new(
                serde_json::from_value(
                    serde_json::json!({"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
                )
                .unwrap(),
            ),
            stdio: ExecStdio::ConsoleSocket("/tmp/c.sock".into()),
        };
        let back: Request = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[tokio::test]
    async fn frames_and_descriptors_cross_the_socket() {
        let (a, b) = StdUnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut server = UnixStream::from_std(b).unwrap();
        let mut client = a;
        let (r, w) = nix::unistd::pipe().unwrap();
        let req = Request::Resize {
            exec_id: "x".into(),
            rows: 24,
            cols: 80,
        };
        let c = std::thread::spawn(move || {
            send_request(&mut client, &req, &[w.as_raw_fd()]).unwrap();
            drop(w);
            let resp = recv_response(&mut client).unwrap();
            assert_eq!(resp, Response::Exit { status: 3 });
        });
        let (got, fds) = read_request(&mut server).await.unwrap();
        assert_eq!(
            got,
            Request::Resize {
                exec_id: "x".into(),
                rows: 24,
                cols: 80
            }
        );
        assert_eq!(fds.len(), 1);
        // The received descriptor is the pipe's write end.
        let mut f = std::fs::File::from(fds.into_iter().next().unwrap());
        f.write_all(b"hi").unwrap();
        drop(f);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "hi");
        write_response(&mut server, &Response::Exit { status: 3 })
            .await
            .unwrap();
        c.join().unwrap();
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, b) = StdUnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut server = UnixStream::from_std(b).unwrap();
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).unwrap();
        assert!(matches!(
            read_request(&mut server).await,
            Err(ApiError::TooLarge(_))
        ));
    }

    /// Whatever a local client sends — valid requests cut or with bytes
    /// flipped, random bytes, lying lengths — the monitor's reader returns
    /// a request or an error, and never panics or waits past the end.
    mod hostile {
        use super::*;
        use proptest::prelude::*;

        fn valid() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                Just(Request::Start),
                Just(Request::Ps),
                Just(Request::Pause),
                (any::<i32>(), any::<bool>(), ".{0,16}").prop_map(|(signal, all, exec_id)| {
                    Request::Kill {
                        signal,
                        all,
                        exec_id,
                    }
                }),
                (".{0,16}", any::<u16>(), any::<u16>()).prop_map(|(exec_id, rows, cols)| {
                    Request::Resize {
                        exec_id,
                        rows,
                        cols,
                    }
                }),
                any::<bool>().prop_map(|force| Request::Delete { force }),
                ".{0,64}".prop_map(|p| Request::Exec {
                    exec_id: "e1".into(),
                    process: Box::new(
                        serde_json::from_value(serde_json::json!({"args": [p], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
                            .unwrap()
                    ),
                    stdio: ExecStdio::ConsoleSocket(PathBuf::from("/tmp/c.sock")),
                }),
            ]
            .prop_map(|r| serde_json::to_vec(&r).unwrap())
        }

        /// A body and the length the client claims for it.
        fn framed() -> impl Strategy<Value = (u32, Vec<u8>)> {
            let mutated = (
                valid(),
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            )
                .prop_map(|(mut body, flips)| {
                    for (at, b) in flips {
                        if !body.is_empty() {
                            let i = at.index(body.len());
                            body[i] = b;
                        }
                    }
                    body
                });
            let body = prop_oneof![valid(), mutated, prop::collection::vec(any::<u8>(), 0..512),];
            (
                body,
                prop_oneof![
                    Just(None),
                    Just(Some(MAX_FRAME + 1)),
                    any::<u32>().prop_map(|n| Some(n % 1024))
                ],
            )
                .prop_map(|(body, claimed)| (claimed.unwrap_or(body.len() as u32), body))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn the_reader_takes_any_bytes((claimed, body) in framed()) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let got = rt.block_on(async {
                    let (mut server, mut client) = UnixStream::pair().unwrap();
                    client.write_all(&claimed.to_be_bytes()).await.unwrap();
                    // The reader may give up early (a length over the limit).
                    let _ = client.write_all(&body).await;
                    drop(client);
                    tokio::time::timeout(std::time::Duration::from_secs(5), read_request(&mut server)).await
                });
                let got = got.expect("the reader returns once the client is gone");
                if claimed > MAX_FRAME {
                    prop_assert!(matches!(got, Err(ApiError::TooLarge(_))));
                }
                if let Ok((req, _)) = got {
                    // What it accepted is a request it could have been sent.
                    let again = serde_json::to_vec(&req).unwrap();
                    prop_assert_eq!(serde_json::from_slice::<Request>(&again).unwrap(), req);
                }
            }
        }
    }
}
