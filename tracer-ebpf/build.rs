use which::which;

/// Building this crate needs the `bpf-linker` binary, which cargo cannot express as a dependency.
/// Rebuild when the linker changes (`cargo xtask setup` installs it). Also declares the
/// `bpf_target_arch` cfg (`src/arch.rs`), which aya-build sets from the daemon's target.
fn main() -> anyhow::Result<()> {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
    aya_build::emit_bpf_target_arch_cfg()
}
