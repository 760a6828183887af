use super::*;
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: CaCommand,
}

fn parse(args: &[&str]) -> Result<CaCommand, clap::Error> {
    Cli::try_parse_from(std::iter::once("ca").chain(args.iter().copied())).map(|c| c.command)
}

#[test]
fn admin_target_prefers_the_socket_then_the_data_dir() {
    let target = AdminTarget {
        admin_socket: None,
        data_dir: Some("/var/lib/ca".into()),
    };
    assert_eq!(
        socket_path(&target).unwrap(),
        PathBuf::from("/var/lib/ca/admin.sock")
    );
    let target = AdminTarget {
        admin_socket: Some("/run/ca.sock".into()),
        data_dir: Some("/var/lib/ca".into()),
    };
    assert_eq!(socket_path(&target).unwrap(), PathBuf::from("/run/ca.sock"));
    let neither = AdminTarget {
        admin_socket: None,
        data_dir: None,
    };
    assert!(matches!(socket_path(&neither), Err(CaCliError::Usage(_))));
}

#[test]
fn entry_create_needs_exactly_one_scope_and_a_selector() {
    let base = [
        "entry",
        "create",
        "--data-dir",
        "d",
        "--spiffe-id",
        "spiffe://td/web",
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        parse(&args)
    };
    assert!(with(&["--node", "n1", "--selector", "unix:uid:1000"]).is_ok());
    assert!(with(&["--any-node", "--selector", "unix:uid:1000"]).is_ok());
    assert!(with(&["--selector", "unix:uid:1000"]).is_err(), "no scope");
    assert!(with(&["--node", "n1", "--any-node", "--selector", "unix:uid:1000"]).is_err());
    assert!(with(&["--node", "n1"]).is_err(), "no selector");
    assert!(
        with(&["--node", "n1", "--selector", "uid1000"]).is_err(),
        "bad selector"
    );
    assert!(with(&["--node", "bad/node", "--selector", "unix:uid:1000"]).is_err());
}

#[test]
fn bad_values_are_usage_errors() {
    assert!(
        parse(&[
            "token",
            "create",
            "--data-dir",
            "d",
            "--node",
            "n1",
            "--ttl",
            "10"
        ])
        .is_err()
    );
    assert!(parse(&["agent", "evict", "--data-dir", "d", "not-a-spiffe-id"]).is_err());
    let ok = parse(&[
        "token",
        "create",
        "--data-dir",
        "d",
        "--node",
        "n1",
        "--ttl",
        "1h",
    ])
    .unwrap();
    assert!(
        matches!(ok, CaCommand::Token { command: TokenCommand::Create { ttl, .. } } if ttl == Duration::from_secs(3600))
    );
    assert!(parse(&["rotate", "retire", "--data-dir", "d", "--danger-force"]).is_ok());
}

#[test]
fn unreachable_socket_is_one_line_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let target = AdminTarget {
        admin_socket: None,
        data_dir: Some(dir.path().to_path_buf()),
    };
    let rt = runtime().unwrap();
    let err = rt.block_on(connect(&target)).unwrap_err();
    let CaCliError::Failed(message) = err else {
        panic!("expected Failed");
    };
    assert!(
        message.contains("admin.sock`") && message.contains("meshward ca run"),
        "{message}"
    );
    assert!(!message.contains('\n'));
}

#[test]
fn utc_formats_unix_seconds() {
    assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc(86_400 + 61), "1970-01-02T00:01:01Z");
}

#[test]
fn agent_state_shows_a_renewed_svid_not_yet_used() {
    let now = 1_000;
    let agent = |expires_at, pending: Option<i64>, evicted| pb::Agent {
        expires_at,
        pending_serial: pending.map(|_| "0a1b".to_owned()).unwrap_or_default(),
        pending_expires_at: pending.unwrap_or_default(),
        evicted,
        ..Default::default()
    };
    assert_eq!(agent_state(&agent(2_000, None, false), now), "active");
    assert_eq!(agent_state(&agent(now, None, false), now), "expired");
    let renewed = "active, renewed SVID not yet used";
    assert_eq!(agent_state(&agent(2_000, Some(3_000), false), now), renewed);
    // The old SVID expired, the renewed one has not: the agent can still use the renewed one.
    assert_eq!(agent_state(&agent(500, Some(3_000), false), now), renewed);
    // A pending SVID that expired unused keeps nothing alive.
    assert_eq!(agent_state(&agent(500, Some(900), false), now), "expired");
    assert_eq!(agent_state(&agent(2_000, Some(900), false), now), "active");
    assert_eq!(
        agent_state(&agent(2_000, Some(3_000), true), now),
        "evicted"
    );
}
