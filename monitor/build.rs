//! Builds the eBPF programs (monitor-ebpf) for bpfel-unknown-none with the pinned nightly.
use anyhow::{Context as _, anyhow};

/// The nightly whose LLVM major matches bpf-linker's (see xtask setup and DESIGN.md).
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-20";

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "monitor-ebpf")
        .ok_or_else(|| anyhow!("monitor-ebpf package not found in the workspace"))?;
    let root = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    let package = aya_build::Package {
        name: pkg.name.as_str(),
        root_dir: root.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building the eBPF programs failed: run `cargo xtask setup` to install the nightly toolchain and bpf-linker")
}
