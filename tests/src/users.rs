//! Other users for the tests: system groups and users created for one test and deleted after
//! it, commands and helpers run as them (setpriv), and what a process costs.
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::{helper_bin, holdfast_bin};

/// A system group created for one test and deleted after it.
pub struct Group {
    pub name: String,
    pub gid: u32,
}

impl Group {
    pub fn new(tag: &str) -> Self {
        let name = format!("hf{tag}{}", std::process::id() % 100_000);
        let o = Command::new("groupadd")
            .args(["--system", &name])
            .output()
            .expect("groupadd");
        assert!(
            o.status.success(),
            "groupadd: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let gid = std::fs::read_to_string("/etc/group")
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f[0] == name).then(|| f[2].parse().unwrap())
            })
            .expect("the new group");
        Group { name, gid }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

/// `holdfast ARGS` as uid `uid` with exactly these groups.
pub fn as_user(uid: u32, groups: &[u32], socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={}", groups.first().copied().unwrap_or(uid)));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!(
            "--groups={}",
            groups.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(",")
        ));
    }
    let o = c
        .arg(holdfast_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A helper (hf-load) run as another user, held until dropped.
pub struct Held {
    pub child: Child,
    _stdin: ChildStdin,
    pub first: String,
}

pub fn held_as(uid: u32, gid: u32, args: &[&str]) -> Held {
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(format!("--groups={gid}"))
        .arg(helper_bin("hf-load"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    Held {
        child,
        _stdin: stdin,
        first,
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A real unprivileged user (no home, no shell) created for one test and deleted after it: the
/// attacker with a local shell.
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl User {
    pub fn new(tag: &str) -> Self {
        // `hfu…`: its own group (--user-group) must not collide with a test Group's `hf…`.
        let name = format!("hfu{tag}{}", std::process::id() % 100_000);
        let o = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .output()
            .expect("useradd");
        assert!(
            o.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let line = std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .lines()
            .find(|l| l.split(':').next() == Some(name.as_str()))
            .map(String::from)
            .expect("the new user");
        let f: Vec<&str> = line.split(':').collect();
        User {
            uid: f[2].parse().unwrap(),
            gid: f[3].parse().unwrap(),
            name,
        }
    }

    /// A command run as this user, with its own group and `extra` groups.
    pub fn cmd(&self, program: &std::path::Path, extra: &[u32]) -> Command {
        let mut groups = vec![self.gid];
        groups.extend_from_slice(extra);
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg(format!(
                "--groups={}",
                groups.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(",")
            ))
            .arg(program);
        c
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}
