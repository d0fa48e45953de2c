//! The operator surface (issue 6): journald entries, exit codes, reload, access control,
//! metrics, the live event stream.
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use holdfast_tests::{Agent, Netns, Parent, helper_bin, holdfast_bin, require_root, wait_for};
use serde_json::Value;

const ZOMBIE_CONFIG: &str = "[zombies]\nmin_age = \"1s\"\nscan_interval = \"250ms\"\n";

/// A systemd-journald for the test: the running one, or one started (and stopped) here.
struct Journald(Option<std::process::Child>);

impl Journald {
    fn ensure() -> Self {
        let path = std::path::Path::new("/run/systemd/journal/socket");
        // A socket file left by a journald that is gone refuses connections: start a new one.
        let alive = || {
            std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.connect(path))
                .is_ok()
        };
        if alive() {
            return Journald(None);
        }
        let child = Command::new("/lib/systemd/systemd-journald")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start systemd-journald");
        wait_for(Duration::from_secs(10), "journald's socket", || {
            if alive() {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        });
        Journald(Some(child))
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn journal(filter: &str) -> Vec<Value> {
    let o = Command::new("journalctl")
        .args(["-o", "json", "--no-pager", filter])
        .output()
        .expect("journalctl");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn findings_and_remedies_are_journal_entries_with_fields() {
    require_root();
    let _j = Journald::ensure();
    let ns = Netns::new("jrnl");
    // INVOCATION_ID makes the agent believe it runs under systemd: its own logs go to journald too.
    let agent = Agent::start_env(
        &ns,
        "ebpf",
        "",
        ZOMBIE_CONFIG,
        &[("INVOCATION_ID", "holdfast-test")],
    );
    let parent = Parent::spawn("lost-signal", 2);
    let pid = parent.pid().to_string();
    let entries = wait_for(
        Duration::from_secs(15),
        "the finding and the remedy in the journal",
        || {
            let e = journal(&format!("HOLDFAST_PID={pid}"));
            let has_new = e.iter().any(|x| x["HOLDFAST_TRANSITION"] == "new");
            let has_action = e.iter().any(|x| x["HOLDFAST_ACTION"] == "sigchld");
            if has_new && has_action {
                Ok(e)
            } else {
                Err(format!("{} entries", e.len()))
            }
        },
    );
    let new = entries
        .iter()
        .find(|x| x["HOLDFAST_TRANSITION"] == "new")
        .unwrap();
    assert_eq!(new["MESSAGE_ID"], "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f27", "{new}");
    assert_eq!(new["HOLDFAST_KIND"], "zombie");
    assert_eq!(new["PRIORITY"], "4", "a warning: {new}");
    assert_eq!(new["HOLDFAST_COMM"], "hf-parent");
    assert_eq!(new["SYSLOG_IDENTIFIER"], "holdfast");
    assert!(new["MESSAGE"].as_str().unwrap().contains("zombie child"), "{new}");
    let action = entries
        .iter()
        .find(|x| x["HOLDFAST_ACTION"] == "sigchld")
        .unwrap();
    assert!(
        action["HOLDFAST_OUTCOME"].as_str().unwrap().starts_with("sent")
            || action["HOLDFAST_OUTCOME"].as_str().unwrap().starts_with("reaped"),
        "{action}"
    );
    assert_eq!(action["PRIORITY"], "5");
    let own = journal("SYSLOG_IDENTIFIER=holdfast");
    assert!(
        own.iter()
            .any(|x| x["MESSAGE"] == "holdfast agent started" && x["HOLDFAST_MODE"] == "ebpf"),
        "the agent's own log with fields"
    );
    assert_eq!(agent.json(&["status", "--json"]).unwrap()["journal"], true);
}

#[test]
fn status_check_exit_codes_and_events_follow() {
    require_root();
    let ns = Netns::new("codes");
    let agent = Agent::start(&ns, "poll", ZOMBIE_CONFIG);
    let (code, _, _) = agent.cli(&["status", "--check"]);
    assert_eq!(code, 0, "no findings: healthy");
    let mut follow = Command::new(holdfast_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .args(["events", "--follow", "--json", "--kind", "zombie"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The follower is subscribed once the agent counts it as a connected client.
    wait_for(Duration::from_secs(5), "the follower to connect", || {
        let c = agent.status()["clients"].as_u64().unwrap_or(0);
        if c >= 1 {
            Ok(())
        } else {
            Err(format!("{c} clients"))
        }
    });
    let parent = Parent::spawn("blocked", 1);
    // Read the first line on a thread, with a deadline: a broken stream fails, never hangs.
    let out = follow.stdout.take().unwrap();
    let (ltx, lrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = ltx.send(line);
    });
    let line = lrx.recv_timeout(Duration::from_secs(15));
    let _ = follow.kill();
    let _ = follow.wait();
    let line = line.expect("a notice within 15 s");
    let n: Value = serde_json::from_str(&line).expect("one JSON notice per line");
    assert_eq!(n["kind"], "zombie");
    assert_eq!(n["transition"], "new");
    assert_eq!(n["pid"], parent.pid());
    let (code, out, _) = agent.cli(&["status", "--check"]);
    assert_eq!(code, 1, "findings present: {out}");
    let (code, out, _) = agent.cli(&["events", "--kind", "zombie"]);
    assert_eq!(code, 0);
    assert!(out.contains("zombie") && out.contains("new"), "{out}");
}

#[test]
fn sighup_reload_refuses_a_bad_config_and_applies_a_good_one() {
    require_root();
    let ns = Netns::new("reload");
    let agent = Agent::start(
        &ns,
        "poll",
        &format!("{ZOMBIE_CONFIG}[remedies]\nsigchld = \"off\"\n"),
    );
    let parent = Parent::spawn("lost-signal", 1);
    wait_for(Duration::from_secs(10), "the finding", || {
        let f = agent.json(&["findings", "--json", "--kind", "zombie"])?;
        if f.as_array().is_some_and(|a| !a.is_empty()) {
            Ok(())
        } else {
            Err("none".into())
        }
    });
    // A bad file: refused, reported with file, line and key; the agent keeps its old config.
    let good = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        good.replace("sigchld = \"off\"", "sigchld = \"sometimes\""),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &agent.child.id().to_string()])
        .status()
        .unwrap();
    let st = wait_for(Duration::from_secs(5), "the refusal", || {
        let s = agent.json(&["status", "--json"])?;
        if s["last_reload_error"].is_string() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    let err = st["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains("key `remedies.sigchld`") && err.contains(&agent.config.display().to_string()),
        "{err}"
    );
    assert_eq!(st["config_reloads"], 0);
    agent.wait_rounds("zombies", 5);
    assert_eq!(parent.zombies_left(), 1, "still off: nothing sent");
    // A good file through `holdfast reload`: applied; the nudge now happens.
    std::fs::write(
        &agent.config,
        good.replace("sigchld = \"off\"", "sigchld = \"enforce\""),
    )
    .unwrap();
    let (code, out, err) = agent.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(agent.json(&["status", "--json"]).unwrap()["config_reloads"], 1);
    wait_for(
        Duration::from_secs(5),
        "the nudge under the new config",
        || match parent.zombies_left() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    );
}

#[test]
fn changes_need_root_or_the_admin_group() {
    require_root();
    let ns = Netns::new("admin");
    let agent = Agent::start_env(&ns, "poll", "read_group = \"nogroup\"", "", &[]);
    Command::new("chmod")
        .arg("0755")
        .arg(agent.socket.parent().unwrap())
        .status()
        .unwrap();
    Command::new("chmod")
        .arg("0666")
        .arg(&agent.socket)
        .status()
        .unwrap();
    let as_nobody = |args: &[&str]| {
        let o = Command::new(holdfast_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    // nobody is in `nogroup` (the read group here): it may read ...
    let (code, err, _) = as_nobody(&["status"]);
    assert_eq!(code, Some(0), "{err}");
    // ... but not change anything.
    let (code, err, _) = as_nobody(&["reload"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("permission denied: reloading the configuration needs root or the admin group"),
        "{err}"
    );
    let (code, err, _) = as_nobody(&["remedy", "keepalive", "cookie:1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("permission denied: remedies change other processes' sockets"),
        "{err}"
    );
}

#[test]
fn metrics_are_prometheus_text_on_loopback() {
    require_root();
    let ns = Netns::new("metrics");
    let agent = Agent::start_env(&ns, "poll", "metrics = \"127.0.0.1:9464\"", "", &[]);
    let _peer = holdfast_tests::Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let body = wait_for(Duration::from_secs(5), "a scrape", || {
        let o = ns
            .cmd(&helper_bin("hf-load"))
            .args(["get", "127.0.0.1:9464"])
            .output()
            .map_err(|e| e.to_string())?;
        let b = String::from_utf8_lossy(&o.stdout).into_owned();
        // Two listeners in this namespace: the test peer and the agent's own metrics socket.
        if b.contains(&format!(
            "holdfast_flows{{netns=\"{}\",state=\"LISTEN\"}} 2",
            ns.name
        )) {
            Ok(b)
        } else {
            Err(b)
        }
    });
    // Every line is a comment (HELP/TYPE) or `name{labels} value`.
    let mut names = Vec::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let (kw, name) = (p.next().unwrap(), p.next().unwrap());
            assert!(kw == "HELP" || kw == "TYPE", "{line}");
            if kw == "TYPE" {
                assert!(["gauge", "counter"].contains(&p.next().unwrap()), "{line}");
                names.push(name.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && names.contains(&name.to_string()),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
    }
    assert!(body.contains("holdfast_mode{mode=\"poll\"} 1"), "{body}");
    assert!(
        body.contains(&format!(
            "holdfast_flows{{netns=\"{}\",state=\"LISTEN\"}} 2",
            ns.name
        )),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("holdfast_agent_rss_bytes ") && !l.ends_with(" 0")),
        "{body}"
    );
    assert!(body.contains("holdfast_events_lost_total 0"), "{body}");
    drop(agent);
    // Only loopback: anything else is a config error naming the key.
    let dir = std::env::temp_dir().join(format!("hf-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[agent]\nmetrics = \"0.0.0.0:9464\"\n").unwrap();
    let o = Command::new(holdfast_bin())
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(":2: key `agent.metrics`") && err.contains("loopback"),
        "{err}"
    );
}
