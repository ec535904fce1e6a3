//! The agent's HTTP endpoints, on one listener:
//! - `GET /healthz` (liveness): 200 unless the agent itself is stuck (its loop has not
//!   completed a pass within the bound);
//! - `GET /readyz` (readiness): 200 when the node's network is fully reconciled, else 503 with
//!   one line per problem;
//! - `GET /metrics`: Prometheus text format.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use crate::error::{Error, Result};

/// What the loop shares with the endpoints.
pub struct Shared {
    pub started: Instant,
    /// When the loop last finished a pass.
    pub last_pass: Mutex<Option<Instant>>,
    /// How long a pass may be missing before the agent counts as stuck.
    pub stuck_after: Duration,
    /// `None` before the first pass; then the problems of the last one (empty = ready).
    pub problems: Mutex<Option<Vec<String>>>,
    pub metrics: Mutex<Metrics>,
}

impl Shared {
    pub fn new(stuck_after: Duration) -> Shared {
        Shared {
            started: Instant::now(),
            last_pass: Mutex::new(None),
            stuck_after,
            problems: Mutex::new(None),
            metrics: Mutex::new(Metrics::new()),
        }
    }

    fn health(&self) -> (bool, String) {
        let since = self
            .last_pass
            .lock()
            .unwrap()
            .map(|t| t.elapsed())
            .unwrap_or_else(|| self.started.elapsed());
        if since <= self.stuck_after {
            (true, "ok\n".into())
        } else {
            (
                false,
                format!(
                    "the reconcile loop has not completed a pass for {} s\n",
                    since.as_secs()
                ),
            )
        }
    }

    fn readiness(&self) -> (bool, String) {
        match &*self.problems.lock().unwrap() {
            None => (false, "the first reconcile has not finished\n".into()),
            Some(p) if p.is_empty() => (true, "ok\n".into()),
            Some(p) => (false, p.iter().map(|l| format!("{l}\n")).collect()),
        }
    }
}

/// Serves the endpoints on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                // The request head, however it was split into segments (at most 8 KiB).
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf);
                let path = req
                    .strip_prefix("GET ")
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("");
                let (ok, ctype, body) = match path {
                    "/healthz" => {
                        let (ok, b) = shared.health();
                        (Some(ok), "text/plain", b)
                    }
                    "/readyz" => {
                        let (ok, b) = shared.readiness();
                        (Some(ok), "text/plain", b)
                    }
                    "/metrics" => (
                        Some(true),
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        shared.metrics.lock().unwrap().encode(),
                    ),
                    _ => (None, "text/plain", "not found\n".into()),
                };
                let status = match ok {
                    Some(true) => "200 OK",
                    Some(false) => "503 Service Unavailable",
                    None => "404 Not Found",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| Error::io("cannot start the HTTP thread", e))?;
    Ok(())
}
