use husk_runtime::monitor::api::Request;
use husk_runtime::status::Verb;

use crate::cli::{GlobalOpts, KillArgs};

pub fn kill(g: &GlobalOpts, a: KillArgs) -> anyhow::Result<u8> {
    let signal = super::parse_signal(&a.signal)?;
    let t = super::Target::open(g, &a.id)?;
    t.require(Verb::Kill)?;
    t.ask(&Request::Kill {
        signal,
        all: a.all,
        exec_id: String::new(),
    })?;
    Ok(0)
}
