//! `netpold.toml` (DESIGN §3.3): every key optional, defaults in code.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/netpol/netpold.toml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub policy_dir: PathBuf,
    pub endpoint_dirs: Vec<PathBuf>,
    pub pin_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Empty = the hostname.
    pub node_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy_dir: "/etc/netpol.d".into(),
            endpoint_dirs: vec!["/etc/netpol/endpoints.d".into()],
            pin_dir: "/sys/fs/bpf/netpol".into(),
            runtime_dir: "/run/netpol".into(),
            state_dir: "/var/lib/netpol".into(),
            node_name: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Config {
    /// Load `path`; a missing file at the default path gives the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG) => {
                return Ok(Config::default())
            }
            Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
    }

    pub fn socket_path(&self) -> PathBuf {
        self.runtime_dir.join("netpold.sock")
    }
}
