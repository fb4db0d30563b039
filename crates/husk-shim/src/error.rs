//! The one place where the shim's failures become ttrpc statuses, which
//! containerd turns into its error kinds (`NOT_FOUND` into "not found",
//! `FAILED_PRECONDITION` into "failed precondition", ...).

use containerd_shim::protos::ttrpc::{self, Code};
use husk_runtime::agent::{AgentError, RpcCode};
use husk_runtime::monitor::error_chain;
use husk_runtime::sandbox::SandboxError;

pub type Result<T> = std::result::Result<T, ttrpc::Error>;

pub fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

pub fn not_found(message: impl Into<String>) -> ttrpc::Error {
    status(Code::NOT_FOUND, message)
}

pub fn failed_precondition(message: impl Into<String>) -> ttrpc::Error {
    status(Code::FAILED_PRECONDITION, message)
}

pub fn invalid(message: impl Into<String>) -> ttrpc::Error {
    status(Code::INVALID_ARGUMENT, message)
}

pub fn unimplemented(message: impl Into<String>) -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, message)
}

pub fn internal(e: &dyn std::error::Error) -> ttrpc::Error {
    status(Code::INTERNAL, error_chain(e))
}

/// An agent's status keeps its code (the agent uses the same ones for the
/// same meanings); a lost agent is `UNAVAILABLE`.
pub fn agent(e: &AgentError) -> ttrpc::Error {
    match e {
        AgentError::Rpc { code, .. } => status(
            match code {
                RpcCode::NotFound => Code::NOT_FOUND,
                RpcCode::AlreadyExists => Code::ALREADY_EXISTS,
                RpcCode::InvalidArgument => Code::INVALID_ARGUMENT,
                RpcCode::FailedPrecondition => Code::FAILED_PRECONDITION,
                RpcCode::Other => Code::INTERNAL,
            },
            error_chain(e),
        ),
        AgentError::Unavailable(_) => status(Code::UNAVAILABLE, error_chain(e)),
        AgentError::Timeout { .. } => status(Code::DEADLINE_EXCEEDED, error_chain(e)),
        AgentError::Version { .. } => status(Code::FAILED_PRECONDITION, error_chain(e)),
        AgentError::Unexpected { .. } => status(Code::INTERNAL, error_chain(e)),
    }
}

/// The lifecycle's refusals keep their meaning for containerd: a missing
/// container or process, or one that already exited, is `NOT_FOUND` (what
/// containerd expects from a kill after the exit); a verb the status does
/// not allow is `FAILED_PRECONDITION`; a VM that is gone is `UNAVAILABLE`.
pub fn sandbox(e: &SandboxError) -> ttrpc::Error {
    match e {
        SandboxError::Agent(a) => agent(a),
        SandboxError::NotFound(_)
        | SandboxError::NoProcess { .. }
        | SandboxError::Finished { .. } => status(Code::NOT_FOUND, error_chain(e)),
        SandboxError::Exists(_) | SandboxError::ExecExists { .. } => {
            status(Code::ALREADY_EXISTS, error_chain(e))
        }
        SandboxError::Refused(_) | SandboxError::ExecRunning { .. } => {
            status(Code::FAILED_PRECONDITION, error_chain(e))
        }
        SandboxError::Gone(_) | SandboxError::VmDied { .. } => {
            status(Code::UNAVAILABLE, error_chain(e))
        }
        _ => internal(e),
    }
}
