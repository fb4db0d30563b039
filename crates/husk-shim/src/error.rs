//! The one place where the shim's failures become ttrpc statuses, which
//! containerd turns into its error kinds (`NOT_FOUND` into "not found",
//! `FAILED_PRECONDITION` into "failed precondition", ...).

use containerd_shim::protos::protobuf::Enum;
use containerd_shim::protos::ttrpc::{self, Code};
use husk_runtime::agent::AgentError;
use husk_runtime::monitor::error_chain;
use husk_runtime::pod::PodError;
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
            Code::from_i32(code.value()).unwrap_or(Code::INTERNAL),
            error_chain(e),
        ),
        AgentError::Unavailable(_) => status(Code::UNAVAILABLE, error_chain(e)),
        AgentError::Timeout { .. } => status(Code::DEADLINE_EXCEEDED, error_chain(e)),
        AgentError::Version { .. } => status(Code::FAILED_PRECONDITION, error_chain(e)),
    }
}

pub fn pod(e: &PodError) -> ttrpc::Error {
    match e {
        PodError::Sandbox(SandboxError::Agent(a)) => agent(a),
        _ => internal(e),
    }
}
