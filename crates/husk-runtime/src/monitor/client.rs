//! The CLI side of the monitor API: connect to a container's monitor and ask.

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::api::{self, ApiError, Request, Response};
use crate::sandbox_dir::MONITOR_SOCKET;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the monitor of container {id} is not reachable (it may have exited)")]
    Unreachable {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected reply from the monitor: {0:?}")]
    Unexpected(Box<Response>),
}

/// A connection to one container's monitor.
pub struct MonitorClient {
    pub stream: UnixStream,
}

impl MonitorClient {
    /// Connects to the monitor of the container whose state dir is `dir`.
    pub fn connect(dir: &Path, id: &str) -> Result<MonitorClient, ClientError> {
        // Through the directory's descriptor: `<root>/<id>/monitor.sock`
        // may be longer than `sun_path` (Docker's root and ids).
        let stream =
            husk_sys::socket_path::connect_unix(&dir.join(MONITOR_SOCKET)).map_err(|source| {
                ClientError::Unreachable {
                    id: id.to_string(),
                    source,
                }
            })?;
        Ok(MonitorClient { stream })
    }

    /// Sends `req` (with `fds`) and waits for the reply.
    pub fn call(mut self, req: &Request, fds: &[RawFd]) -> Result<Response, ClientError> {
        self.begin(req, fds)
    }

    /// Sends `req` and returns once the first reply is `Ok`; the connection
    /// stays open for more replies (an exec's `Exit`).
    pub fn begin(&mut self, req: &Request, fds: &[RawFd]) -> Result<Response, ClientError> {
        api::send_request(&mut self.stream, req, fds)?;
        match api::recv_response(&mut self.stream)? {
            Response::Error { message } => Err(ClientError::Refused(message)),
            Response::Exit { .. } => Err(ClientError::Unexpected(Box::new(Response::Exit {
                status: 0,
            }))),
            r => Ok(r),
        }
    }

    /// Waits for an exec's `Exit` reply.
    pub fn wait_exit(&mut self) -> Result<i32, ClientError> {
        match api::recv_response(&mut self.stream)? {
            Response::Exit { status } => Ok(status),
            Response::Error { message } => Err(ClientError::Refused(message)),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }
}
