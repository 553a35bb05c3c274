//! Dispatch-mode flag values (issue 18): public bindings of backends and the dispatch path.
//! Pure checks, shared by `-B ...,public=URL`, the registration field `public_bindings`
//! and `wslb agent --public-binding`.

/// Longest public URL accepted: it is echoed into JSON and a `Location` header.
pub const MAX_PUBLIC_URL: usize = 512;
/// Most public bindings one backend may announce.
pub const MAX_PUBLIC_BINDINGS: usize = 16;

/// Checks a public binding: a `ws://`, `wss://`, `http://` or `https://` URL with a host
/// (any host name: clients resolve it, not the balancer), of printable ASCII without
/// spaces, quotes, `<>`, `\` or a fragment, so it can go into JSON, a header and a query
/// string as it is.
pub fn check_public_url(url: &str) -> Result<(), &'static str> {
    if url.is_empty() || url.len() > MAX_PUBLIC_URL {
        return Err("public URL must be 1-512 characters");
    }
    let rest = ["ws://", "wss://", "http://", "https://"]
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .ok_or("public URL must start with ws://, wss://, http:// or https://")?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err("public URL needs a host");
    }
    let clean = url
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"'<>\\#`{}|^".contains(&b));
    if !clean {
        return Err("public URL has a character that is not allowed (space, quote, <>, \\, #)");
    }
    Ok(())
}

/// Checks `--dispatch-path`: starts with `/`, no query, printable ASCII.
pub fn check_dispatch_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') || path.len() > 256 {
        return Err("must start with / (at most 256 characters)");
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    {
        return Err("must be printable ASCII without ? or #");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls() {
        for ok in [
            "ws://127.0.0.1:9001",
            "wss://ws1.example.com/chat",
            "https://a.example:8443/x?y=1",
        ] {
            assert_eq!(check_public_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "ftp://x",
            "ws://",
            "ws://:80",
            "ws://a b",
            "ws://a\"b",
            "ws://a/#frag",
            "127.0.0.1:80",
        ] {
            assert!(check_public_url(bad).is_err(), "{bad}");
        }
        assert!(check_public_url(&format!("ws://{}", "a".repeat(600))).is_err());
    }

    #[test]
    fn backend_public_option() {
        let b = crate::config::parse_backend(
            "ws://127.0.0.1:1,public=wss://a.example/,weight=2,public=ws://b.example:80",
        )
        .unwrap();
        assert_eq!(b.public, ["wss://a.example/", "ws://b.example:80"]);
        assert_eq!(b.weight, 2);
        assert!(crate::config::parse_backend("ws://127.0.0.1:1,public=").is_err());
        assert!(crate::config::parse_backend("ws://127.0.0.1:1,public=ftp://x").is_err());
    }

    #[test]
    fn dispatch_paths() {
        assert_eq!(check_dispatch_path("/connect"), Ok(()));
        assert!(check_dispatch_path("connect").is_err());
        assert!(check_dispatch_path("/a?b").is_err());
        assert!(check_dispatch_path("/a b").is_err());
    }
}
