//! Reload (SIGHUP or `holdfast reload`): a bad file is refused and the running configuration stays
//! in force; a good one rebuilds the whole runtime policy (and the snapshot thread's pacing and
//! keepalive-at-connect values); keys that need a restart are named in the reply and the log.
use tracing::{error, info, warn};

use super::workers::{ProcMsg, WorkerMsg};
use super::{Runtime, State};
use crate::config::Config;
use crate::config::policy::Policy;
use crate::ipc::ReloadReply;

/// The keys whose change takes effect only at the next restart.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let a = (&old.agent, &new.agent);
    let mut out = Vec::new();
    let mut check = |changed: bool, key: &str| {
        if changed {
            out.push(key.to_string());
        }
    };
    check(a.0.mode != a.1.mode, "agent.mode");
    check(a.0.socket != a.1.socket, "agent.socket");
    check(a.0.metrics != a.1.metrics, "agent.metrics");
    check(a.0.metrics_socket != a.1.metrics_socket, "agent.metrics_socket");
    check(a.0.read_group != a.1.read_group, "agent.read_group");
    check(a.0.admin_group != a.1.admin_group, "agent.admin_group");
    check(a.0.max_clients != a.1.max_clients, "agent.max_clients");
    check(a.0.journal != a.1.journal, "agent.journal");
    check(a.0.namespaces != a.1.namespaces, "agent.namespaces");
    check(
        old.keepalive.cgroups != new.keepalive.cgroups,
        "keepalive.cgroups",
    );
    check(
        old.learning.state_file != new.learning.state_file,
        "learning.state_file",
    );
    out
}

pub fn apply(state: &mut State, rt: &mut Runtime) -> Result<ReloadReply, String> {
    let Some(path) = rt.config_path.clone() else {
        let e = "no configuration file was loaded at start (defaults in force); start with --config FILE to reload".to_string();
        warn!("{e}");
        return Err(e);
    };
    let new = match Config::load(&path, true) {
        Ok((c, _)) => c,
        Err(e) => {
            let msg = format!("configuration reload refused, the previous configuration stays in force: {e}");
            error!("{msg}");
            state.stats.last_reload_error = Some(e.to_string());
            return Err(msg);
        }
    };
    let restart = restart_needed(&rt.cfg, &new);
    // Keys that need a restart keep their running value until then.
    let mut applied = new;
    applied.agent = rt.cfg.agent.clone();
    applied.keepalive.cgroups = rt.cfg.keepalive.cgroups.clone();
    applied.learning.state_file = rt.cfg.learning.state_file.clone();
    state.policy = Policy::build(&applied, rt.ebpf, state.shortest_external_s());
    state.relearn();
    let ct = state.shortest_external_s();
    state.policy = Policy::build(&applied, rt.ebpf, ct);
    state.table.unquiet(None);
    rt.cfg = applied;
    let _ = rt.workers.send(WorkerMsg::Pacing(state.policy.pacing));
    let _ = rt.procs.send(ProcMsg::Interval(state.policy.proc_interval));
    state.stats.reloads += 1;
    state.stats.last_reload_error = None;
    if restart.is_empty() {
        info!(path = %path.display(), "configuration reloaded");
    } else {
        warn!(path = %path.display(), "configuration reloaded; changes to {} take effect at the next restart", restart.join(", "));
    }
    Ok(ReloadReply {
        config: path.display().to_string(),
        restart_needed: restart,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_keys_that_need_a_restart() {
        let old = Config::default();
        let mut new = Config::default();
        assert!(restart_needed(&old, &new).is_empty());
        new.agent.socket = "/run/other/h.sock".into();
        new.keepalive.cgroups = vec!["app".into()];
        new.snapshot.ebpf_interval = std::time::Duration::from_secs(3);
        assert_eq!(restart_needed(&old, &new), ["agent.socket", "keepalive.cgroups"]);
        new.agent.namespaces = crate::config::NamespaceScope::Own;
        new.learning.state_file = "/var/lib/other/p.json".into();
        assert_eq!(
            restart_needed(&old, &new),
            [
                "agent.socket",
                "agent.namespaces",
                "keepalive.cgroups",
                "learning.state_file"
            ]
        );
    }
}
