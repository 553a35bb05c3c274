//! Unit tests of the flags and values, beside them.

use super::*;

fn run(args: &[&str]) -> Result<Config, ConfigError> {
    match parse_args(args)? {
        Command::Run(c) => Ok(*c),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["", "s", "10x", "-1s", "1.5s", "0s", "99999999999999s", " "] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn sizes() {
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("16m"), Ok(16 << 20));
    assert_eq!(parse_size("100"), Ok(100));
    for bad in ["", "0", "1TB", "KiB", "999999999999999g"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

#[test]
fn backends() {
    let b = parse_backend("ws://127.0.0.1:9001,weight=3").unwrap();
    assert_eq!(b.weight, 3);
    assert_eq!(b.authority, "127.0.0.1:9001");
    assert_eq!(b.addr, "127.0.0.1:9001".parse().unwrap());
    assert!(parse_backend("http://127.0.0.1:9001/x").is_ok());
    assert_eq!(b.proxy, None);
    let p = parse_backend("ws://127.0.0.1:9001,proxy=v2,weight=2").unwrap();
    assert_eq!(
        (p.proxy, p.weight),
        (Some(crate::net::proxy_protocol::Version::V2), 2)
    );
    for bad in [
        "ws://127.0.0.1:1,proxy=v3",
        "ws://127.0.0.1:1,proxy=",
        "ftp://x:1",
        "ws://127.0.0.1",
        "ws://127.0.0.1:0",
        "ws://127.0.0.1:70000",
        "ws://127.0.0.1:1,weight=0",
        "ws://127.0.0.1:1,color=red",
    ] {
        assert!(parse_backend(bad).is_err(), "{bad}");
    }
}

#[test]
fn flags_name_themselves() {
    let e = run(&["--algorithm", "nope"]).unwrap_err();
    assert!(e.to_string().contains("--algorithm"));
    let e = run(&["--header-timeout", "10x"]).unwrap_err();
    assert!(e.to_string().contains("--header-timeout"));
    let e = run(&["--drain-timeout", "0"]).unwrap_err();
    assert!(e.to_string().contains("--drain-timeout"));
    assert!(matches!(run(&["--bogus"]), Err(ConfigError::Usage(_))));
    assert!(matches!(run(&["stray"]), Err(ConfigError::Usage(_))));
    for (flag, value) in [
        ("--max-connections-per-ip", "0"),
        ("--max-memory", "10"),
        ("--allowed-origin", "example.com"),
        ("--throttle", "fast"),
        ("--ws-idle-timeout", "never"),
    ] {
        let e = run(&[flag, value]).unwrap_err();
        assert!(e.to_string().contains(flag), "{e}");
    }
    let c = run(&[
        "--max-memory",
        "1MiB",
        "--throttle",
        "64KiB/s",
        "--allowed-origin",
        "https://a.example/",
    ])
    .unwrap();
    assert_eq!(
        c.max_connections,
        (1 << 20) / (2 * crate::net::buffer::BUF_SIZE + 2048)
    );
    assert_eq!(c.throttle, 64 << 10);
    assert_eq!(c.allowed_origins, ["https://a.example"]);
}

#[test]
fn full_command_line() {
    let c = run(&[
        "-l",
        "127.0.0.1:0",
        "-B",
        "ws://127.0.0.1:9001",
        "-B",
        "http://127.0.0.1:9002,weight=2",
        "-a",
        "p2c",
        "--protocols",
        "ws",
        "--idle-timeout",
        "5s",
        "-q",
    ])
    .unwrap();
    assert_eq!(c.backends.len(), 2);
    assert_eq!(c.algorithm, Algorithm::PowerOfTwo);
    assert!(c.websocket && !c.http);
    assert_eq!(c.idle_timeout, Duration::from_secs(5));
    assert_eq!(c.verbosity, 0);
}

#[test]
fn security_flags_parse() {
    let c = run(&[
        "--backend-allow",
        "10.0.0.0/8",
        "--backend-allow",
        "fd00::/8",
        "--trusted-proxy",
        "127.0.0.1",
        "--forwarded",
        "--token-file",
        "/tmp/t",
    ])
    .unwrap();
    assert_eq!(c.backend_allow.len(), 2);
    assert_eq!(c.trusted_proxies.len(), 1);
    assert!(c.forwarded);
    assert_eq!(
        c.token_file.as_deref(),
        Some(std::path::Path::new("/tmp/t"))
    );
    assert!(matches!(
        run(&["--control-client-ca", "/tmp/ca.pem"]),
        Err(ConfigError::Usage(_))
    ));
    let d = run(&[]).unwrap();
    assert!(d.backend_allow.is_empty() && d.trusted_proxies.is_empty() && !d.forwarded);
    for flag in ["--backend-allow", "--trusted-proxy"] {
        let e = run(&[flag, "10.0.0.1/8"]).unwrap_err();
        assert!(e.to_string().contains(flag), "{e}");
    }
}

#[test]
fn backends_file_lines() {
    let specs = parse_backends_file(
        "# pool A\nws://127.0.0.1:9001\n\n  http://127.0.0.1:9002,weight=3,max_connections=50  # big\n",
    )
    .unwrap();
    assert_eq!(specs.len(), 2);
    assert_eq!((specs[1].weight, specs[1].max_connections), (3, 50));
    let e = parse_backends_file("ws://127.0.0.1:9001\nws://nohost\n").unwrap_err();
    assert!(e.starts_with("line 2: "), "{e}");
    let e = parse_backends_file("ws://127.0.0.1:1\nws://127.0.0.1:1,weight=2\n").unwrap_err();
    assert!(e.contains("twice"), "{e}");
    assert!(parse_backends_file("ws://127.0.0.1:1,weight=0").is_err());
    assert!(parse_backends_file("").unwrap().is_empty());
}

#[test]
fn spread_close_flags() {
    let c = run(&[]).unwrap();
    assert_eq!(
        (c.backend_drain_window, c.rebalance),
        (Some(Duration::from_secs(60)), 0)
    );
    let c = run(&["--backend-drain-window", "off", "--rebalance", "50"]).unwrap();
    assert_eq!((c.backend_drain_window, c.rebalance), (None, 50));
    let c = run(&["--backend-drain-window", "5s", "--rebalance", "off"]).unwrap();
    assert_eq!(
        (c.backend_drain_window, c.rebalance),
        (Some(Duration::from_secs(5)), 0)
    );
    for (flag, value) in [
        ("--backend-drain-window", "0"),
        ("--backend-drain-window", "soon"),
        ("--rebalance", "0"),
        ("--rebalance", "-3"),
        ("--rebalance", "1.5"),
    ] {
        let e = run(&[flag, value]).unwrap_err();
        assert!(e.to_string().contains(flag), "{e}");
    }
}

#[test]
fn messaging_flags_parse() {
    let d = run(&[]).unwrap().messaging;
    assert_eq!(d, Messaging::default());
    let c = run(&[
        "--client-id-header",
        "X-Client",
        "--instance-id",
        "lb-1",
        "--message-max",
        "1KiB",
        "--message-rate",
        "0",
        "--client-queue-max",
        "4096",
        "--backend-messages",
        "own",
    ])
    .unwrap()
    .messaging;
    assert_eq!(c.client_id_header.as_deref(), Some("X-Client"));
    assert_eq!(
        (c.instance_id.as_str(), c.max_payload, c.rate),
        ("lb-1", 1024, 0)
    );
    assert_eq!((c.client_queue_max, c.scope), (4096, MessageScope::Own));
    let off = run(&["--client-id-header", "off"]).unwrap().messaging;
    assert_eq!(off.client_id_header, None);
    for (flag, v) in [
        ("--client-id-header", "X Client"),
        ("--instance-id", "a.b"),
        ("--message-max", "2MiB"),
        ("--client-queue-max", "0"),
        ("--message-rate", "-1"),
        ("--backend-messages", "some"),
    ] {
        let e = run(&[flag, v]).unwrap_err();
        assert!(e.to_string().contains(flag), "{e}");
    }
}
