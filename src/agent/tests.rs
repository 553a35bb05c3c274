//! Unit tests of the agent, beside it.

use super::*;

#[test]
fn balancer_urls() {
    let t = parse_balancer("ws://127.0.0.1:9090/register").unwrap();
    assert_eq!(
        (t.url.as_str(), t.host.as_str(), t.port),
        ("ws://127.0.0.1:9090/register", "127.0.0.1", 9090)
    );
    let t = parse_balancer("ws://lb.example:9090").unwrap();
    assert_eq!(t.url, "ws://lb.example:9090/register");
    let t = parse_balancer("ws://[::1]:9/x").unwrap();
    assert_eq!((t.host.as_str(), t.url.as_str()), ("::1", "ws://[::1]:9/x"));
    assert_eq!(parse_balancer("ws://h/register").unwrap().port, 80);
    let t = parse_balancer("wss://h/register").unwrap();
    assert!(
        t.tls && t.port == 443 && t.url == "wss://h:443/register" || t.url == "wss://h/register"
    );
    for bad in [
        "http://h:1/",
        "h:1",
        "ws://:1/",
        "ws://u:p@h:1/",
        "ws://h:0/",
        "",
    ] {
        assert!(parse_balancer(bad).is_err(), "{bad}");
    }
}

#[test]
fn config_checks_name_the_field() {
    let ok = AgentConfig::new("ws://127.0.0.1:1/register", "ws://127.0.0.1:2");
    assert_eq!(validate(&ok), Ok(()));
    assert_eq!(ok.guid.len(), 16);
    type Check = fn(&AgentError) -> bool;
    let cases: Vec<(AgentConfig, Check)> = vec![
        (
            AgentConfig {
                balancers: vec![],
                ..ok.clone()
            },
            |e| *e == AgentError::NoBalancer,
        ),
        (
            AgentConfig {
                bindings: vec![],
                ..ok.clone()
            },
            |e| *e == AgentError::BindingCount,
        ),
        (
            AgentConfig {
                bindings: vec!["ws://example.com:1".into()],
                ..ok.clone()
            },
            |e| matches!(e, AgentError::Binding { .. }),
        ),
        (
            AgentConfig {
                guid: "a b".into(),
                ..ok.clone()
            },
            |e| *e == AgentError::Guid,
        ),
        (
            AgentConfig {
                weight: 0,
                ..ok.clone()
            },
            |e| *e == AgentError::Weight,
        ),
        (
            AgentConfig {
                token: Some("x\ny".into()),
                ..ok.clone()
            },
            |e| *e == AgentError::Token,
        ),
        (
            AgentConfig {
                heartbeat: Duration::ZERO,
                ..ok.clone()
            },
            |e| matches!(e, AgentError::Timing(_)),
        ),
        (
            AgentConfig {
                backoff_min: Duration::from_secs(20),
                ..ok.clone()
            },
            |e| matches!(e, AgentError::Timing(_)),
        ),
    ];
    for (cfg, check) in cases {
        let e = validate(&cfg).unwrap_err();
        assert!(check(&e), "{e:?}");
    }
}

#[test]
fn balancer_messages() {
    assert_eq!(
        parse_balancer_msg(&protocol::registered("g", 5000)),
        Some(BalancerMsg::Registered)
    );
    assert_eq!(
        parse_balancer_msg(&protocol::ack("drained")),
        Some(BalancerMsg::Drained { clients: None })
    );
    assert_eq!(
        parse_balancer_msg(&protocol::drained(3)),
        Some(BalancerMsg::Drained { clients: Some(3) })
    );
    assert_eq!(
        parse_balancer_msg(&protocol::drain_complete(7)),
        Some(BalancerMsg::DrainComplete)
    );
    assert_eq!(
        parse_balancer_msg(&protocol::error(&protocol::ControlError::Replaced)),
        Some(BalancerMsg::Error {
            code: "replaced".into(),
            message: protocol::ControlError::Replaced.to_string()
        })
    );
    assert_eq!(
        parse_balancer_msg(&protocol::unreachable("ws://127.0.0.1:1")),
        Some(BalancerMsg::Unreachable {
            binding: "ws://127.0.0.1:1".into(),
            reason: "unreachable".into()
        })
    );
    assert_eq!(
        parse_balancer_msg(r#"{"type":"future"}"#),
        Some(BalancerMsg::Other)
    );
    assert_eq!(parse_balancer_msg("nope"), None);
    assert_eq!(parse_balancer_msg("[]"), None);
}

#[test]
fn backoff_doubles_to_max_with_a_floor() {
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
    let mut c = min;
    let mut seen = vec![];
    for _ in 0..10 {
        seen.push(c.as_millis());
        c = next_ceiling(c, max);
    }
    assert_eq!(
        seen,
        [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
    );
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..1000 {
        let d = jittered(&mut rng, min, Duration::from_millis(800));
        assert!((min..=Duration::from_millis(800)).contains(&d), "{d:?}");
    }
    assert_eq!(jittered(&mut rng, min, min), min);
}
