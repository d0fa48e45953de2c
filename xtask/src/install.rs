//! `cargo xtask install` and `cargo xtask package`: the binary, the systemd unit, the example
//! configuration, the journald catalog, completions and the man page, laid out under a root.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Lays out every installed file under `root` ("/" to install).
pub fn stage(workspace: &Path, bin: &Path, root: &Path) -> Result<()> {
    let put = |rel: &str, data: &[u8], mode: u32| -> Result<()> {
        let dst = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().context("parent")?)?;
        std::fs::write(&dst, data).with_context(|| format!("writing {}", dst.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        println!("  {}", dst.display());
        Ok(())
    };
    let pk = workspace.join("packaging");
    put("/usr/bin/holdfast", &std::fs::read(bin)?, 0o755)?;
    put(
        "/lib/systemd/system/holdfast.service",
        &std::fs::read(pk.join("holdfast.service"))?,
        0o644,
    )?;
    put(
        "/usr/lib/systemd/catalog/holdfast.catalog",
        &std::fs::read(pk.join("holdfast.catalog"))?,
        0o644,
    )?;
    let example = std::fs::read(pk.join("holdfast.toml.example"))?;
    put("/usr/share/doc/holdfast/holdfast.toml.example", &example, 0o644)?;
    let cfg = root.join("etc/holdfast/holdfast.toml");
    if !cfg.exists() {
        put("/etc/holdfast/holdfast.toml", &example, 0o644)?;
    }
    let generate = |args: &[&str]| -> Result<Vec<u8>> {
        let o = Command::new(bin).args(args).output()?;
        if !o.status.success() {
            bail!("holdfast {args:?} failed");
        }
        Ok(o.stdout)
    };
    put("/usr/share/man/man1/holdfast.1", &generate(&["man"])?, 0o644)?;
    put(
        "/usr/share/bash-completion/completions/holdfast",
        &generate(&["completions", "bash"])?,
        0o644,
    )?;
    put(
        "/usr/share/zsh/vendor-completions/_holdfast",
        &generate(&["completions", "zsh"])?,
        0o644,
    )?;
    put(
        "/usr/share/fish/vendor_completions.d/holdfast.fish",
        &generate(&["completions", "fish"])?,
        0o644,
    )?;
    Ok(())
}

/// After files are in place on this host: the group, systemd and the catalog.
pub fn activate() {
    let quiet = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !quiet(Command::new("getent").args(["group", "holdfast"])) {
        println!("  creating group holdfast (members may query the agent)");
        quiet(Command::new("groupadd").args(["--system", "holdfast"]));
    }
    if Path::new("/run/systemd/system").exists() {
        quiet(Command::new("systemctl").arg("daemon-reload"));
        println!("  systemd reloaded: `systemctl enable --now holdfast` starts the agent");
    } else {
        println!(
            "  systemd is not running here: start the agent with `holdfast agent --config /etc/holdfast/holdfast.toml`"
        );
    }
    if Path::new("/run/systemd/journal/socket").exists() {
        quiet(Command::new("journalctl").arg("--update-catalog"));
    }
}

/// Builds a .deb with dpkg-deb.
pub fn package(workspace: &Path, bin: &Path, version: &str) -> Result<std::path::PathBuf> {
    let name = format!("holdfast_{version}_amd64");
    let dir = workspace.join("target/deb").join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    stage(workspace, bin, &dir)?;
    let debian = dir.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: holdfast\nVersion: {version}\nArchitecture: amd64\nMaintainer: holdfast maintainers <holdfast@example.invalid>\n\
             Section: net\nPriority: optional\nDescription: keeps long-lived TCP sessions and their processes healthy\n \
             holdfast forecasts NAT / load-balancer idle eviction per flow and keeps sessions alive with\n \
             per-socket keepalive, finds half-open and leaked sessions and zombie children, and repairs them.\n"
        ),
    )?;
    std::fs::write(debian.join("conffiles"), "/etc/holdfast/holdfast.toml\n")?;
    let postinst = "#!/bin/sh\nset -e\ngetent group holdfast >/dev/null || groupadd --system holdfast\n\
                    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n\
                    if [ -S /run/systemd/journal/socket ]; then journalctl --update-catalog || true; fi\n";
    std::fs::write(debian.join("postinst"), postinst)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(debian.join("postinst"), std::fs::Permissions::from_mode(0o755))?;
    let deb = workspace.join("target/deb").join(format!("{name}.deb"));
    let st = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&dir)
        .arg(&deb)
        .status()?;
    if !st.success() {
        bail!("dpkg-deb failed");
    }
    Ok(deb)
}
