//! Logging for operators. Never stdout (stdout is the CNI protocol): a `logFile` from the network
//! config (or `PONTOON_LOG_FILE`), else stderr. Level from `logLevel` (or `PONTOON_LOG_LEVEL`):
//! error, warn, info, debug; default `info` with a log file, `warn` on stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    sink: Mutex<Option<File>>,
    level: LevelFilter,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!(
            "{} {} pontoon[{}]: {}\n",
            timestamp(),
            level_name(r.level()),
            std::process::id(),
            r.args()
        );
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        match sink.as_mut() {
            // O_APPEND: each line lands whole even with many plugins writing at once.
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

fn timestamp() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" | "none" => LevelFilter::Off,
        _ => return None,
    })
}

/// Installs the logger once; the environment overrides the config.
pub fn init(conf_file: Option<&Path>, conf_level: Option<&str>) {
    let env_file = std::env::var_os("PONTOON_LOG_FILE").filter(|v| !v.is_empty());
    let env_level = std::env::var("PONTOON_LOG_LEVEL").ok();
    let path = env_file.as_deref().map(Path::new).or(conf_file);
    let file = path.and_then(|p| {
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        OpenOptions::new().create(true).append(true).open(p).ok()
    });
    let default = if file.is_some() {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    };
    let level = env_level
        .as_deref()
        .and_then(parse_level)
        .or_else(|| conf_level.and_then(parse_level))
        .unwrap_or(default);
    let logger = LOGGER.get_or_init(|| Logger {
        sink: Mutex::new(file),
        level,
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}
