//! `--events FILE|-`: one JSON object per line for each moment of a connection's and a
//! backend's life, for operators and log pipelines. Disabled = one branch per event.

use std::fs::OpenOptions;
use std::io::{self, LineWriter, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Where events go.
#[derive(Default)]
pub struct EventSink {
    out: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.out.is_some() {
            "EventSink(on)"
        } else {
            "EventSink(off)"
        })
    }
}

impl EventSink {
    /// `-` = stdout, otherwise a file opened for appending; `None` = off.
    pub fn open(spec: Option<&str>) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match spec {
            None => None,
            Some("-") => Some(Box::new(LineWriter::new(io::stdout()))),
            Some(path) => Some(Box::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            ))),
        };
        Ok(EventSink { out })
    }

    /// Events are wanted (lets callers skip building fields).
    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    /// Writes `{"ts":…, "event": name, …fields}`. A failing sink is dropped, not retried on
    /// every event: losing the event log must not slow the balancer down.
    pub fn emit(&mut self, event: &str, fields: &[(&str, Value)]) {
        let Some(out) = &mut self.out else { return };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut m = Map::with_capacity(fields.len() + 2);
        m.insert("ts".into(), Value::from((ts * 1000.0).round() / 1000.0));
        m.insert("event".into(), Value::from(event));
        for (k, v) in fields {
            m.insert((*k).to_string(), v.clone());
        }
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        if out.write_all(line.as_bytes()).is_err() {
            crate::observe::log::error("events sink failed; events are off from now on", &[]);
            self.out = None;
        }
    }
}
