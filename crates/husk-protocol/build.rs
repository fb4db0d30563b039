//! Compiles `proto/agent.proto` into ttrpc bindings in `OUT_DIR` (never into `src/`).
//!
//! The generated files carry inner attributes (`#![allow(..)]`), which `include!`
//! cannot take; they are stripped here and the allows live on the modules in
//! `lib.rs` instead.
use std::fs;
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("failed to generate the agent protocol bindings");
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = format!("{out}/{name}");
        let text = fs::read_to_string(&path).expect("generated file is readable");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#!["))
            .filter(|l| !l.trim_start().starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).expect("generated file is writable");
    }
}
