//! Command line: help, version, and exit code 2 with a one-line diagnostic for bad input.

mod common;

use common::run_wslb;

/// Asserts exit code 2 and a single stderr line naming `flag`.
fn rejects(args: &[&str], flag: &str) {
    let (status, _, err) = run_wslb(args);
    assert_eq!(
        status.code(),
        Some(2),
        "wslb {args:?}: {status}, stderr {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "wslb {args:?}: stderr {err:?}");
    assert!(
        lines[0].contains(flag),
        "wslb {args:?}: {:?} does not name {flag}",
        lines[0]
    );
}

#[test]
fn help_lists_flags_and_exits_0() {
    let (status, out, err) = run_wslb(&["--help"]);
    assert!(status.success(), "{status}, stderr {err:?}");
    for flag in ["--listen", "--backend", "--algorithm", "--drain-timeout"] {
        assert!(out.contains(flag), "--help does not mention {flag}:\n{out}");
    }
}

#[test]
fn version_is_printed() {
    let (status, out, err) = run_wslb(&["-V"]);
    assert!(status.success(), "{status}, stderr {err:?}");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "-V printed {out:?}"
    );
}

#[test]
fn unknown_algorithm_is_rejected() {
    rejects(&["-l", "127.0.0.1:0", "--algorithm", "nope"], "--algorithm");
}

#[test]
fn bad_duration_is_rejected() {
    rejects(
        &["-l", "127.0.0.1:0", "--header-timeout", "10x"],
        "--header-timeout",
    );
}

#[test]
fn non_websocket_backend_url_is_rejected() {
    rejects(&["-l", "127.0.0.1:0", "--backend", "ftp://x"], "--backend");
}

#[test]
fn unknown_flag_is_rejected() {
    // getopts spells it `'bogus'`: look for the name, not the dashes.
    rejects(&["-l", "127.0.0.1:0", "--bogus"], "bogus");
}

/// `--check` validates and exits without listening: the ports stay free, a bad certificate
/// or token file is one line and exit 2 (for systemd's `ExecStartPre`).
#[test]
fn check_validates_without_listening() {
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let (status, out, err) = run_wslb(&["--check", "-l", &listen, "-B", "ws://127.0.0.1:9"]);
    assert!(status.success(), "{status}, stderr {err:?}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        std::net::TcpListener::bind(&listen).is_ok(),
        "--check left something listening on {listen}"
    );
    rejects(
        &[
            "--check",
            "--tls-listen",
            "127.0.0.1:0",
            "--cert",
            "/nonexistent/cert.pem",
            "--key",
            "/nonexistent/key.pem",
        ],
        "/nonexistent/cert.pem",
    );
    rejects(
        &["--check", "--token-file", "/nonexistent/tokens"],
        "--token-file",
    );
    // A static backend that is wslb itself is caught too.
    rejects(
        &["--check", "-l", &listen, "-B", &format!("ws://{listen}")],
        "--backend",
    );
}
