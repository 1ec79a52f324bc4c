//! A minimal QMP client: greeting, `qmp_capabilities`, then one command at a time; events that
//! arrive in between are kept with their host timestamps.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen so far: (name, host wall-clock time in microseconds since the epoch).
    events: Vec<(String, u64)>,
}

impl Qmp {
    /// Connect (retrying while QEMU starts up) and negotiate capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP connect {}: {e}", path.display()))
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP reply {line:?}: {e}"))
    }

    /// Run one command; returns its `return` value or the error QEMU gave.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let req = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{req}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read()?;
            if self.keep_event(&v) {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
        }
    }

    /// Records `v` if it is an event; says whether it was one.
    fn keep_event(&mut self, v: &Value) -> bool {
        let Some(name) = v["event"].as_str() else {
            return false;
        };
        let ts = &v["timestamp"];
        let us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
            + ts["microseconds"].as_u64().unwrap_or(0);
        self.events.push((name.to_string(), us));
        true
    }

    /// The host time (µs since the epoch) of the first `name` event, waiting for it if needed.
    pub fn event_time(&mut self, name: &str) -> Result<u64, String> {
        loop {
            if let Some(&(_, us)) = self.events.iter().find(|(n, _)| n == name) {
                return Ok(us);
            }
            let v = self.read()?;
            self.keep_event(&v);
        }
    }
}
