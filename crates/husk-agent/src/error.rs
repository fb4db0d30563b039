//! The one place where the agent's errors become ttrpc status codes.

use ttrpc::Code;

use crate::cgroup::CgroupError;
use crate::container::spec::SpecError;
use crate::container::storage::StorageError;
use crate::container::ContainerError;
use crate::process::{SignalError, StdinError};

/// Any failure of an RPC.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A container operation failed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// ConfigureNetwork failed.
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
    /// RenewIdentity failed.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Host and agent disagree on the API major version.
    #[error("the host speaks agent API version {host} but this agent speaks version {agent}; use a guest image built from the same husk release as the host")]
    VersionMismatch {
        /// The host's version.
        host: u32,
        /// Ours.
        agent: u32,
    },
}

/// The ttrpc code of an error.
pub fn code(error: &AgentError) -> Code {
    use ContainerError as C;
    match error {
        AgentError::VersionMismatch { .. } => Code::FAILED_PRECONDITION,
        AgentError::Identity(crate::identity::IdentityError::Invalid(_)) => Code::INVALID_ARGUMENT,
        AgentError::Identity(_) => Code::INTERNAL,
        AgentError::Network(e) => match e {
            crate::net::NetError::Invalid(_) => Code::INVALID_ARGUMENT,
            crate::net::NetError::NoNic { .. } => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        },
        AgentError::Container(error) => match error {
            C::NotFound(_) | C::NoSuchProcess { .. } | C::Exited { .. } => Code::NOT_FOUND,
            C::AlreadyExists(_) | C::ExecExists { .. } => Code::ALREADY_EXISTS,
            C::InvalidId(_)
            | C::Spec(_)
            | C::RootfsMissing(_)
            | C::BadSignal(_)
            | C::EmptyExecId(_)
            | C::ResourcesJson(_) => Code::INVALID_ARGUMENT,
            C::ExecFailed { invalid_spec, .. } => {
                if *invalid_spec {
                    Code::INVALID_ARGUMENT
                } else {
                    Code::INTERNAL
                }
            }
            C::NotRunning { .. }
            | C::ExecStarting { .. }
            | C::NoTerminal { .. }
            | C::JoinTarget { .. }
            | C::NoCgroup(_) => Code::FAILED_PRECONDITION,
            C::Cgroup { source, .. } => match source {
                CgroupError::Resources(_)
                | CgroupError::DeviceRules(_)
                | CgroupError::Refused { .. } => Code::INVALID_ARGUMENT,
                CgroupError::MissingController { .. } => Code::FAILED_PRECONDITION,
                CgroupError::Root { .. } | CgroupError::Io { .. } => Code::INTERNAL,
            },
            C::Storage(StorageError::UnknownDriver { .. } | StorageError::Malformed { .. }) => {
                Code::INVALID_ARGUMENT
            }
            C::Storage(StorageError::Mount { .. }) => Code::INTERNAL,
            C::Init { invalid_spec, .. } => {
                if *invalid_spec {
                    Code::INVALID_ARGUMENT
                } else {
                    Code::INTERNAL
                }
            }
            C::Creating(_) | C::AlreadyStarted(_) => Code::FAILED_PRECONDITION,
            C::Stdin {
                source: StdinError::Closed | StdinError::Gone,
                ..
            } => Code::FAILED_PRECONDITION,
            C::Signal {
                source: SignalError::Exited,
                ..
            } => Code::NOT_FOUND,
            C::InitDied { .. } | C::Io { .. } | C::Signal { .. } | C::Stdin { .. } => {
                Code::INTERNAL
            }
        },
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(error: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code(&error), error.to_string()))
    }
}

impl From<SpecError> for AgentError {
    fn from(error: SpecError) -> Self {
        AgentError::Container(error.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let cases: Vec<(AgentError, Code)> = vec![
            (ContainerError::NotFound("c".into()).into(), Code::NOT_FOUND),
            (
                ContainerError::AlreadyExists("c".into()).into(),
                Code::ALREADY_EXISTS,
            ),
            (
                crate::container::spec::parse(b"{").unwrap_err().into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ContainerError::AlreadyStarted("c".into()).into(),
                Code::FAILED_PRECONDITION,
            ),
            (
                ContainerError::Init {
                    id: "c".into(),
                    message: "exec".into(),
                    invalid_spec: true,
                }
                .into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                AgentError::VersionMismatch { host: 2, agent: 1 },
                Code::FAILED_PRECONDITION,
            ),
            (
                ContainerError::ExecExists {
                    id: "c".into(),
                    exec_id: "e".into(),
                }
                .into(),
                Code::ALREADY_EXISTS,
            ),
            (
                ContainerError::NotRunning {
                    id: "c".into(),
                    status: crate::process::ExitStatus::exited(0),
                }
                .into(),
                Code::FAILED_PRECONDITION,
            ),
            (
                ContainerError::ExecFailed {
                    id: "c".into(),
                    exec_id: "e".into(),
                    message: "exec \"x\": no such file".into(),
                    invalid_spec: true,
                }
                .into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ContainerError::NoTerminal {
                    id: "c".into(),
                    exec_id: "".into(),
                }
                .into(),
                Code::FAILED_PRECONDITION,
            ),
        ];
        for (error, expected) in cases {
            let message = error.to_string();
            assert_eq!(code(&error), expected, "{message}");
            match ttrpc::Error::from(error) {
                ttrpc::Error::RpcStatus(status) => {
                    assert_eq!(status.code(), expected);
                    assert_eq!(status.message(), message);
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }
}
