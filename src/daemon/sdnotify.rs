//! systemd readiness protocol through the sd-notify crate: `READY=1` after the
//! first applied generation, `STATUS=` after each, `RELOADING=1` with
//! `MONOTONIC_USEC=` then `READY=1` around a reload, `WATCHDOG=1` from the main
//! loop, `STOPPING=1` on the way out. With `NOTIFY_SOCKET` unset nothing is sent.
//!
//! Owns only the messages and when each is sent (the loop calls it). Tests use
//! `Notifier::recorder` (feature `test-support`) instead of the process
//! environment, which parallel tests share.

#[cfg(any(test, feature = "test-support"))]
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Debug, Clone)]
pub enum Notifier {
    /// The service manager named by `NOTIFY_SOCKET`, if any.
    Systemd,
    /// Keep every message (one string per notification, lines joined by `\n`).
    #[cfg(any(test, feature = "test-support"))]
    Recorder(Arc<Mutex<Vec<String>>>),
}

impl Notifier {
    #[cfg(any(test, feature = "test-support"))]
    pub fn recorder() -> (Notifier, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (Notifier::Recorder(log.clone()), log)
    }

    pub fn notify(&self, states: &[NotifyState<'_>]) {
        match self {
            // Best effort: a service manager that went away is no reason to stop enforcing.
            Notifier::Systemd => {
                let _ = sd_notify::notify(false, states);
            }
            #[cfg(any(test, feature = "test-support"))]
            Notifier::Recorder(log) => {
                let msg: Vec<String> = states.iter().map(|s| s.to_string()).collect();
                if let Ok(mut l) = log.lock() {
                    l.push(msg.join("\n"));
                }
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.notify(&[NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.notify(&[NotifyState::Reloading, now]),
            Err(_) => self.notify(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.notify(&[NotifyState::Stopping]);
    }

    pub fn watchdog(&self) {
        self.notify(&[NotifyState::Watchdog]);
    }

    /// How often to ping the watchdog: half its timeout, when systemd set one for us.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        match self {
            Notifier::Systemd => {
                let mut usec = 0;
                if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
                    Some(Duration::from_micros(usec / 2))
                } else {
                    None
                }
            }
            #[cfg(any(test, feature = "test-support"))]
            Notifier::Recorder(_) => None,
        }
    }
}
