//! Zombie scenarios (issue 5), each in both modes, with test parents built for the purpose.
use std::time::Duration;

use holdfast_tests::{Agent, Netns, Parent, both_modes, require_root, wait_for};
use serde_json::Value;

const CONFIG: &str = "[zombies]\nmin_age = \"1s\"\nscan_interval = \"250ms\"\n";

fn finding_for(agent: &Agent, ppid: u32, all: bool) -> Option<Value> {
    let mut args = vec!["findings", "--json", "--kind", "zombie"];
    if all {
        args.push("--all");
    }
    let v = agent.json(&args).ok()?;
    v.as_array()?
        .iter()
        .rev()
        .find(|f| f["details"]["ppid"] == ppid)
        .cloned()
}

fn zombie_log_lines(agent: &Agent, ppid: u32) -> usize {
    let needle = format!("pid {ppid} (hf-parent)");
    agent
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&needle))
        .count()
}

/// A parent whose handler reaps but whose SIGCHLD was lost: nudged, reaped, reported with outcome.
fn lost_signal_is_nudged(mode: &str) {
    require_root();
    let ns = Netns::new("zlost");
    let agent = Agent::start(&ns, mode, CONFIG);
    let parent = Parent::spawn("lost-signal", 3);
    assert_eq!(parent.zombies_left(), 3, "the test parent really leaves zombies");
    let f = wait_for(Duration::from_secs(10), "the zombie finding", || {
        finding_for(&agent, parent.pid(), true).ok_or_else(|| "none yet".to_string())
    });
    assert_eq!(f["details"]["diagnosis"], "handler-lost-signal", "{f}");
    // The nudge gets them reaped within about a second of the finding.
    wait_for(
        Duration::from_secs(3),
        "the zombies to be reaped after the nudge",
        || match parent.zombies_left() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    );
    let f = wait_for(
        Duration::from_secs(5),
        "the finding to resolve with the outcome",
        || {
            let f = finding_for(&agent, parent.pid(), true).ok_or("gone")?;
            if f["active"] == false {
                Ok(f)
            } else {
                Err(f.to_string())
            }
        },
    );
    let actions = f["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "one nudge was enough: {f}");
    assert_eq!(actions[0]["action"], "sigchld");
    assert_eq!(actions[0]["mode"], "enforce");
    assert_eq!(actions[0]["outcome"]["text"], "reaped 3 of 3", "{f}");
    assert_eq!(actions[0]["outcome"]["status"], "succeeded", "{f}");
    assert_eq!(actions[0]["before"]["zombies"], 3);
    assert_eq!(actions[0]["after"]["zombies"], 0);
    let log = agent.stderr();
    assert!(
        log.contains("remedy sigchld: sent") || log.contains("remedy sigchld: reaped"),
        "{log}"
    );
}
both_modes!(lost_signal_is_nudged);

/// A parent that blocks SIGCHLD: diagnosed as blocked, never nudged, reported once.
fn blocked_parent_is_not_nudged(mode: &str) {
    require_root();
    let ns = Netns::new("zblk");
    let agent = Agent::start(&ns, mode, CONFIG);
    let parent = Parent::spawn("blocked", 2);
    let f = wait_for(Duration::from_secs(10), "the zombie finding", || {
        finding_for(&agent, parent.pid(), false).ok_or_else(|| "none yet".to_string())
    });
    assert_eq!(f["details"]["diagnosis"], "sigchld-blocked", "{f}");
    assert_eq!(f["details"]["count"], 2);
    assert_eq!(f["severity"], "critical");
    // Watch several evaluations: no nudge, no repeated report.
    agent.wait_rounds("zombies", 10);
    let f = finding_for(&agent, parent.pid(), false).unwrap();
    assert!(
        f["actions"].as_array().unwrap().is_empty(),
        "no nudge for a blocked parent: {f}"
    );
    assert_eq!(parent.zombies_left(), 2);
    assert_eq!(
        zombie_log_lines(&agent, parent.pid()),
        1,
        "reported once: {}",
        agent.stderr()
    );
    let (code, out, _) = agent.cli(&["explain", &parent.pid().to_string()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("sigchld-blocked") && out.contains("blocks SIGCHLD"),
        "{out}"
    );
    let (code, out, _) = agent.cli(&["procs", "--zombies"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&parent.pid().to_string()) && out.contains("sigchld-blocked"),
        "{out}"
    );
}
both_modes!(blocked_parent_is_not_nudged);

/// A parent with no handler that never waits: diagnosed and reported once; no nudge.
fn no_handler_is_reported_once(mode: &str) {
    require_root();
    let ns = Netns::new("znoh");
    let agent = Agent::start(&ns, mode, CONFIG);
    let parent = Parent::spawn("no-handler", 1);
    let f = wait_for(Duration::from_secs(10), "the zombie finding", || {
        finding_for(&agent, parent.pid(), false).ok_or_else(|| "none yet".to_string())
    });
    assert_eq!(f["details"]["diagnosis"], "no-handler", "{f}");
    agent.wait_rounds("zombies", 10);
    let f = finding_for(&agent, parent.pid(), false).unwrap();
    assert!(f["actions"].as_array().unwrap().is_empty(), "{f}");
    assert_eq!(
        zombie_log_lines(&agent, parent.pid()),
        1,
        "reported once: {}",
        agent.stderr()
    );
    // When the parent goes away the zombies are reparented and reaped: the finding resolves.
    let pid = parent.pid();
    drop(parent);
    wait_for(Duration::from_secs(10), "the finding to resolve", || {
        let f = finding_for(&agent, pid, true).ok_or("missing")?;
        if f["active"] == false {
            Ok(())
        } else {
            Err(f.to_string())
        }
    });
}
both_modes!(no_handler_is_reported_once);

/// A storm: one parent leaves 1000 zombies: one finding with the count; the CLI keeps answering.
fn storm_is_one_finding(mode: &str) {
    require_root();
    let ns = Netns::new("zstorm");
    let agent = Agent::start(&ns, mode, CONFIG);
    let parent = Parent::spawn("no-handler", 1000);
    let f = wait_for(
        Duration::from_secs(20),
        "one finding with all 1000 zombies",
        || {
            // The agent answers throughout (each call is a full round trip).
            agent
                .json(&["status", "--json"])
                .map_err(|e| format!("status failed: {e}"))?;
            let f = finding_for(&agent, parent.pid(), false).ok_or("none yet")?;
            if f["details"]["count"] == 1000 {
                Ok(f)
            } else {
                Err(f["details"]["count"].to_string())
            }
        },
    );
    assert_eq!(
        f["details"]["children"].as_array().unwrap().len(),
        50,
        "the list is capped, the count is not"
    );
    let all = agent.json(&["findings", "--json", "--kind", "zombie"]).unwrap();
    let mine = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["details"]["ppid"] == parent.pid())
        .count();
    assert_eq!(mine, 1, "one finding per parent, not per child");
}
both_modes!(storm_is_one_finding);

/// Dry-run reports the planned nudge and sends nothing.
fn dry_run_plans_and_leaves_the_zombies(mode: &str) {
    require_root();
    let ns = Netns::new("zdry");
    let agent = Agent::start(&ns, mode, &format!("{CONFIG}[remedies]\nsigchld = \"dry-run\"\n"));
    let parent = Parent::spawn("lost-signal", 1);
    let f = wait_for(Duration::from_secs(10), "a planned action", || {
        let f = finding_for(&agent, parent.pid(), false).ok_or("none yet")?;
        if f["actions"].as_array().is_some_and(|a| !a.is_empty()) {
            Ok(f)
        } else {
            Err(f.to_string())
        }
    });
    assert_eq!(f["actions"][0]["mode"], "dry-run");
    assert!(
        f["actions"][0]["outcome"]["text"]
            .as_str()
            .unwrap()
            .starts_with("planned: SIGCHLD"),
        "{f}"
    );
    agent.wait_rounds("zombies", 10);
    assert_eq!(parent.zombies_left(), 1, "nothing was sent");
    assert_eq!(
        finding_for(&agent, parent.pid(), false).unwrap()["actions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
both_modes!(dry_run_plans_and_leaves_the_zombies);
