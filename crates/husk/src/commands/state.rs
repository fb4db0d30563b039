use crate::cli::GlobalOpts;

pub fn state(g: &GlobalOpts, id: &str) -> anyhow::Result<u8> {
    let t = super::Target::open(g, id)?;
    outln!("{}", serde_json::to_string_pretty(&t.state.oci_state())?);
    Ok(0)
}
