use std::path::Path;

use super::client::{ClientError, call};
use super::*;

#[test]
fn requests_round_trip() {
    for req in [
        Request::Status {},
        Request::Flows {
            filter: FlowFilter {
                all: true,
                state: Some("estab".into()),
                port: Some(22),
                pid: Some(7),
                at_risk: true,
                idle_over_ms: Some(300_000),
                leaked: true,
                unit: Some("ssh.service".into()),
                netns: Some("blue".into()),
                fresh: true,
            },
        },
        Request::Findings {
            all: true,
            kind: Some(FindingKind::HalfOpen),
        },
        Request::Explain {
            target: "cookie:5".into(),
        },
        Request::Remedy {
            action: "keepalive".into(),
            target: "10.0.0.1:5000".into(),
            dry_run: true,
        },
        Request::Profiles {},
        Request::Events { follow: true },
        Request::Reload {},
    ] {
        let line = request_line(&req);
        assert_eq!(parse_request(line.trim()).unwrap(), req, "{line}");
    }
    assert_eq!(
        parse_request(r#"{"v":1,"op":"flows"}"#).unwrap(),
        Request::Flows {
            filter: FlowFilter::default()
        }
    );
}

fn refused(line: &str) -> String {
    parse_request(line).unwrap_err().error.unwrap()
}

#[test]
fn bad_lines_get_error_replies_that_name_the_problem() {
    assert!(refused("not json").contains("malformed"));
    assert!(refused(r#"{"op":"status"}"#).contains("version (missing)"));
    assert!(refused(r#"{"v":1,"op":"reboot"}"#).contains("ops: status, flows, procs"));
    assert!(refused(r#"{"v":1,"op":"flows","filter":{"port":"x"}}"#).contains("bad request"));
    assert!(refused(r#"{"v":1,"op":"status","op":"reload"}"#).contains("duplicate key `op`"));
    assert!(refused(r#"{"v":1,"v":1,"op":"status"}"#).contains("duplicate key `v`"));
    assert!(refused(r#"{"v":1,"op":"status","admin":true}"#).contains("unknown field `admin`"));
    assert!(
        refused(r#"{"v":1,"op":"flows","filter":{"all":true,"all":false}}"#).contains("duplicate key `all`")
    );
    assert!(refused(r#"{"v":1,"op":"flows","filter":{"evil":1}}"#).contains("unknown field `evil`"));
    assert!(refused(r#"{"v":1,"op":"findings","kind":"zombies"}"#).contains("unknown variant `zombies`"));
    assert!(refused("[1,2]").contains("expected an object"));
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(refused(&deep).contains("malformed"));
}

#[test]
fn replies_are_single_lines() {
    let r = Reply::ok(&vec![1, 2]).to_line();
    assert_eq!(r.matches('\n').count(), 1);
    let back: Reply = serde_json::from_str(&r).unwrap();
    assert!(back.ok);
    assert_eq!(Reply::err("x\ny").to_line().matches('\n').count(), 1);
    // A streamed reply is the same shape.
    let streamed = format!("{STREAM_OPEN}1,2{STREAM_CLOSE}");
    let back: Reply = serde_json::from_str(&streamed).unwrap();
    assert_eq!(back.data, Some(serde_json::json!([1, 2])));
}

#[test]
fn missing_socket_is_reported_as_no_agent() {
    let e =
        call::<serde_json::Value>(Path::new("/nonexistent/holdfast.sock"), &Request::Status {}).unwrap_err();
    assert_eq!(e.exit_code(), 3);
    assert!(
        e.to_string()
            .starts_with("no agent at /nonexistent/holdfast.sock: start it with")
    );
}

#[test]
fn an_impostor_is_not_believed() {
    // A listener run by another uid would be refused; run as root, the only uid we can test
    // from here is our own, which is trusted: check the check itself on the error path.
    let e = ClientError::Untrusted {
        path: "/run/holdfast/holdfast.sock".into(),
        uid: 1000,
    };
    assert_eq!(e.exit_code(), 3);
    assert!(e.to_string().contains("refusing to believe it"));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        /// Any line: a request or an error reply naming the problem, never a panic.
        #[test]
        fn any_line_is_answered(line in ".{0,400}") {
            match parse_request(&line) {
                // A line taken as a request means what the CLI would send for it.
                Ok(req) => prop_assert_eq!(parse_request(&request_line(&req)).ok(), Some(req)),
                Err(r) => prop_assert!(!r.ok && r.error.as_deref().is_some_and(|e| !e.is_empty())),
            }
        }

        /// Lines shaped like requests, with random keys and values.
        #[test]
        fn request_shaped_lines_are_answered(
            op in prop::sample::select(vec!["status", "flows", "procs", "findings", "explain", "profiles", "ledger", "events", "reload", "remedy", "x"]),
            key in "[a-z_]{1,12}",
            val in prop_oneof![Just("1".to_string()), Just("\"s\"".to_string()), Just("null".to_string()), Just("{}".to_string()), Just("[1]".to_string()), Just("-1".to_string()), Just("1e400".to_string())],
            v in prop_oneof![Just("1".to_string()), Just("2".to_string()), Just("\"1\"".to_string())],
        ) {
            let line = format!(r#"{{"v":{v},"op":"{op}","{key}":{val}}}"#);
            match parse_request(&line) {
                // Only protocol v1 and a known op can be taken, and then as what it says.
                Ok(req) => {
                    prop_assert!(v == "1" && op != "x", "{line}");
                    prop_assert_eq!(parse_request(&request_line(&req)).ok(), Some(req));
                }
                Err(r) => prop_assert!(!r.ok && r.error.as_deref().is_some_and(|e| !e.is_empty())),
            }
        }
    }
}
