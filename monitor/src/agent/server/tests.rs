use super::*;

fn access() -> Access {
    Access {
        agent_uid: 0,
        group: ("holdfast".into(), Some(900)),
        admin: Some(("hf-admin".into(), Some(901))),
    }
}

fn cred(uid: u32, gid: u32) -> sys::PeerCred {
    sys::PeerCred { pid: 1, uid, gid }
}

#[test]
fn read_and_admin_groups() {
    let a = access();
    assert!(a.check(cred(0, 0), &[]).is_ok());
    assert!(a.check(cred(1000, 1000), &[900]).is_ok(), "read group member");
    assert!(!a.is_admin(cred(1000, 1000), &[900]));
    assert!(
        a.check(cred(1001, 1001), &[901]).is_ok(),
        "admin-only member may connect"
    );
    assert!(a.is_admin(cred(1001, 1001), &[901]));
    let e = a.check(cred(1002, 1002), &[5]).unwrap_err();
    assert!(e.contains("`holdfast` or `hf-admin`"), "{e}");
}
