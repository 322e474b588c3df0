//! slog drains for netpold: journald's native protocol under systemd, human lines on
//! a terminal, JSON on request. The binary builds the one root logger with
//! [`build`]; every component takes a child with its own fixed keys.
//!
//! Never blocks for long and never fails the caller: a log line that cannot be
//! written is dropped.

use std::fmt::{self, Write as _};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use slog::{Drain, Key, Level, Logger, OwnedKVList, Record, KV};

use crate::config::{LogFormat, LogLevel};

/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

pub fn slog_level(level: LogLevel) -> Level {
    match level {
        LogLevel::Error => Level::Error,
        LogLevel::Warn => Level::Warning,
        LogLevel::Info => Level::Info,
        LogLevel::Debug => Level::Debug,
        LogLevel::Trace => Level::Trace,
    }
}

/// The format `auto` means here: journald when our stderr is the journal stream
/// systemd set up (`JOURNAL_STREAM` names its device and inode), terminal otherwise.
pub fn effective_format(format: LogFormat) -> LogFormat {
    match format {
        LogFormat::Auto if stderr_is_journal() && std::path::Path::new(JOURNAL_SOCKET).exists() => {
            LogFormat::Journald
        }
        LogFormat::Auto => LogFormat::Terminal,
        f => f,
    }
}

fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    match nix::sys::stat::fstat(2) {
        Ok(st) => {
            dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
        }
        Err(_) => false,
    }
}

/// The root logger of the process.
pub fn build(level: LogLevel, format: LogFormat) -> Logger {
    let level = slog_level(level);
    match effective_format(format) {
        LogFormat::Journald => match JournaldDrain::new("netpold") {
            Ok(d) => Logger::root(d.filter_level(level).ignore_res(), slog::o!()),
            Err(_) => terminal(level),
        },
        LogFormat::Json => {
            let d = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build();
            Logger::root(
                std::sync::Mutex::new(d).filter_level(level).ignore_res(),
                slog::o!(),
            )
        }
        _ => terminal(level),
    }
}

fn terminal(level: Level) -> Logger {
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let d = slog_term::FullFormat::new(decorator).build();
    Logger::root(d.filter_level(level).ignore_res(), slog::o!())
}

/// A logger that drops everything (tests, library callers without logging).
pub fn discard() -> Logger {
    Logger::root(slog::Discard, slog::o!())
}

/// Sends each record as one datagram in journald's native protocol: `MESSAGE=`,
/// `PRIORITY=`, `SYSLOG_IDENTIFIER=` and every key-value pair as an upper-case
/// field (`generation` → `GENERATION=`). The message also carries the pairs as
/// `key=value` so `journalctl` without `-o verbose` shows them.
pub struct JournaldDrain {
    socket: UnixDatagram,
    path: PathBuf,
    identifier: String,
}

impl JournaldDrain {
    pub fn new(identifier: &str) -> std::io::Result<Self> {
        Self::with_socket(identifier, JOURNAL_SOCKET.into())
    }

    /// Send to another socket path (tests).
    pub fn with_socket(identifier: &str, path: PathBuf) -> std::io::Result<Self> {
        Ok(JournaldDrain {
            socket: UnixDatagram::unbound()?,
            path,
            identifier: identifier.to_string(),
        })
    }

    /// The datagram for one record.
    pub fn encode(&self, record: &Record<'_>, values: &OwnedKVList) -> Vec<u8> {
        // slog hands pairs over last first; put them back in written order, the
        // record's before the logger's.
        let mut own = FieldCollector::default();
        let _ = record.kv().serialize(record, &mut own);
        let mut inherited = FieldCollector::default();
        let _ = values.serialize(record, &mut inherited);
        let mut fields = FieldCollector::default();
        for (k, v) in own
            .pairs
            .into_iter()
            .rev()
            .chain(inherited.pairs.into_iter().rev())
        {
            if !fields.pairs.iter().any(|(fk, _)| *fk == k) {
                fields.pairs.push((k, v));
            }
        }
        let mut message = record.msg().to_string();
        for (k, v) in &fields.pairs {
            let _ = write!(message, " {k}={v}");
        }
        let mut buf = Vec::with_capacity(256);
        push_field(&mut buf, "MESSAGE", &message);
        push_field(&mut buf, "PRIORITY", priority(record.level()));
        push_field(&mut buf, "SYSLOG_IDENTIFIER", &self.identifier);
        push_field(&mut buf, "CODE_FILE", record.file());
        push_field(&mut buf, "CODE_LINE", &record.line().to_string());
        for (k, v) in &fields.pairs {
            push_field(&mut buf, &journal_key(k), v);
        }
        buf
    }
}

impl Drain for JournaldDrain {
    type Ok = ();
    type Err = std::io::Error;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), std::io::Error> {
        let buf = self.encode(record, values);
        self.socket.send_to(&buf, &self.path).map(|_| ())
    }
}

fn priority(level: Level) -> &'static str {
    match level {
        Level::Critical => "2",
        Level::Error => "3",
        Level::Warning => "4",
        Level::Info => "6",
        Level::Debug | Level::Trace => "7",
    }
}

/// `KEY=value\n`, or the binary form (`KEY\n`, little-endian u64 length, value, `\n`)
/// when the value has a newline.
fn push_field(buf: &mut Vec<u8>, key: &str, value: &str) {
    buf.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// journald field names: upper-case letters, digits and `_`, not starting with `_`
/// or a digit.
fn journal_key(key: &str) -> String {
    let mut k: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    while k.starts_with('_') || k.starts_with(|c: char| c.is_ascii_digit()) {
        k.remove(0);
    }
    if k.is_empty() {
        k.push_str("FIELD");
    }
    k
}

#[derive(Default)]
struct FieldCollector {
    pairs: Vec<(String, String)>,
}

impl slog::Serializer for FieldCollector {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments<'_>) -> slog::Result {
        self.pairs.push((key.to_string(), val.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_datagram_has_message_priority_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let drain = JournaldDrain::with_socket("netpold", path).unwrap();
        let log = Logger::root(drain.ignore_res(), slog::o!("component" => "reconcile"));
        slog::warn!(log, "applied"; "generation" => 7, "file" => "/etc/netpol.d/a.yaml", "multi" => "a\nb");
        let mut buf = vec![0u8; 4096];
        let n = server.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.contains("MESSAGE\n"), "{text}");
        assert!(
            text.contains(
                "applied generation=7 file=/etc/netpol.d/a.yaml multi=a\nb component=reconcile\n"
            ),
            "{text}"
        );
        assert!(text.contains("PRIORITY=4\n"), "{text}");
        assert!(text.contains("GENERATION=7\n"), "{text}");
        assert!(text.contains("FILE=/etc/netpol.d/a.yaml\n"), "{text}");
        assert!(text.contains("COMPONENT=reconcile\n"), "{text}");
        assert!(text.contains("SYSLOG_IDENTIFIER=netpold\n"), "{text}");
        // The value with a newline uses the binary form.
        assert!(buf[..n]
            .windows(b"MULTI\n\x03\0\0\0\0\0\0\0a\nb\n".len())
            .any(|w| w == b"MULTI\n\x03\0\0\0\0\0\0\0a\nb\n"));
    }

    #[test]
    fn journal_keys_are_sanitized() {
        assert_eq!(journal_key("generation"), "GENERATION");
        assert_eq!(journal_key("last-apply.ms"), "LAST_APPLY_MS");
        assert_eq!(journal_key("_x"), "X");
    }
}
