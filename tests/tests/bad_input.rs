//! Bad input gets a clear error and the agent keeps running (issue 2, item 7).
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use holdfast_tests::{Agent, Netns, holdfast_bin, require_root, wait_for};

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(holdfast_bin())
        .args(args)
        .output()
        .expect("run holdfast");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn unknown_flags_and_values_are_usage_errors() {
    let (code, _, err) = run(&["flows", "--bogus"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
    let (code, _, err) = run(&["agent", "--mode", "fast"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value 'fast'") && err.contains("auto, ebpf, poll"),
        "{err}"
    );
    let (code, _, err) = run(&["flows", "--port", "70000"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn no_agent_says_how_to_start_one() {
    let (code, _, err) = run(&["--socket", "/tmp/holdfast-test-nobody-here.sock", "status"]);
    assert_eq!(code, 3);
    assert!(
        err.contains("no agent at /tmp/holdfast-test-nobody-here.sock: start it with `holdfast agent`"),
        "{err}"
    );
}

#[test]
fn bad_config_names_file_line_key_and_expectation() {
    let dir = std::env::temp_dir().join(format!("hf-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "[agent]\nmode = \"auto\"\n\n[snapshot]\npoll_interval = \"fast\"\n",
    )
    .unwrap();
    let path = cfg.to_str().unwrap();
    let (code, _, err) = run(&["agent", "--config", path]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{path}:5: key `snapshot.poll_interval`")),
        "{err}"
    );
    assert!(err.contains("not a duration like 350s"), "{err}");
    let (code, _, err) = run(&["config", "check", path]);
    assert_eq!(code, 2, "a bad file is a configuration error (exit 2): {err}");
    assert!(err.contains(":5:"), "{err}");
    std::fs::write(&cfg, "[agent]\nmode = \"poll\"\n").unwrap();
    let (code, out, _) = run(&["config", "check", path]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("{path}: ok"), "no dump of internals");
    let (code, out, _) = run(&["config", "check", "--show", path]);
    assert_eq!(code, 0);
    assert!(
        out.contains("[agent]")
            && out.contains("mode = \"poll\"")
            && out.contains("poll_interval = \"500ms\""),
        "the effective configuration as TOML: {out}"
    );
    let (code, _, err) = run(&["config", "check", "/dev/zero"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    let (code, _, err) = run(&["agent", "--config", "/nonexistent/holdfast.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read config /nonexistent/holdfast.toml"),
        "{err}"
    );
}

#[test]
fn malformed_ipc_lines_get_errors_and_the_connection_stays_usable() {
    require_root();
    let ns = Netns::new("ipc");
    let agent = Agent::start(&ns, "poll", "");
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ask = |line: &str| -> serde_json::Value {
        (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    let e = ask("this is not json");
    assert_eq!(e["ok"], false);
    assert!(e["error"].as_str().unwrap().contains("malformed request"), "{e}");
    let e = ask(r#"{"v":1,"op":"launch-missiles"}"#);
    assert!(e["error"].as_str().unwrap().contains("ops: status, flows"), "{e}");
    let e = ask(r#"{"v":9,"op":"status"}"#);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unsupported protocol version 9"),
        "{e}"
    );
    let e = ask(r#"{"v":1,"op":"flows","filter":{"state":"dancing"}}"#);
    assert!(
        e["error"].as_str().unwrap().contains("unknown state `dancing`"),
        "{e}"
    );
    let ok = ask(r#"{"v":1,"op":"status"}"#);
    assert_eq!(ok["ok"], true, "the same connection still works: {ok}");
    assert_eq!(ok["data"]["mode"], "poll");
    assert!(
        agent.json(&["status", "--json"]).is_ok(),
        "and the agent still serves others"
    );
}

#[test]
fn a_caller_without_permission_is_refused_clearly() {
    require_root();
    let ns = Netns::new("perm");
    let agent = Agent::start(&ns, "poll", "");
    // Let `nobody` reach the socket file so that the agent's own credential check is exercised.
    let dir = agent.socket.parent().unwrap();
    Command::new("chmod").args(["0755"]).arg(dir).status().unwrap();
    Command::new("chmod")
        .args(["0666"])
        .arg(&agent.socket)
        .status()
        .unwrap();
    let o = Command::new(holdfast_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied: uid 65534 is neither root nor in group"),
        "{err}"
    );
    // With the socket at its normal 0660 root-only mode the kernel refuses first; the CLI explains.
    Command::new("chmod")
        .args(["0660"])
        .arg(&agent.socket)
        .status()
        .unwrap();
    let o = Command::new(holdfast_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("permission denied on") && err.contains("usermod -aG"),
        "{err}"
    );
    assert!(agent.json(&["status", "--json"]).is_ok());
}

#[test]
fn auto_mode_degrades_to_poll_with_one_clear_warning() {
    require_root();
    let ns = Netns::new("degrade");
    // An unprivileged agent cannot load eBPF programs: auto must fall back to poll and say why.
    let dir = std::env::temp_dir().join(format!("{}-nobody", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    Command::new("chown")
        .arg("65534:65534")
        .arg(&dir)
        .status()
        .unwrap();
    // The agent makes the socket's directory itself (it adopts no existing one).
    let socket = dir.join("run/h.sock");
    let stderr_path = dir.join("stderr");
    // `ip netns exec` needs root; drop to nobody inside the namespace with setpriv.
    let as_nobody = |args: &[&str]| {
        let mut c = ns.cmd(std::path::Path::new("setpriv"));
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(holdfast_bin())
            .args(args);
        c
    };
    let mut child = as_nobody(&["agent", "--mode", "auto", "--socket", socket.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_for(Duration::from_secs(10), "the unprivileged agent", || {
        // Asked by its own user: the CLI believes an agent running as itself.
        let o = as_nobody(&["--socket", socket.to_str().unwrap(), "status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).map_err(|e| e.to_string())
    });
    // Root's CLI does not believe an agent that does not run as root (a squatter could lie).
    let o = Command::new(holdfast_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("runs as uid 65534, not as root: refusing to believe it"),
        "{err}"
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status["mode"], "poll", "{status}");
    let reason = status["mode_reason"].as_str().unwrap();
    assert!(reason.starts_with("auto: eBPF unavailable ("), "{reason}");
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "exactly one warning: {err}");
    assert!(
        warnings[0].contains("eBPF unavailable, running in poll mode"),
        "{err}"
    );
    assert!(reason.contains("eBPF needs root"), "{reason}");
    // Explicit ebpf mode without privileges is an error, not a silent fallback.
    let o = as_nobody(&[
        "agent",
        "--mode",
        "ebpf",
        "--socket",
        dir.join("run-e/e.sock").to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("eBPF mode was requested but the programs cannot load")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
