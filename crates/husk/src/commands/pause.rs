use husk_runtime::monitor::api::Request;
use husk_runtime::state::Status;

use crate::cli::GlobalOpts;

pub fn pause(g: &GlobalOpts, id: &str, pause: bool) -> anyhow::Result<u8> {
    let t = super::Target::open(g, id)?;
    if pause {
        t.require(&[Status::Running], "pause")?;
        t.ask(&Request::Pause)?;
    } else {
        t.require(&[Status::Paused], "resume")?;
        t.ask(&Request::Resume)?;
    }
    Ok(0)
}
