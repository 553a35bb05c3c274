//! Fuzz target `sticky_cookie`: `wslb::sticky` cookie lookup and verification never panic,
//! issued cookies round-trip, tampered ones never verify, and rendezvous picks are stable.
//!
//! The property function below is self-contained (only `wslb`), written in the shape of
//! `fuzz/props/mod.rs` so it can move there verbatim and join `props::TARGETS` (and with it
//! the stable corpus replay in `tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sticky_cookie(data));

use wslb::sticky::{
    find_cookie, parse_mode, rendezvous_pick, set_cookie_value, static_backend_id, valid_id,
    CookieSigner, StickyMode, Verified, MAX_CLOCK_SKEW_SECS, MAX_ID_LEN,
};

/// The secret the committed seeds were signed with, and the clock they were signed against.
const STICKY_SECRET: &[u8] = b"wslb fuzz sticky secret";
const STICKY_NOW: u64 = 1_700_000_000;
const STICKY_MAX_AGE: u64 = 86_400;

fn sticky_fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `part` lies inside `whole` (the lookup borrows, never copies).
fn sticky_within(whole: &[u8], part: &[u8]) -> bool {
    let w = whole.as_ptr_range();
    let p = part.as_ptr_range();
    w.start <= p.start && p.end <= w.end
}

/// A value that verifies is canonical: re-issuing its id at its time gives the same bytes,
/// and it verifies only inside its time window.
fn sticky_check_value(signer: &CookieSigner, value: &[u8]) {
    let at = |now, max_age| signer.verify(value, now, max_age);
    let _ = (
        at(0, 0),
        at(u64::MAX, 0),
        at(0, u64::MAX),
        at(u64::MAX, u64::MAX),
    );
    if let Some(Verified { id, issued_secs }) = at(STICKY_NOW, STICKY_MAX_AGE) {
        assert!(valid_id(id));
        let again = signer.issue(id, issued_secs);
        assert_eq!(again.as_deref().map(str::as_bytes), Some(value));
        assert!(issued_secs <= STICKY_NOW + MAX_CLOCK_SKEW_SECS);
        assert!(STICKY_NOW.saturating_sub(issued_secs) <= STICKY_MAX_AGE);
        assert!(at(issued_secs, 0).is_some());
        assert!(at(
            issued_secs.saturating_add(STICKY_MAX_AGE) + 1,
            STICKY_MAX_AGE
        )
        .is_none());
        assert!(CookieSigner::new(b"another secret")
            .verify(value, STICKY_NOW, u64::MAX)
            .is_none());
    }
}

pub fn sticky_cookie(data: &[u8]) {
    let signer = CookieSigner::new(STICKY_SECRET);
    let h = sticky_fnv(data);

    // The input as one Cookie header line, and as a bare cookie value.
    for name in ["wslb", "sid", "a", "x-y"] {
        if let Some(v) = find_cookie(data, name) {
            assert!(sticky_within(data, v));
            assert!(!v.contains(&b';'));
            sticky_check_value(&signer, v);
        }
    }
    assert_eq!(find_cookie(data, ""), None);
    sticky_check_value(&signer, data);

    // An id derived from the input: issue → Set-Cookie → Cookie lookup → verify round-trips;
    // any single-byte change does not verify.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:";
    let id: String = data
        .iter()
        .take(MAX_ID_LEN)
        .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
        .collect();
    let ts = h >> (h % 64);
    match signer.issue(&id, ts) {
        None => assert!(id.is_empty()),
        Some(value) => {
            assert!(valid_id(&id));
            let verified = signer.verify(value.as_bytes(), ts, 0);
            assert_eq!(
                verified,
                Some(Verified {
                    id: &id,
                    issued_secs: ts
                })
            );
            let set = set_cookie_value("wslb", &value, h & 1 == 1, STICKY_MAX_AGE);
            let header = format!("pre=1; {set}");
            assert_eq!(
                find_cookie(header.as_bytes(), "wslb"),
                Some(value.as_bytes())
            );
            let mut tampered = value.clone().into_bytes();
            let at = (h as usize) % tampered.len();
            tampered[at] ^= 1 << (h % 7);
            assert_eq!(signer.verify(&tampered, ts, u64::MAX), None);
            tampered.truncate(at);
            assert_eq!(signer.verify(&tampered, ts, u64::MAX), None);
        }
    }

    // The flag value: a parsed name is one the header/cookie code can match.
    if let Ok(s) = std::str::from_utf8(data) {
        match parse_mode(s) {
            Ok(StickyMode::Cookie { name } | StickyMode::Header { name }) => {
                assert!((1..=64).contains(&name.len()));
                assert!(!name.bytes().any(|b| b"=; :\"\t,".contains(&b)));
            }
            Ok(StickyMode::Ip) => assert_eq!(s, "ip"),
            Err(why) => assert!(!why.is_empty()),
        }
    }

    // Rendezvous on the input as a key: in range, deterministic, and removing a candidate
    // that was not chosen keeps the choice.
    let urls = [
        "ws://10.0.0.1:80",
        "ws://10.0.0.2:80",
        "ws://10.0.0.3:80",
        "ws://10.0.0.4:80",
    ];
    let ids: Vec<String> = urls.iter().map(|u| static_backend_id(u)).collect();
    let weights = [1 + (h & 3) as u32, 1, 2, ((h >> 8) & 1) as u32];
    let cands: Vec<(&str, u32)> = ids.iter().map(String::as_str).zip(weights).collect();
    let Some(best) = rendezvous_pick(data, cands.iter().copied()) else {
        panic!("some candidate has a non-zero weight");
    };
    assert!(best < cands.len() && cands[best].1 > 0);
    assert_eq!(rendezvous_pick(data, cands.iter().copied()), Some(best));
    let drop = (h as usize >> 16) % cands.len();
    if drop != best {
        let rest = cands.iter().enumerate().filter(|&(i, _)| i != drop);
        let pick = rendezvous_pick(data, rest.clone().map(|(_, c)| *c));
        let original = pick.and_then(|p| rest.map(|(i, _)| i).nth(p));
        assert_eq!(original, Some(best));
    }
}
