//! `swarm.json`: the layers, their VMs, the rings and the front end.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swarm_ring::work::Work;

/// A swarm.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmConfig {
    /// Where the HTTP front end listens (`127.0.0.1:8080`; port 0 picks one, printed at start).
    pub listen: String,
    /// The control API's Unix socket (status, metrics, scaling).
    pub control: PathBuf,
    /// Where the swarm keeps its sockets and the VMs' consoles (created; must not exist).
    pub state_dir: PathBuf,
    /// The layers, in pipeline order.
    pub layers: Vec<LayerConfig>,
    /// The key the auth layer checks tags against.
    #[serde(default = "default_key")]
    pub key: String,
    /// Slots per lane.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Bytes per slot (256 to 4104): the largest request or answer, plus 32 bytes of headers.
    #[serde(default = "default_slot_size")]
    pub slot_size: u32,
    /// Guest RAM per layer VM, MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    /// Let the policy scale layers by load (within each layer's min and max).
    #[serde(default = "yes")]
    pub autoscale: bool,
}

/// One layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    /// Its name.
    pub name: String,
    /// What its VMs do, in order (`http`, `auth`, `digest`, `respond`): several make one VM do
    /// several layers' work.
    pub work: Vec<String>,
    /// VMs at start.
    #[serde(default = "one")]
    pub instances: u32,
    /// Fewest VMs the policy keeps.
    #[serde(default = "one")]
    pub min: u32,
    /// Most VMs the policy starts.
    #[serde(default = "four")]
    pub max: u32,
    /// Hardware labels (e.g. `crypto`) of the layer's first `labeled` VMs: a request whose
    /// `X-Needs` header names one of them goes only to VMs that have it; other requests
    /// prefer VMs without labels, keeping the labelled ones free.
    #[serde(default)]
    pub labels: Vec<String>,
    /// How many of the layer's VMs carry `labels` (default: all).
    #[serde(default)]
    pub labeled: Option<u32>,
    /// Requests queued or in flight per VM above which the policy adds one.
    #[serde(default = "up")]
    pub scale_up_load: f64,
    /// ... and below which it drains one.
    #[serde(default = "down")]
    pub scale_down_load: f64,
}

fn default_key() -> String {
    "swarm-key".into()
}
fn default_slots() -> u32 {
    64
}
fn default_slot_size() -> u32 {
    4096
}
fn default_mem() -> u32 {
    32
}
fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn four() -> u32 {
    4
}
fn up() -> f64 {
    4.0
}
fn down() -> f64 {
    0.5
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not a configuration.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde said, with line and column.
        message: String,
    },
    /// A value makes no sense.
    #[error("{0}")]
    Invalid(String),
}

impl SwarmConfig {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        config.check()?;
        Ok(config)
    }

    /// Every label any layer names, in a fixed order: label *i* is affinity bit *i*.
    pub fn label_table(&self) -> Vec<String> {
        let mut all: Vec<String> = self.layers.iter().flat_map(|l| l.labels.iter().cloned()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// The affinity bits of `labels`.
    pub fn affinity_bits(&self, labels: &[String]) -> u32 {
        let table = self.label_table();
        labels.iter().filter_map(|l| table.iter().position(|t| t == l)).fold(0, |bits, i| bits | 1 << i)
    }

    /// Checks the values.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.layers.is_empty() || self.layers.len() > 8 {
            return bad("layers: 1 to 8 layers".into());
        }
        // The worker's buffers hold 4 KiB messages.
        if !(256..=4104).contains(&self.slot_size) || !self.slot_size.is_multiple_of(8) {
            return bad(format!("slot_size {}: a multiple of 8 from 256 to 4104", self.slot_size));
        }
        if !self.slots.is_power_of_two() || !(2..=4096).contains(&self.slots) {
            return bad(format!("slots {}: a power of two from 2 to 4096", self.slots));
        }
        if !(16..=4096).contains(&self.mem_mib) {
            return bad(format!("mem_mib {}: 16 to 4096", self.mem_mib));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let at = format!("layers[{i}] ({:?})", layer.name);
            if layer.name.is_empty() || !layer.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return bad(format!("{at}: a name is letters, digits, - and _"));
            }
            if self.layers[..i].iter().any(|l| l.name == layer.name) {
                return bad(format!("{at}: a second layer of that name"));
            }
            if layer.work.is_empty() || layer.work.len() > 4 {
                return bad(format!("{at}: work lists 1 to 4 of http, auth, digest, respond"));
            }
            if let Some(w) = layer.work.iter().find(|w| Work::from_name(w).is_none()) {
                return bad(format!("{at}: work {w:?} is none of http, auth, digest, respond"));
            }
            if layer.min == 0
                || layer.min > layer.max
                || layer.max > 16
                || !(layer.min..=layer.max).contains(&layer.instances)
            {
                return bad(format!("{at}: need 1 <= min <= instances <= max <= 16"));
            }
            if layer.scale_down_load >= layer.scale_up_load || layer.scale_down_load < 0.0 {
                return bad(format!("{at}: scale_down_load must be below scale_up_load"));
            }
        }
        if self.label_table().len() > 32 {
            return bad("labels: at most 32 different labels (they are bits of a VM's affinity)".into());
        }
        if self.key.contains(char::is_whitespace) || self.key.len() > 64 {
            return bad("key: up to 64 characters, no spaces (it goes on a kernel command line)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: serde_json::Value) -> Result<SwarmConfig, String> {
        let value = serde_json::json!({"listen": "127.0.0.1:0", "control": "/c", "state_dir": "/s", "layers": layers});
        let config: SwarmConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
        config.check().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn bad_layers_are_refused_naming_the_layer_and_the_field() {
        let err = |layers| config(layers).unwrap_err();
        assert!(err(serde_json::json!([])).contains("1 to 8 layers"));
        assert!(err(serde_json::json!([{"name": "a", "work": ["zip"]}])).contains("layers[0] (\"a\"): work \"zip\""));
        assert!(
            err(serde_json::json!([{"name": "a", "work": ["http"], "min": 3, "max": 2}])).contains("min <= instances")
        );
        assert!(
            err(serde_json::json!([{"name": "a", "work": ["http"]}, {"name": "a", "work": ["auth"]}]))
                .contains("second layer")
        );
        assert!(err(serde_json::json!([{"name": "a", "work": ["http"], "extra": 1}])).contains("unknown field"));
    }

    #[test]
    fn labels_become_affinity_bits_in_one_order_for_every_layer() {
        let c = config(serde_json::json!([
            {"name": "a", "work": ["http"], "labels": ["gpu", "crypto"]},
            {"name": "b", "work": ["auth"], "labels": ["crypto"]}
        ]))
        .unwrap();
        assert_eq!(c.label_table(), ["crypto", "gpu"]);
        assert_eq!(c.affinity_bits(&["crypto".into()]), 1);
        assert_eq!(c.affinity_bits(&["gpu".into(), "crypto".into()]), 3);
        assert_eq!(c.affinity_bits(&["unknown".into()]), 0);
    }
}
