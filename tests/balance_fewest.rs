//! Backend selection: fewest active connections, round-robin, random and weights.

mod common;

use std::collections::BTreeMap;

use common::*;

/// `X-Backend` of `n` requests, each on its own connection.
fn backends_of(lb: &Balancer, n: usize) -> Vec<String> {
    let name = |_| {
        get(lb.addr(), "/")
            .header("x-backend")
            .expect("X-Backend")
            .to_string()
    };
    (0..n).map(name).collect()
}

fn counts(names: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.as_str()).or_default() += 1;
    }
    counts
}

#[test]
fn fewest_splits_long_lived_websockets_evenly() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&["-a", "fewest"], &[&a, &b]);
    let mut held = Vec::new();
    let mut names = Vec::new();
    for _ in 0..10 {
        let mut ws = ws_connect(lb.addr(), "/");
        names.push(whoami(&mut ws));
        held.push(ws);
    }
    assert_eq!(
        counts(&names),
        BTreeMap::from([("a", 5), ("b", 5)]),
        "{names:?}"
    );
}

#[test]
fn fewest_sends_new_connections_to_the_less_loaded_backend() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&["-a", "fewest"], &[&a, &b]);
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let mut ws = ws_connect(lb.addr(), "/");
        match whoami(&mut ws).as_str() {
            "a" => on_a.push(ws),
            _ => on_b.push(ws),
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (4, 4));
    // Leave a 4 / b 1. ws_close waits for the balancer to close its side of each tunnel.
    for ws in on_b.drain(..3) {
        ws_close(ws);
    }
    let next: Vec<String> = (0..3)
        .map(|_| {
            let mut ws = ws_connect(lb.addr(), "/");
            let name = whoami(&mut ws);
            on_b.push(ws);
            name
        })
        .collect();
    assert_eq!(next, ["b", "b", "b"]);
}

#[test]
fn round_robin_alternates() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&["-a", "round-robin"], &[&a, &b]);
    let names = backends_of(&lb, 6);
    assert!(names.windows(2).all(|w| w[0] != w[1]), "{names:?}");
    assert_eq!(counts(&names), BTreeMap::from([("a", 3), ("b", 3)]));
}

#[test]
fn random_uses_both_backends() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&["-a", "random"], &[&a, &b]);
    let names = backends_of(&lb, 200);
    let counts = counts(&names);
    // Binomial(200, 1/2): below 50 is > 7 standard deviations out.
    assert!(counts.get("a").is_some_and(|&n| n >= 50), "{counts:?}");
    assert!(counts.get("b").is_some_and(|&n| n >= 50), "{counts:?}");
}

#[test]
fn round_robin_honours_weights() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let heavy = format!("{},weight=3", a.url());
    let lb = Balancer::start(&["-a", "round-robin", "-B", &heavy, "-B", &b.url()], &[]);
    let names = backends_of(&lb, 40);
    let counts = counts(&names);
    let (on_a, on_b) = (
        counts.get("a").copied().unwrap_or(0),
        counts.get("b").copied().unwrap_or(0),
    );
    assert!((28..=32).contains(&on_a) && on_a + on_b == 40, "{counts:?}");
}
