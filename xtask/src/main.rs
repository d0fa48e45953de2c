//! `cargo xtask`: setup (toolchains, LLVM, bpf-linker), build, run, test.
//!
//! Every command runs `setup` first. Setup checks each piece and installs only what is missing,
//! so a second run changes nothing and takes a couple of seconds.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};

mod bench;
mod install;

/// Userspace toolchain (aya 0.16 needs rustc >= 1.98).
const STABLE: &str = "1.99.1";
/// eBPF toolchain: its LLVM major (22) must equal bpf-linker's.
const NIGHTLY: &str = "nightly-2026-06-20";
const LLVM_MAJOR: u32 = 22;
const BPF_LINKER: &str = "0.13";
/// Debian packages: LLVM for bpf-linker, and the network tools the scenario tests drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "nftables",
    "conntrack",
    "bpftool",
    "procps",
    // setpriv and nsenter: scenario agents run with the unit's capabilities, in namespaces.
    "util-linux",
    // A real bus for the restart remedy's D-Bus path (a stand-in plays systemd on it).
    "dbus-daemon",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("spawning {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"))
        .join("bin")
}

struct Step {
    name: String,
    /// None: present. Some(commands): what installs it.
    missing: Option<Vec<Vec<String>>>,
}

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn check_steps() -> Vec<Step> {
    let mut steps = Vec::new();
    let missing_pkgs: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    steps.push(Step {
        name: format!("Debian packages ({})", APT_PACKAGES.join(" ")),
        missing: (!missing_pkgs.is_empty()).then(|| {
            let mut install = sv(&["apt-get", "install", "-y", "--no-install-recommends"]);
            install.extend(missing_pkgs.iter().map(|s| s.to_string()));
            vec![sv(&["apt-get", "update"]), install]
        }),
    });
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    let has = |t: &str| toolchains.lines().any(|l| l.starts_with(t));
    let stable_ok = has(STABLE)
        && output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", STABLE]))
            .is_some_and(|c| c.contains("rustfmt") && c.contains("clippy"));
    steps.push(Step {
        name: format!("Rust {STABLE} (userspace, with rustfmt and clippy)"),
        missing: (!stable_ok).then(|| {
            vec![sv(&[
                "rustup",
                "toolchain",
                "install",
                STABLE,
                "--profile",
                "minimal",
                "--component",
                "rustfmt",
                "--component",
                "clippy",
            ])]
        }),
    });
    let nightly_ok = has(NIGHTLY)
        && output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
            .is_some_and(|c| c.contains("rust-src"));
    steps.push(Step {
        name: format!("Rust {NIGHTLY} with rust-src (eBPF programs)"),
        missing: (!nightly_ok).then(|| {
            vec![sv(&[
                "rustup",
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ])]
        }),
    });
    let linker = cargo_home_bin().join("bpf-linker");
    let linker_ok = output(Command::new(&linker).arg("--version"))
        .is_some_and(|v| v.contains(&format!("bpf-linker {BPF_LINKER}.")))
        && output(Command::new("ldd").arg(&linker))
            .is_some_and(|l| l.contains(&format!("libLLVM.so.{LLVM_MAJOR}")));
    steps.push(Step {
        name: format!("bpf-linker {BPF_LINKER} built against LLVM {LLVM_MAJOR}"),
        missing: (!linker_ok).then(|| {
            vec![sv(&[
                "env",
                &format!(
                    "PATH=/usr/lib/llvm-{LLVM_MAJOR}/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
                "rustup",
                "run",
                STABLE,
                "cargo",
                "install",
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])]
        }),
    });
    steps
}

fn setup() -> Result<()> {
    let t0 = Instant::now();
    let steps = check_steps();
    let todo: Vec<&Step> = steps.iter().filter(|s| s.missing.is_some()).collect();
    if todo.is_empty() {
        println!(
            "setup: everything present ({} checks in {:.1}s)",
            steps.len(),
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let apt_needed = todo.iter().any(|s| s.name.starts_with("Debian"));
    if apt_needed && !is_root() {
        eprintln!("setup: not root; install these as root, then run `cargo xtask setup` again:");
        for s in &todo {
            for c in s.missing.as_ref().expect("missing") {
                eprintln!("    {}", c.join(" "));
            }
        }
        bail!("setup incomplete");
    }
    for s in &steps {
        let Some(cmds) = &s.missing else {
            println!("setup: {} — present", s.name);
            continue;
        };
        println!("setup: installing {} ...", s.name);
        let t = Instant::now();
        for c in cmds {
            let mut cmd = Command::new(&c[0]);
            cmd.args(&c[1..]).env("DEBIAN_FRONTEND", "noninteractive");
            if let Err(e) = run(&mut cmd) {
                eprintln!(
                    "setup: `{}` failed; run it by hand to see why (no registry access?)",
                    c.join(" ")
                );
                return Err(e);
            }
        }
        println!("setup: installed {} in {:.1}s", s.name, t.elapsed().as_secs_f64());
    }
    println!("setup: done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo` of the userspace toolchain, with bpf-linker on PATH for the eBPF build.
fn cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", STABLE, "cargo"]).current_dir(root());
    let path = format!(
        "{}:{}",
        cargo_home_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    c.env("PATH", path);
    c
}

fn build() -> Result<PathBuf> {
    setup()?;
    run(cargo().args(["build", "--release", "-p", "monitor", "-p", "holdfast-tests"]))?;
    Ok(root().join("target/release/holdfast"))
}

/// Unit tests, then the privileged scenario tests against the release binary; skipped tests
/// (only where the kernel lacks a feature) are counted and named at the end, pass or fail.
fn test(bin: &Path, rest: &[String]) -> Result<()> {
    let skips = root().join("target/test-skips.log");
    let _ = std::fs::remove_file(&skips);
    let unit = run(cargo()
        .args(["test", "--release", "-p", "monitor-common", "-p", "monitor"])
        .env("HOLDFAST_SKIPS", &skips));
    let scenario = unit
        .as_ref()
        .map_err(|_| anyhow::anyhow!("unit tests failed"))
        .and_then(|_| {
            let mut c = cargo();
            c.args([
                "test",
                "--release",
                "--no-fail-fast",
                "-p",
                "holdfast-tests",
                "--",
            ])
            .args(rest)
            .env("HOLDFAST_BIN", bin)
            .env("HOLDFAST_SKIPS", &skips);
            if !rest.iter().any(|a| a.starts_with("--test-threads")) {
                c.arg("--test-threads=1");
            }
            run(&mut c)
        });
    let skipped: Vec<String> = std::fs::read_to_string(&skips)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    if skipped.is_empty() {
        println!("test: no test was skipped");
    } else {
        println!("test: {} skipped (the kernel lacks a feature):", skipped.len());
        for s in &skipped {
            println!("    {s}");
        }
    }
    unit.and(scenario)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r))
        .unwrap_or(("help", &[]));
    let result = match cmd {
        "setup" => setup(),
        "build" => build().map(|p| println!("built {}", p.display())),
        "run" => build().and_then(|bin| {
            let mut c = Command::new(&bin);
            c.arg("agent").args(rest);
            println!("running {} agent {}", bin.display(), rest.join(" "));
            run(&mut c)
        }),
        "test" => build().and_then(|bin| test(&bin, rest)),
        "install" => build().and_then(|bin| {
            println!("installing:");
            install::stage(&root(), &bin, Path::new("/"))?;
            install::activate();
            Ok(())
        }),
        "package" => build().and_then(|bin| {
            let deb = install::package(&root(), &bin, env!("CARGO_PKG_VERSION"))?;
            println!("built {}", deb.display());
            Ok(())
        }),
        "bench" => build().and_then(|bin| {
            let sizes: Vec<usize> = if rest.is_empty() {
                vec![1_000, 10_000, 100_000]
            } else {
                rest.iter().filter_map(|s| s.parse().ok()).collect()
            };
            let tools = root().join("target/release");
            let results = bench::run(&bin, &tools, &sizes)?;
            let dir = root().join("target/bench");
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("results.json");
            std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
            println!("\nresults: {}", path.display());
            Ok(())
        }),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|build|run [agent args]|test [test filter]|bench [connections...]|install|package>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
