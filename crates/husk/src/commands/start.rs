use husk_runtime::monitor::api::Request;
use husk_runtime::status::Verb;

use crate::cli::GlobalOpts;

pub fn start(g: &GlobalOpts, id: &str) -> anyhow::Result<u8> {
    let t = super::Target::open(g, id)?;
    t.require(Verb::Start)?;
    t.ask(&Request::Start)?;
    Ok(0)
}
