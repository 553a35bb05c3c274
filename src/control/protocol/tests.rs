//! Unit tests of `protocol`, beside it.

use super::*;

const GOOD: &str = r#"{"type":"register","version":1,"guid":"api-1","bindings":["ws://127.0.0.1:9001","http://localhost:9002"],"weight":3,"max_connections":100,"tags":{"zone":"a"}}"#;

#[test]
fn register_round_trip() {
    let BackendMsg::Register(r) = decode(GOOD).unwrap() else {
        panic!()
    };
    assert_eq!(r.guid, "api-1");
    assert_eq!(
        r.addrs,
        [
            "127.0.0.1:9001".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap()
        ]
    );
    assert_eq!((r.weight, r.max_connections), (3, 100));
    assert_eq!(r.tags.get("zone").map(String::as_str), Some("a"));
    assert_eq!(r.proxy_protocol, None);
    assert!(!encode(&BackendMsg::Register(r.clone())).contains("proxy_protocol"));
    let again = decode(&encode(&BackendMsg::Register(r.clone()))).unwrap();
    assert_eq!(again, BackendMsg::Register(r));
    assert_eq!(decode(r#"{"type":"drain"}"#), Ok(BackendMsg::Drain));
}

#[test]
fn proxy_protocol_field() {
    use crate::net::proxy_protocol::Version;
    let with = |v: &str| {
        GOOD.replace(
            r#""weight":3"#,
            &format!(r#""proxy_protocol":{v},"weight":3"#),
        )
    };
    let Ok(BackendMsg::Register(r)) = decode(&with(r#""v2""#)) else {
        panic!()
    };
    assert_eq!(r.proxy_protocol, Some(Version::V2));
    let again = decode(&encode(&BackendMsg::Register(r.clone()))).unwrap();
    assert_eq!(again, BackendMsg::Register(r));
    for bad in [r#""v3""#, "2", r#""V1""#] {
        assert!(
            matches!(decode(&with(bad)), Err(ControlError::BadField(f)) if f.contains("proxy_protocol")),
            "{bad}"
        );
    }
    assert_eq!(
        decode(&encode(&BackendMsg::Deregister)),
        Ok(BackendMsg::Deregister)
    );
}

#[test]
fn defaults() {
    let BackendMsg::Register(r) =
        decode(r#"{"type":"register","version":1,"guid":"g","bindings":["ws://[::1]:80"]}"#)
            .unwrap()
    else {
        panic!()
    };
    assert_eq!((r.weight, r.max_connections, r.tags.len()), (1, 0, 0));
}

#[test]
fn refusals_name_their_cause() {
    let cases: &[(&str, &str)] = &[
        ("not json", "bad_json"),
        ("[1,2]", "bad_json"),
        (r#"{"type":"hello"}"#, "unknown_type"),
        (r#"{"version":1}"#, "unknown_type"),
        (
            r#"{"type":"register","version":2,"guid":"g","bindings":["ws://127.0.0.1:1"]}"#,
            "bad_version",
        ),
        (
            r#"{"type":"register","guid":"g","bindings":["ws://127.0.0.1:1"]}"#,
            "bad_version",
        ),
        (
            r#"{"type":"register","version":1,"guid":"","bindings":["ws://127.0.0.1:1"]}"#,
            "bad_field",
        ),
        (
            r#"{"type":"register","version":1,"guid":"a b","bindings":["ws://127.0.0.1:1"]}"#,
            "bad_field",
        ),
        (
            r#"{"type":"register","version":1,"guid":"g","bindings":[]}"#,
            "bad_field",
        ),
        (
            r#"{"type":"register","version":1,"guid":"g","bindings":["ftp://127.0.0.1:1"]}"#,
            "bad_field",
        ),
        (
            r#"{"type":"register","version":1,"guid":"g","bindings":["ws://example.com:80"]}"#,
            "bad_field",
        ),
        (
            r#"{"type":"register","version":1,"guid":"g","bindings":["ws://127.0.0.1:1"],"weight":0}"#,
            "bad_field",
        ),
        (
            r#"{"type":"register","version":1,"guid":"g","bindings":["ws://127.0.0.1:1"],"tags":{"a":1}}"#,
            "bad_field",
        ),
    ];
    for (text, code) in cases {
        assert_eq!(decode(text).unwrap_err().code(), *code, "{text}");
    }
    let big = format!(r#"{{"type":"drain","pad":"{}"}}"#, "x".repeat(MAX_MESSAGE));
    assert_eq!(decode(&big), Err(ControlError::TooLarge));
    assert_eq!(ControlError::TooLarge.close_code(), 1009);
}

#[test]
fn answers_are_json() {
    let v: Value = serde_json::from_str(&registered("g", 5000)).unwrap();
    assert_eq!(v["type"], "registered");
    let v: Value = serde_json::from_str(&error(&ControlError::UnknownType)).unwrap();
    assert_eq!(v["code"], "unknown_type");
    assert!(v.get("rule").is_none());
    let refused = ControlError::BindingRefused {
        binding: "ws://127.0.0.1:8080".into(),
        rule: crate::netpolicy::BindingRule::OwnListener,
    };
    let v: Value = serde_json::from_str(&error(&refused)).unwrap();
    assert_eq!(
        (&v["code"], &v["rule"], &v["binding"]),
        (
            &json!("binding_refused"),
            &json!("own_listener"),
            &json!("ws://127.0.0.1:8080")
        )
    );
    assert!(v["message"].as_str().unwrap().contains("own listeners"));
    assert_eq!(refused.close_code(), 1008);
    for (e, code) in [
        (ControlError::GuidInUse, "guid_in_use"),
        (ControlError::GuidNotAllowed, "guid_not_allowed"),
    ] {
        assert_eq!((e.code(), e.close_code()), (code, 1008));
    }
    let v: Value = serde_json::from_str(&unreachable("ws://10.0.0.1:9")).unwrap();
    assert_eq!(v["reason"], "unreachable");
}

#[test]
fn dispatch_fields_public_bindings_and_load() {
    // Optional: a version-1 registration without it has none, and encodes without it.
    let BackendMsg::Register(r) = decode(GOOD).unwrap() else {
        panic!()
    };
    assert!(r.public_bindings.is_empty());
    assert!(!encode(&BackendMsg::Register(r)).contains("public_bindings"));
    let with = GOOD.replace(
        r#""weight":3"#,
        r#""weight":3,"public_bindings":["wss://ws1.example.com/","ws://10.0.0.5:80"]"#,
    );
    let Ok(BackendMsg::Register(r)) = decode(&with) else {
        panic!()
    };
    assert_eq!(r.public_bindings.len(), 2);
    let again = decode(&encode(&BackendMsg::Register(r.clone()))).unwrap();
    assert_eq!(again, BackendMsg::Register(r));
    for bad in [r#"["ftp://x"]"#, r#""ws://a""#, r#"[1]"#, r#"["ws://a b"]"#] {
        let msg = GOOD.replace(
            r#""weight":3"#,
            &format!(r#""weight":3,"public_bindings":{bad}"#),
        );
        assert!(
            matches!(decode(&msg), Err(ControlError::BadField(_))),
            "{bad}"
        );
    }
    assert_eq!(
        decode(r#"{"type":"load","clients":12}"#),
        Ok(BackendMsg::Load(12))
    );
    assert_eq!(
        decode(&encode(&BackendMsg::Load(7))),
        Ok(BackendMsg::Load(7))
    );
    for bad in [
        r#"{"type":"load"}"#,
        r#"{"type":"load","clients":-1}"#,
        r#"{"type":"load","clients":5000000000}"#,
    ] {
        assert!(
            matches!(decode(bad), Err(ControlError::BadField(_))),
            "{bad}"
        );
    }
}
