//! Log lines on stderr, text or JSON, filtered by verbosity. Set once at startup.

use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where log lines go and how they look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `LEVEL message key=value ...`
    Text,
    /// One JSON object per line.
    Json,
}

/// Importance of a line; shown when `verbosity >= level as u8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Always shown.
    Error = 0,
    /// Always shown: something is exposed or risky, though nothing failed.
    Warn = 3,
    /// Shown by default.
    Info = 1,
    /// Shown with `-v`.
    Debug = 2,
}

static VERBOSITY: AtomicU8 = AtomicU8::new(1);
static JSON: AtomicU8 = AtomicU8::new(0);

/// Applies `-q`/`-v` and `--log-format`.
pub fn init(verbosity: u8, format: LogFormat) {
    VERBOSITY.store(verbosity, Ordering::Relaxed);
    JSON.store(u8::from(format == LogFormat::Json), Ordering::Relaxed);
}

/// Would a line at `level` be written? Lets hot paths skip formatting.
pub fn enabled(level: Level) -> bool {
    let threshold = match level {
        Level::Error | Level::Warn => 0,
        Level::Info => 1,
        Level::Debug => 2,
    };
    threshold <= VERBOSITY.load(Ordering::Relaxed)
}

fn json_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Writes one line: a message plus `key=value` fields.
pub fn log(level: Level, msg: &str, fields: &[(&str, &dyn Display)]) {
    if !enabled(level) {
        return;
    }
    let lvl = match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
    };
    let mut line = String::with_capacity(128);
    if JSON.load(Ordering::Relaxed) == 1 {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let _ = write!(line, "{{\"ts\":{ts:.3},\"level\":\"{lvl}\",\"msg\":\"");
        json_escape(&mut line, msg);
        line.push('"');
        for (k, v) in fields {
            line.push_str(",\"");
            json_escape(&mut line, k);
            line.push_str("\":\"");
            json_escape(&mut line, &v.to_string());
            line.push('"');
        }
        line.push('}');
    } else {
        let _ = write!(line, "wslb: {lvl}: {msg}");
        for (k, v) in fields {
            let _ = write!(line, " {k}={v}");
        }
    }
    line.push('\n');
    // A full or closed stderr must never stop the balancer.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs at [`Level::Error`].
pub fn error(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Error, msg, fields);
}

/// Logs at [`Level::Warn`].
pub fn warn(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Warn, msg, fields);
}

/// Logs at [`Level::Info`].
pub fn info(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Info, msg, fields);
}

/// Logs at [`Level::Debug`].
pub fn debug(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Debug, msg, fields);
}

/// A condition that can repeat thousands of times a second (accept paused, a backend
/// unreachable, TLS handshakes failing): logged at most once per interval, the line
/// carrying how often it happened since the last one.
#[derive(Debug)]
pub struct Repeated {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl Repeated {
    /// At most one line per `interval`.
    pub const fn every(interval: std::time::Duration) -> Repeated {
        Repeated {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one occurrence; `Some(n)` when a line is due, `n` occurrences since the last.
    pub fn hit(&mut self, now: std::time::Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Seconds in the interval, for the line ("37 times in the last 10 s").
    pub fn interval_secs(&self) -> u64 {
        self.interval.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_conditions_log_once_per_interval_with_a_count() {
        let mut r = Repeated::every(std::time::Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_eq!(r.hit(t0), Some(1));
        let seen: Vec<_> = (1..=36)
            .map(|i| r.hit(t0 + std::time::Duration::from_millis(i * 100)))
            .collect();
        assert!(seen.iter().all(Option::is_none));
        assert_eq!(r.hit(t0 + std::time::Duration::from_secs(10)), Some(37));
        assert_eq!(r.hit(t0 + std::time::Duration::from_secs(11)), None);
    }

    #[test]
    fn escapes_json() {
        let mut s = String::new();
        json_escape(&mut s, "a\"b\\c\n\u{1}");
        assert_eq!(s, "a\\\"b\\\\c\\n\\u0001");
    }
}
