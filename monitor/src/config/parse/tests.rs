use std::time::Duration;

use super::super::{Mode, RemedyMode};
use super::*;

fn err(text: &str) -> String {
    Config::parse(text, "f").unwrap_err().to_string()
}

#[test]
fn defaults_and_a_full_file() {
    assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    let c = Config::parse(
        "[agent]\nmode = \"poll\"\nsocket = \"/tmp/h/h.sock\"\n[snapshot]\npoll_interval = \"250ms\"\n",
        "x",
    )
    .unwrap();
    assert_eq!(c.agent.mode, Mode::Poll);
    assert_eq!(c.snapshot.poll_interval, Duration::from_millis(250));
    assert_eq!(c.snapshot.ebpf_interval, Duration::from_secs(10));
    let c = Config::parse(
        "[zombies]\nmin_age = \"0s\"\n[remedies]\nsigchld = \"dry-run\"\n",
        "x",
    )
    .unwrap();
    assert_eq!(c.zombies.min_age, Duration::ZERO);
    assert_eq!(c.remedies.sigchld, RemedyMode::DryRun);
    let e = err("[remedies]\nsigchld = \"yes\"\n");
    assert!(
        e.contains("f:2: key `remedies.sigchld`") && e.contains("dry-run"),
        "{e}"
    );
}

#[test]
fn the_shipped_example_is_valid_and_shows_back_as_the_same_config() {
    let text = include_str!("../../../../packaging/holdfast.toml.example");
    let c = Config::parse(text, "example").unwrap();
    let shown = c.to_toml();
    assert_eq!(Config::parse(&shown, "shown").unwrap(), c, "{shown}");
}

#[test]
fn errors_name_file_line_key_and_expectation() {
    let e = Config::parse("[agent]\nmode = \"fast\"\n", "/etc/h.toml").unwrap_err();
    let ConfigError::Invalid {
        path,
        line,
        key,
        message,
    } = e
    else {
        panic!()
    };
    assert_eq!(
        (path.as_str(), line, key.as_str()),
        ("/etc/h.toml", 2, "agent.mode")
    );
    assert!(message.contains("auto") && message.contains("poll"), "{message}");
    let e = err("[snapshot]\n\npoll_interval = \"10\"\n");
    assert!(
        e.starts_with("f:3: key `snapshot.poll_interval`") && e.contains("needs a unit"),
        "{e}"
    );
    let e = err("[agent]\nsokcet = \"/x\"\n");
    assert!(
        e.contains("f:2") && e.contains("sokcet") && e.contains("expected one of"),
        "{e}"
    );
    assert!(err("[agent\n").starts_with("f:1"));
    let e = err("[snapshot]\npoll_interval = \"1ms\"\n");
    assert!(e.contains("f:2") && e.contains("between 100ms and 1d"), "{e}");
    for bad in ["0.01", "80", "nan", "\"5%\""] {
        let e = err(&format!("[snapshot]\nread_cpu_percent = {bad}\n"));
        assert!(
            e.contains("f:2") && e.contains("snapshot.read_cpu_percent"),
            "{bad}: {e}"
        );
    }
    assert!(err("[agent]\nsocket = \"rel/x\"\n").contains("absolute"));
}

#[test]
fn nonsense_is_refused_with_the_key_that_holds_it() {
    let cases: &[(&str, &str)] = &[
        (
            "[zombies]\nheal_interval = \"0s\"\n",
            "f:2: key `zombies.heal_interval`",
        ),
        (
            "[zombies]\nscan_interval = \"0s\"\n",
            "f:2: key `zombies.scan_interval`",
        ),
        (
            "[snapshot]\nfull_interval = \"0s\"\n",
            "f:2: key `snapshot.full_interval`",
        ),
        ("[keepalive]\nprobes = 0\n", "f:2: key `keepalive.probes`"),
        (
            "[keepalive]\nprobes = 4294967295\n",
            "f:2: key `keepalive.probes`",
        ),
        (
            "[eviction]\ndefault_profile = \"nope\"\n",
            "f:2: key `eviction.default_profile`: unknown profile `nope`",
        ),
        (
            "[[rules]]\ncidr = \"10.0.0.0/8\"\nprofile = \"nope\"\n",
            "f:3: key `rules[0].profile`: unknown profile `nope`",
        ),
        (
            "[[rules]]\nport = 22\nprofile = \"azure-lb\"\n[[rules]]\nport = 23\nprofile = \"azure-lb\"\ntimeout = \"5s\"\n",
            "f:7: key `rules[1].timeout`: give either",
        ),
        ("[[rules]]\nport = 22\n", "f:1: key `rules[0]`: a rule needs"),
        (
            "[[profiles]]\nname = \"a\"\nidle_timeout = \"1m\"\n[[profiles]]\nname = \"a\"\nidle_timeout = \"2m\"\n",
            "f:5: key `profiles[1].name`: profile `a` is defined twice",
        ),
        (
            "[[profiles]]\nname = \"\"\nidle_timeout = \"1m\"\n",
            "f:2: key `profiles[0].name`",
        ),
        (
            "[[profiles]]\nname = \"x\"\nidle_timeout = \"0s\"\n",
            "f:3: key `profiles[0].idle_timeout`",
        ),
        (
            "[[rules]]\nport = 1\ntimeout = \"0s\"\n",
            "f:3: key `rules[0].timeout`",
        ),
        (
            "[agent]\nsocket = \"/run/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock\"\n",
            "at most 107",
        ),
        ("[agent]\nsocket = \"/tmp\"\n", "names a directory"),
        (
            "[snapshot]\nfull_interval = \"18446744073709551615s18446744073709551615s\"\n",
            "f:2: key `snapshot.full_interval`",
        ),
        (
            "[[services]]\nname = \"a\"\ncomm = \"a\"\nrestart = \"enforce\"\n",
            "needs the service's systemd `unit`",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "{text:?}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn load_refuses_what_is_not_a_config_file() {
    let p = Path::new("/nonexistent/holdfast.toml");
    assert_eq!(Config::load(p, false).unwrap(), (Config::default(), false));
    assert!(matches!(Config::load(p, true), Err(ConfigError::Read { .. })));
    let e = Config::load(Path::new("/dev/zero"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = Config::load(Path::new("/tmp"), true).unwrap_err().to_string();
    assert!(e.contains("/tmp"), "{e}");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

        /// Any text: a configuration or an error naming a line, never a panic.
        #[test]
        fn any_text_is_a_config_or_a_located_error(text in "(?s).{0,300}") {
            if let Err(e) = Config::parse(&text, "f") {
                prop_assert!(e.to_string().starts_with("f:"), "{e}");
            }
        }

        /// Known keys with random values: valid, or an error naming that key.
        #[test]
        fn known_keys_with_any_value(
            (table, key) in prop::sample::select(vec![
                ("snapshot", "poll_interval"), ("snapshot", "ebpf_interval"), ("snapshot", "full_interval"),
                ("snapshot", "read_cpu_percent"),
                ("zombies", "min_age"), ("zombies", "heal_interval"), ("zombies", "scan_interval"),
                ("keepalive", "probes"), ("keepalive", "floor"), ("keepalive", "refresh_ratio"),
                ("eviction", "warn_ratio"), ("eviction", "default_profile"), ("leaks", "half_open_probes"),
                ("agent", "socket"), ("agent", "max_clients"), ("ledger", "horizon"),
            ]),
            value in prop_oneof![
                "[0-9]{1,25}".prop_map(|d| d),
                "[0-9]{1,22}(ms|s|m|h|d){1,3}".prop_map(|d| format!("\"{d}\"")),
                Just("\"\"".to_string()), Just("-1".to_string()), Just("1.5".to_string()),
                Just("\"/x\"".to_string()), Just("true".to_string()), Just("[]".to_string()),
            ],
        ) {
            let text = format!("[{table}]\n{key} = {value}\n");
            if let Err(e) = Config::parse(&text, "f") {
                let e = e.to_string();
                prop_assert!(e.starts_with("f:") && e.contains(key), "{text:?} -> {e}");
            }
        }
    }
}

/// The file loaders (the configuration and the learnt-paths state) against whatever can sit at
/// their paths: regular files of any size and content, symlinks to anything, FIFOs, devices,
/// directories, sockets, missing paths. Each answers at once with a value or an error naming the
/// path; none blocks, panics or reads an oversized file whole.
mod loaders {
    use super::*;
    use crate::track::paths::PathBook;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, Clone)]
    enum Thing {
        Text(String),
        Bytes(Vec<u8>),
        /// A sparse file of this many MiB (more than either loader takes).
        Big(u64),
        Fifo,
        Dir,
        Socket,
        /// A symlink to one of these.
        Link(&'static str),
        Missing,
    }

    fn thing() -> impl Strategy<Value = Thing> {
        prop_oneof![
            "(?s).{0,200}".prop_map(Thing::Text),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Thing::Bytes),
            (9u64..200).prop_map(Thing::Big),
            Just(Thing::Fifo),
            Just(Thing::Dir),
            Just(Thing::Socket),
            prop::sample::select(vec![
                "/dev/zero",
                "/dev/null",
                "/etc/hostname",
                "/tmp",
                "/nonexistent",
                "fifo"
            ])
            .prop_map(Thing::Link),
            Just(Thing::Missing),
        ]
    }

    fn lay(dir: &Path, t: &Thing) -> std::path::PathBuf {
        let p = dir.join("f");
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_dir(&p);
        match t {
            Thing::Text(s) => std::fs::write(&p, s).unwrap(),
            Thing::Bytes(b) => std::fs::write(&p, b).unwrap(),
            Thing::Big(mib) => std::fs::File::create(&p).unwrap().set_len(mib << 20).unwrap(),
            Thing::Fifo => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap(),
            Thing::Dir => std::fs::create_dir(&p).unwrap(),
            Thing::Socket => drop(std::os::unix::net::UnixListener::bind(&p).unwrap()),
            Thing::Link(to) => {
                let target = if *to == "fifo" {
                    let f = dir.join("target-fifo");
                    if !f.exists() {
                        nix::unistd::mkfifo(&f, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
                    }
                    f
                } else {
                    std::path::PathBuf::from(to)
                };
                std::os::unix::fs::symlink(target, &p).unwrap();
            }
            Thing::Missing => {}
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

        #[test]
        fn whatever_is_at_the_path_the_loaders_answer_at_once(t in thing()) {
            let dir = std::env::temp_dir().join(format!("hf-loaders-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let p = lay(&dir, &t);
            let shown = p.display().to_string();
            let t0 = std::time::Instant::now();
            match Config::load(&p, true) {
                Ok(_) => prop_assert!(matches!(t, Thing::Text(_) | Thing::Bytes(_) | Thing::Link("/etc/hostname"))),
                Err(e) => prop_assert!(e.to_string().contains(&shown), "{e}"),
            }
            match PathBook::load(&p) {
                Ok(b) => prop_assert!(
                    b.is_empty() || matches!(t, Thing::Text(_) | Thing::Bytes(_)),
                    "{t:?}"
                ),
                Err(e) => {
                    prop_assert!(e.msg.contains(&shown), "{}", e.msg);
                    // A symlink, a FIFO or an oversized file is never taken for bad content
                    // (which would be moved aside).
                    if matches!(t, Thing::Link(_) | Thing::Fifo | Thing::Big(_) | Thing::Dir | Thing::Socket) {
                        prop_assert!(!e.content, "{t:?}: {}", e.msg);
                    }
                }
            }
            prop_assert!(t0.elapsed() < std::time::Duration::from_secs(2), "{t:?} took {:?}", t0.elapsed());
        }
    }
}
