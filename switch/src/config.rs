//! The switch's configuration as data: what is saved after every change and
//! restored on restart, and the declarative start-up file (`--config`, TOML).
//!
//! The saved state is written atomically: to a temporary file in the same
//! directory, `fsync`ed, renamed over the old file, and the directory
//! `fsync`ed, so that after a crash at any point the file holds either the
//! old or the new state, never a mix.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::DiskSpec;
use crate::identity::registry::IdentitySpec;
use crate::port::PortSpec;

/// Version of the saved state format.
pub const STATE_VERSION: u32 = 1;
/// Name of the saved state in the run directory.
pub const STATE_FILE: &str = "state.json";

/// Errors reading or writing configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid saved state: {source}; fix or remove it")]
    BadState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a valid configuration: {source}")]
    BadToml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("cannot encode the configuration as TOML: {0}")]
    Encode(#[from] toml::ser::Error),
    #[error("{path} has state version {found}; this vioswitch reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// A static FDB entry, by port name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticEntry {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    #[serde(default)]
    pub vlan: u16,
    pub port: String,
}

/// Everything needed to bring a switch back as it was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SwitchState {
    #[serde(default = "state_version")]
    pub version: u32,
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub fdb_ageing_s: Option<u64>,
    #[serde(default, rename = "port")]
    pub ports: Vec<PortSpec>,
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, rename = "fdb_static")]
    pub fdb_static: Vec<StaticEntry>,
    /// Identities, in binding order (restored after the ports, in this
    /// order).
    #[serde(default, rename = "identity", skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentitySpec>,
}

fn state_version() -> u32 {
    STATE_VERSION
}

impl Default for SwitchState {
    fn default() -> Self {
        SwitchState {
            version: STATE_VERSION,
            workers: None,
            fdb_ageing_s: None,
            ports: Vec::new(),
            disks: Vec::new(),
            fdb_static: Vec::new(),
            identities: Vec::new(),
        }
    }
}

impl SwitchState {
    /// Read a saved state; `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, ConfigError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let state: SwitchState =
            serde_json::from_slice(&bytes).map_err(|source| ConfigError::BadState {
                path: path.to_path_buf(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(ConfigError::Version {
                path: path.to_path_buf(),
                found: state.version,
            });
        }
        Ok(Some(state))
    }

    /// Read a TOML start-up configuration.
    pub fn load_toml(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::BadToml {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The state as TOML (the `--config` format).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Save as JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| ConfigError::Write {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        bytes.push(b'\n');
        write_atomic(path, &bytes)
    }
}

/// Remove temporary files a crash left behind while saving `path`.
pub fn remove_stale_temporaries(path: &Path) {
    let dir = path.parent().unwrap_or(Path::new("."));
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp.");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Replace `path` with `bytes` so that a crash leaves the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ConfigError> {
    let err = |source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    // A fresh file of our own: never follow a link someone left there.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_json_and_toml() {
        let dir = std::env::temp_dir().join(format!("vioswitch-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(STATE_FILE);
        assert_eq!(SwitchState::load(&path).unwrap(), None);
        let mut state = SwitchState {
            workers: Some(2),
            ..Default::default()
        };
        state
            .ports
            .push(PortSpec::server("vm1", dir.join("vm1.sock")));
        state.fdb_static.push(StaticEntry {
            mac: "52:54:00:00:00:01".into(),
            vlan: 0,
            port: "vm1".into(),
        });
        state.ports[0].trusted = true;
        state.ports[0].guest_mac = Some("52:54:00:00:00:02".parse().unwrap());
        state.ports[0].ip_map = vec!["192.0.2.1=10.0.0.1".parse().unwrap()];
        let mut web = IdentitySpec::new(
            "web",
            "52:54:00:00:00:03".parse().unwrap(),
            vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            0,
        );
        web.standby = vec!["vm2".into()];
        web.port = Some("vm1".into());
        state.identities.push(web);
        state.identities.push(IdentitySpec::new(
            "db",
            "52:54:00:00:00:04".parse().unwrap(),
            vec!["192.0.2.2".parse().unwrap()],
            7,
        ));
        state.save(&path).unwrap();
        assert_eq!(SwitchState::load(&path).unwrap(), Some(state.clone()));
        let toml_path = dir.join("c.toml");
        std::fs::write(&toml_path, state.to_toml().unwrap()).unwrap();
        assert_eq!(SwitchState::load_toml(&toml_path).unwrap(), state);
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(matches!(
            SwitchState::load(&path),
            Err(ConfigError::BadState { .. })
        ));
        std::fs::write(&toml_path, "workers = \"two\"").unwrap();
        assert!(matches!(
            SwitchState::load_toml(&toml_path),
            Err(ConfigError::BadToml { .. })
        ));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_minimal_toml_config_parses() {
        let text = r#"
workers = 2

[[port]]
name = "vm1"
socket = "/run/vioswitch/vm1.sock"

[[port]]
name = "vm2"
socket = "/var/lib/qemu/vm2.sock"
mode = "client"
vlan = 10
trusted = true
guest_mac = "52:54:00:00:00:02"
ip_map = ["192.0.2.10=10.0.0.5"]

[[identity]]
name = "web"
mac = "52:54:00:00:00:10"
ips = ["192.0.2.10", "2001:db8::10"]
vlan = 10
port = "vm2"
standby = ["vm1"]
"#;
        let state: SwitchState = toml::from_str(text).unwrap();
        assert_eq!(state.workers, Some(2));
        assert_eq!(state.ports.len(), 2);
        assert_eq!(state.ports[1].vlan, 10);
        assert!(state.ports[1].trusted && !state.ports[0].trusted);
        assert_eq!(state.ports[1].ip_map[0].to_string(), "192.0.2.10=10.0.0.5");
        let web = &state.identities[0];
        assert_eq!(web.port.as_deref(), Some("vm2"));
        assert_eq!(web.stall_ms, crate::identity::failover::DEFAULT_STALL_MS);
        assert_eq!(web.ips.len(), 2);
    }
}
