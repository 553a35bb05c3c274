//! Unit tests of `messaging`, beside it.

use super::*;
use std::time::{Duration, Instant};

fn c(s: &str) -> ClientRef {
    ClientRef::parse(s).unwrap()
}

#[test]
fn client_refs() {
    assert_eq!(
        c("ab12.7"),
        ClientRef {
            instance: "ab12".into(),
            id: 7
        }
    );
    assert_eq!(c("a_B-9.42").to_string(), "a_B-9.42");
    for bad in [
        "",
        "7",
        ".7",
        "ab.",
        "ab.x",
        "ab.-1",
        "a.b.1",
        "a b.1",
        "ab.99999999999999999999",
    ] {
        assert_eq!(ClientRef::parse(bad), None, "{bad}");
    }
}

#[test]
fn text_requests_round_trip() {
    let reqs = [
        Request {
            id: Some(1),
            op: Op::Broadcast {
                payload: Payload::Text("hi".into()),
                filter: Filter::All,
                except: Some(c("i1.3")),
            },
        },
        Request {
            id: None,
            op: Op::Broadcast {
                payload: Payload::Text(String::new()),
                filter: Filter::Tag("zone".into(), "a=b".into()),
                except: None,
            },
        },
        Request {
            id: Some(2),
            op: Op::Broadcast {
                payload: Payload::Text("x".into()),
                filter: Filter::Backend("api-1".into()),
                except: None,
            },
        },
        Request {
            id: Some(3),
            op: Op::Send {
                to: vec![c("i1.3"), c("i2.4")],
                payload: Payload::Text("yo".into()),
            },
        },
        Request {
            id: Some(4),
            op: Op::Close {
                client: c("i1.3"),
                code: 4000,
                reason: "bye".into(),
            },
        },
        Request {
            id: Some(5),
            op: Op::Ping { client: c("i1.3") },
        },
    ];
    for r in reqs {
        let text = encode_text(&r);
        assert_eq!(decode_text(&text, 1024), Ok(Incoming::Request(r)), "{text}");
    }
    // `to` may be a single id.
    let one = decode_text(r#"{"type":"send","to":"i.1","text":"a"}"#, 10).unwrap();
    assert!(
        matches!(one, Incoming::Request(Request { op: Op::Send { to, .. }, .. }) if to.len() == 1)
    );
    // v1 messages still decode as before.
    assert_eq!(
        decode_text(r#"{"type":"drain"}"#, 10),
        Ok(Incoming::Control(BackendMsg::Drain))
    );
}

#[test]
fn binary_requests_round_trip_and_split_anywhere() {
    let r = Request {
        id: Some(9),
        op: Op::Send {
            to: vec![c("x.1")],
            payload: Payload::Binary(vec![0, 1, 2, 255]),
        },
    };
    let frame = encode_binary(&r).unwrap();
    assert_eq!(decode_binary(&frame, 4), Ok(r.clone()));
    assert_eq!(
        decode_binary(&frame, 3),
        Err(Refusal::Failed(Some(9), MsgError::TooLarge(3)))
    );
    // Every truncation is a clean refusal, never a panic or a different request.
    for cut in 0..frame.len() {
        assert!(decode_binary(&frame[..cut], 4) != Ok(r.clone()));
    }
    assert!(encode_binary(&Request {
        id: None,
        op: Op::Ping { client: c("x.1") }
    })
    .is_none());
}

#[test]
fn refusals_name_their_cause_and_keep_the_id() {
    let failed: &[(&str, &str)] = &[
        (r#"{"type":"broadcast","id":1}"#, "bad_field"),
        (r#"{"type":"broadcast","id":1,"text":5}"#, "bad_field"),
        (
            r#"{"type":"broadcast","id":1,"text":"a","tag":"x"}"#,
            "bad_field",
        ),
        (
            r#"{"type":"broadcast","id":1,"text":"a","tag":"k=v","backend":"g"}"#,
            "bad_field",
        ),
        (
            r#"{"type":"broadcast","id":1,"text":"a","except":"nope"}"#,
            "bad_field",
        ),
        (
            r#"{"type":"broadcast","id":1,"text":"abcdefghijk"}"#,
            "too_large",
        ),
        (r#"{"type":"send","id":1,"text":"a","to":[]}"#, "bad_field"),
        (r#"{"type":"send","id":1,"text":"a","to":7}"#, "bad_field"),
        (
            r#"{"type":"close","id":1,"client":"i.1","code":1005}"#,
            "bad_field",
        ),
        (
            r#"{"type":"close","id":1,"client":"i.1","code":70000}"#,
            "bad_field",
        ),
        (r#"{"type":"ping","id":1}"#, "bad_field"),
    ];
    for (text, code) in failed {
        match decode_text(text, 10) {
            Err(Refusal::Failed(Some(1), e)) => assert_eq!(e.code(), *code, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let long = format!(
        r#"{{"type":"close","id":1,"client":"i.1","reason":"{}"}}"#,
        "r".repeat(124)
    );
    assert!(matches!(
        decode_text(&long, 10),
        Err(Refusal::Failed(Some(1), _))
    ));
    assert!(matches!(
        decode_text(r#"{"type":"ping","id":-1,"client":"i.1"}"#, 10),
        Err(Refusal::Failed(None, MsgError::BadField(_)))
    ));
    // v1 rules stand for everything else.
    assert_eq!(
        decode_text("nope", 10),
        Err(Refusal::Fatal(ControlError::BadJson))
    );
    assert_eq!(
        decode_text(r#"{"type":"hello"}"#, 10),
        Err(Refusal::Fatal(ControlError::UnknownType))
    );
    for frame in [
        &b""[..],
        b"\x00",
        b"\x00\x05{}",
        b"\x00\x02[]",
        b"\x00\x0f{\"type\":\"ping\"}",
    ] {
        assert!(
            matches!(decode_binary(frame, 10), Err(Refusal::Failed(..))),
            "{frame:?}"
        );
    }
}

#[test]
fn answers() {
    assert_eq!(
        parse_answer(&sent(Some(3), 600)),
        Some(Answer::Sent {
            id: Some(3),
            count: 600
        })
    );
    let Some(Answer::Failed { id, code, message }) =
        parse_answer(&failed(None, &MsgError::UnknownClient))
    else {
        panic!()
    };
    assert_eq!((id, code.as_str()), (None, "unknown_client"));
    assert!(message.contains("no such"));
    assert_eq!(parse_answer(r#"{"type":"registered"}"#), None);
}

#[test]
fn rate_bucket() {
    let t0 = Instant::now();
    let mut b = RateBucket::new(3, t0);
    assert!((0..3).all(|_| b.take(3, t0)));
    assert!(!b.take(3, t0));
    assert!(b.take(3, t0 + Duration::from_millis(400)));
    assert!(!b.take(3, t0 + Duration::from_millis(400)));
    assert!((0..100).all(|_| b.take(0, t0)));
}
