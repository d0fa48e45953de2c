use super::*;

#[test]
fn kinds_have_unique_ids_and_parse_back() {
    let mut ids: Vec<&str> = FindingKind::ALL.iter().map(|k| k.message_id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), FindingKind::ALL.len());
    assert!(
        ids.iter()
            .all(|i| i.len() == 32 && i.chars().all(|c| c.is_ascii_hexdigit()))
    );
    for k in FindingKind::ALL {
        assert_eq!(FindingKind::parse(k.as_str()), Ok(k));
        assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
    }
    assert!(
        FindingKind::parse("zombies")
            .unwrap_err()
            .contains("zombie, dead-socket-held")
    );
}

#[test]
fn the_shipped_catalog_and_docs_explain_every_kind() {
    let cat = include_str!("../../../../packaging/holdfast.catalog");
    for k in FindingKind::ALL {
        assert!(
            cat.contains(&format!("-- {}\nSubject: ", k.message_id())),
            "catalog entry for {k}"
        );
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../docs/findings/{}.md", k.as_str()));
        assert!(page.exists(), "docs page for {k}");
    }
}

#[test]
fn one_classifier_for_outcomes() {
    use OutcomeStatus::*;
    assert_eq!(Planned.class(), OutcomeClass::Planned);
    assert_eq!(Pending.class(), OutcomeClass::Pending);
    assert_eq!(Succeeded.class(), OutcomeClass::Ok);
    for s in [Ineffective, Failed, Refused, Stopped] {
        assert_eq!(s.class(), OutcomeClass::Failed, "{s:?}");
    }
}

#[test]
fn subjects_read_as_words_and_carry_their_process() {
    let s = Subject::Flow {
        cookie: 9,
        local: "10.0.0.1:5".parse().unwrap(),
        remote: "10.0.0.2:22".parse().unwrap(),
        netns: Some("blue".into()),
        owner: Some(ProcRef {
            pid: 7,
            comm: "ssh".into(),
        }),
    };
    assert_eq!(s.to_string(), "flow 10.0.0.1:5 → 10.0.0.2:22 in blue pid 7 (ssh)");
    assert_eq!(s.process().map(|p| p.pid), Some(7));
    let back: Subject = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}
