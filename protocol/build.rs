//! Generates the Rust code of `protos/*.proto` (messages and ttrpc stubs) into `OUT_DIR` with
//! the pure-Rust parser of `ttrpc-codegen`: no `protoc` binary needed.

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: [&str; 2] = ["protos/agent.proto", "protos/vmm.proto"];

/// The generated files, each a module of `nutshell_protocol::generated`.
const MODULES: [&str; 4] = ["agent", "agent_ttrpc", "vmm", "vmm_ttrpc"];

fn main() -> std::io::Result<()> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let out_dir = std::path::PathBuf::from(
        std::env::var_os("OUT_DIR").ok_or_else(|| std::io::Error::other("OUT_DIR is not set"))?,
    );
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            gen_mod: false,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // The generated files start with inner attributes, which `include!` rejects; declare them as
    // modules with a literal `#[path]` instead (the path attribute takes no macros).
    let mut modules = String::new();
    for m in MODULES {
        let path = out_dir.join(format!("{m}.rs"));
        modules.push_str(&format!(
            "#[path = {:?}]\npub mod {m};\n",
            path.to_string_lossy()
        ));
    }
    std::fs::write(out_dir.join("generated.rs"), modules)
}
