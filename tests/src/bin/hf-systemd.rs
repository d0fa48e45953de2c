//! A stand-in for systemd's D-Bus API (systemd cannot run as PID 1 on the test machines): it owns
//! org.freedesktop.systemd1 on the bus at BUS_ADDRESS and implements Manager.RestartUnit for one
//! unit, whose "main process" it runs and restarts like systemd would (SIGTERM, wait, start
//! again). The process runs in the cgroup CGROUP_DIR (named after the unit, as systemd's are).
//!
//! `hf-systemd BUS_ADDRESS UNIT CGROUP_DIR PROGRAM [ARGS...]` prints `ready PID` once it owns the
//! name and the program runs, then `restarted UNIT OLD NEW` per restart. RestartUnit of another
//! unit answers org.freedesktop.systemd1.NoSuchUnit.
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

struct Manager {
    unit: String,
    spawn: Box<dyn Fn() -> Child + Send + Sync>,
    child: Arc<Mutex<Child>>,
    jobs: Mutex<u32>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    async fn restart_unit(&self, name: &str, mode: &str) -> zbus::fdo::Result<zbus::OwnedObjectPath> {
        if name != self.unit {
            return Err(zbus::fdo::Error::Failed(format!("Unit {name} not loaded.")));
        }
        if mode != "replace" {
            return Err(zbus::fdo::Error::InvalidArgs(format!("unexpected mode {mode}")));
        }
        let mut child = self.child.lock().expect("lock");
        let old = child.id();
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(old as i32, libc::SIGTERM) };
        let _ = child.wait();
        *child = (self.spawn)();
        println!("restarted {name} {old} {}", child.id());
        let mut jobs = self.jobs.lock().expect("lock");
        *jobs += 1;
        zbus::OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{}", *jobs))
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> zbus::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bus, unit, cgroup, program, rest @ ..] = args.as_slice() else {
        eprintln!("usage: hf-systemd BUS_ADDRESS UNIT CGROUP_DIR PROGRAM [ARGS...]");
        std::process::exit(2);
    };
    let (cgroup, program, rest) = (cgroup.clone(), program.clone(), rest.to_vec());
    let spawn = move || {
        let mut c = Command::new("sh");
        // SAFETY: prctl(2) only, between fork and exec: the unit's process dies with us, as a
        // unit's processes do when systemd stops it (no orphan holds the test's port).
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&cgroup)
            .arg(&program)
            .args(&rest)
            .spawn()
            .expect("start the unit's program")
    };
    let child = Arc::new(Mutex::new(spawn()));
    let pid = child.lock().expect("lock").id();
    let manager = Manager {
        unit: unit.clone(),
        spawn: Box::new(spawn),
        child: child.clone(),
        jobs: Mutex::new(0),
    };
    let _conn = zbus::connection::Builder::address(bus.as_str())
        .name("org.freedesktop.systemd1")
        .serve_at("/org/freedesktop/systemd1", manager)
        .build()
        .await?;
    println!("ready {pid}");
    // Serve until stdin closes, then stop the unit's program.
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin().read_line(&mut s).is_ok_and(|n| n > 0) {
            s.clear();
        }
    })
    .await
    .ok();
    let mut c = child.lock().expect("lock");
    let _ = c.kill();
    let _ = c.wait();
    Ok(())
}
