use husk_runtime::monitor::api::Request;
use husk_runtime::status::Verb;

use crate::cli::GlobalOpts;

pub fn pause(g: &GlobalOpts, id: &str, pause: bool) -> anyhow::Result<u8> {
    let t = super::Target::open(g, id)?;
    if pause {
        t.require(Verb::Pause)?;
        t.ask(&Request::Pause)?;
    } else {
        t.require(Verb::Resume)?;
        t.ask(&Request::Resume)?;
    }
    Ok(0)
}
