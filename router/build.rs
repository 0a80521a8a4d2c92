//! Builds the eBPF steering program (ebpf/program) for `bpfel-unknown-none` with aya-build, the
//! pinned nightly below and bpf-linker (both installed by scripts/setup); `steering::ebpf`
//! embeds the object from `OUT_DIR`. No compiled object is committed.
//!
//! `AYA_BUILD_SKIP=1` builds the router without the program (an empty object): `steering =
//! "ebpf"` then fails at start-up and the default falls back to "userspace".

use std::path::PathBuf;

/// The toolchain the program is built with; keep in step with `nightly` in scripts/setup.
const TOOLCHAIN: &str = "nightly-2026-05-19";
/// The program crate's package name, also its binary's name in `OUT_DIR`.
const PROGRAM: &str = "branchgate-ebpf";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest_dir.join("..").join("ebpf");
    let program = ebpf.join("program");
    let common = ebpf.join("common");
    // The program's sources and both crates' manifests: a change to any rebuilds the object
    // (aya-build itself names no files to watch).
    for watched in [
        common.clone(),
        program.join("src"),
        program.join("Cargo.toml"),
        program.join("Cargo.lock"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }
    let program_dir = program
        .to_str()
        .ok_or("the path of ebpf/program is not UTF-8")?;
    // aya-build runs `cargo build --package branchgate-ebpf` in the current directory; the
    // program is its own workspace (not a member of the router's), so run it from there.
    std::env::set_current_dir(&program)?;
    // aya-build turns every line the inner cargo prints into a build warning; keep only the
    // errors (progress lines would show on every build of the router).
    std::env::set_var("CARGO_TERM_QUIET", "true");
    // One build of the program for every configuration of the router (build, test, clippy,
    // features each have their own OUT_DIR): aya-build builds under the OUT_DIR it is given, so
    // it is given `<target>/<profile>/ebpf-build`, and the object is copied from there. The
    // inner cargo locks that directory, so concurrent build scripts take turns.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let shared = match out_dir.ancestors().nth(3) {
        // <target>/<profile>/build/branchgate-<hash>/out
        Some(profile_dir) => profile_dir.join("ebpf-build"),
        None => out_dir.clone(),
    };
    std::fs::create_dir_all(&shared)?;
    std::env::set_var("OUT_DIR", &shared);
    let package = aya_build::Package {
        name: PROGRAM,
        root_dir: program_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN)).map_err(|error| {
        format!(
            "building the eBPF program ({PROGRAM}) with {TOOLCHAIN} and bpf-linker failed \
             (run scripts/setup, or set AYA_BUILD_SKIP=1 to build without it): {error:#}"
        )
    })?;
    let built = shared.join(PROGRAM);
    let object = out_dir.join(PROGRAM);
    if built.is_file() && built != object {
        std::fs::copy(&built, &object)?;
    } else if !object.exists() {
        // AYA_BUILD_SKIP: an empty object, which the loader rejects at start-up.
        std::fs::write(&object, [])?;
    }
    Ok(())
}
