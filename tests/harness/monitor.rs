//! `netpolctl monitor --json` of a lab's daemon, read line by line (the
//! daemon end-to-end tests' verdict events, the DNS test's DNS verdicts).

use std::process::{Command, Stdio};
use std::time::Duration;

use super::cmd::NETPOLCTL;
use super::lab::Lab;

/// `netpolctl monitor --json` of a daemon, as a channel of parsed lines;
/// killed when dropped.
pub struct Monitor {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Monitor {
    pub fn start(lab: &Lab) -> Monitor {
        let mut child = Command::new(NETPOLCTL)
            .args(["monitor", "--json", "--config"])
            .arg(lab.daemon.config())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str(&line) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        // The daemon serves the client before events go out to it.
        std::thread::sleep(Duration::from_millis(300));
        Monitor { child, lines }
    }

    /// The first event for which `f` holds, within 5 s.
    pub fn wait(
        &self,
        lab: &Lab,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if f(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!(
                    "no {what} event from netpolctl monitor\n{}",
                    lab.daemon.log_tail(60)
                ),
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
