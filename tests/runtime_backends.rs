//! Backends changed at run time: the admin API (driven with curl) adds, changes, drains,
//! undrains and removes static backends, refuses bad input without changing anything, and
//! `--backends-file` is re-read on SIGHUP.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "rt-s3cret";

/// `curl -X METHOD` against the admin API with the token; (status, JSON body).
fn curl(
    control: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-X", method, "-w", "\n%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd
        .arg(format!("http://{control}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, status) = text.rsplit_once('\n').expect("status line");
    (
        status.trim().parse().expect("status"),
        serde_json::from_str(json).unwrap_or(Value::Null),
    )
}

fn backends(control: std::net::SocketAddr) -> Vec<Value> {
    let (status, v) = curl(control, "GET", "/api/backends", None);
    assert_eq!(status, 200);
    v.as_array().cloned().unwrap_or_default()
}

fn row<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter()
        .find(|b| b["name"] == name && b["state"] != "gone")
}

/// Names answering `n` fresh WebSocket connections.
fn who_answers(lb: &Balancer, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let mut ws = ws_connect(lb.addr(), "/");
            let name = whoami(&mut ws);
            ws_close(ws);
            name
        })
        .collect()
}

#[test]
fn admin_api_changes_static_backends_and_refuses_bad_input() {
    let a = Backend::start("flag-a");
    let b = Backend::start("api-b");
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "--token", TOKEN], &[&a]);
    let control = lb.control_addr();
    assert_eq!(row(&backends(control), &a.url()).unwrap()["source"], "flag");

    // Add B through the API: it takes clients at once.
    let body = format!(
        r#"{{"url":"{}","weight":2,"max_connections":100}}"#,
        b.url()
    );
    let (status, added) = curl(control, "POST", "/api/backends", Some(&body));
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["source"], "api");
    assert_eq!(added["weight"], 2);
    assert_eq!(added["max_connections"], 100);
    assert!(wait_until(TIMEOUT, || who_answers(&lb, 6)
        .contains(&"api-b".to_string())));

    // Bad input: 400 or 404 with a JSON error, and nothing changes.
    let before = backends(control);
    let b_path = format!(
        "/api/backends/{}",
        b.url().replace(':', "%3A").replace('/', "%2F")
    );
    let bad: Vec<(&str, String, Option<String>, u16)> = vec![
        (
            "POST",
            "/api/backends".into(),
            Some(r#"{"url":"ftp://x:1"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/backends".into(),
            Some(r#"{"url":"ws://127.0.0.1"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/backends".into(),
            Some(format!(r#"{{"url":"{}","weight":0}}"#, b.url())),
            400,
        ),
        (
            "POST",
            "/api/backends".into(),
            Some(format!(r#"{{"url":"{}"}}"#, b.url())),
            400,
        ),
        (
            "POST",
            "/api/backends".into(),
            Some(format!(r#"{{"url":"ws://{}"}}"#, lb.addr())),
            400,
        ),
        ("POST", "/api/backends".into(), Some("{".into()), 400),
        ("PATCH", b_path.clone(), Some(r#"{"weight":0}"#.into()), 400),
        (
            "PATCH",
            "/api/backends/ws%3A%2F%2F127.0.0.1%3A1".into(),
            Some(r#"{"weight":3}"#.into()),
            404,
        ),
        ("DELETE", "/api/backends/nobody".into(), None, 404),
        ("POST", "/api/backends/nobody/drain".into(), None, 404),
    ];
    for (method, path, body, want) in &bad {
        let (status, v) = curl(control, method, path, body.as_deref());
        assert_eq!(status, *want, "{method} {path} {body:?}: {v}");
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }
    assert_eq!(
        backends(control),
        before,
        "refused requests changed something"
    );

    // Change B's weight; drain A (no new clients), undrain it, then remove it.
    let (status, v) = curl(control, "PATCH", &b_path, Some(r#"{"weight":7}"#));
    assert_eq!((status, v["weight"].as_u64()), (200, Some(7)));
    let a_path = format!(
        "/api/backends/{}",
        a.url().replace(':', "%3A").replace('/', "%2F")
    );
    assert_eq!(
        curl(control, "POST", &format!("{a_path}/drain"), None).0,
        200
    );
    assert!(who_answers(&lb, 8).iter().all(|n| n == "api-b"));
    assert_eq!(
        curl(control, "POST", &format!("{a_path}/undrain"), None).0,
        200
    );
    assert_eq!(row(&backends(control), &a.url()).unwrap()["state"], "ready");
    let (status, v) = curl(control, "DELETE", &a_path, None);
    assert_eq!(status, 200, "{v}");
    assert!(row(&backends(control), &a.url()).is_none());
    assert!(who_answers(&lb, 8).iter().all(|n| n == "api-b"));
    // A removed backend may come back.
    let body = format!(r#"{{"url":"{}"}}"#, a.url());
    assert_eq!(curl(control, "POST", "/api/backends", Some(&body)).0, 201);

    // Without the token nothing changes.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
        ])
        .arg(format!("http://{control}{b_path}"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    assert!(row(&backends(control), &b.url()).is_some());
    assert!(lb.wait_log("backend added", TIMEOUT) && lb.wait_log("backend removed", TIMEOUT));
}

#[test]
fn backends_file_is_read_at_start_and_again_on_sighup() {
    let c = Backend::start("file-c");
    let d = Backend::start("file-d");
    let dir = std::env::temp_dir().join(format!("wslb-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("backends");
    std::fs::write(&file, format!("# the pool\n{}\n", c.url())).expect("write");
    let file_arg = file.to_string_lossy().into_owned();
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--backends-file",
            &file_arg,
        ],
        &[],
    );
    let control = lb.control_addr();
    assert_eq!(row(&backends(control), &c.url()).unwrap()["source"], "file");
    assert!(who_answers(&lb, 4).iter().all(|n| n == "file-c"));

    // A bad file changes nothing.
    std::fs::write(&file, "ws://127.0.0.1:1,weight=zero\n").expect("write");
    let hup = |lb: &Balancer| {
        let ok = Command::new("kill")
            .args(["-HUP", &lb.pid().to_string()])
            .status();
        assert!(ok.expect("kill").success());
    };
    hup(&lb);
    assert!(lb.wait_log("backends file reload failed", TIMEOUT));
    assert!(row(&backends(control), &c.url()).is_some());

    // C out, D in with a weight.
    std::fs::write(&file, format!("{},weight=4\n", d.url())).expect("write");
    hup(&lb);
    assert!(lb.wait_log("SIGHUP: backends file reloaded", TIMEOUT));
    let list = backends(control);
    assert!(row(&list, &c.url()).is_none(), "{list:?}");
    assert_eq!(row(&list, &d.url()).unwrap()["weight"], 4);
    assert!(wait_until(Duration::from_secs(5), || who_answers(&lb, 4)
        .iter()
        .all(|n| n == "file-d")));
    let _ = std::fs::remove_dir_all(&dir);

    // A bad file at start is a one-line error and exit code 2.
    let (status, _, err) = run_wslb(&["--backends-file", "/nonexistent/backends"]);
    assert_eq!(status.code(), Some(2));
    assert!(
        err.contains("--backends-file /nonexistent/backends"),
        "{err}"
    );
}
