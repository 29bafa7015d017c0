//! Device options, in Cloud Hypervisor's `key=value,key=value` syntax on the command line and
//! as objects in the JSON config. Both forms produce the same structs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The I/O engine for a file-backed disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockEngine {
    /// pread/pwrite on the event loop thread.
    #[default]
    Sync,
    /// io_uring: asynchronous, many requests in flight.
    IoUring,
}

impl FromStr for BlockEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(BlockEngine::Sync),
            "io_uring" => Ok(BlockEngine::IoUring),
            _ => Err(format!("engine={s:?}: expected sync or io_uring")),
        }
    }
}

impl fmt::Display for BlockEngine {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            BlockEngine::Sync => "sync",
            BlockEngine::IoUring => "io_uring",
        })
    }
}

/// Where an NBD server listens: `HOST:PORT` or `unix:PATH`, in JSON too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NbdAddress {
    /// A TCP server, written `HOST:PORT` (an IPv6 host may be bracketed).
    Tcp {
        /// Host name or IP address, without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix socket, written `unix:PATH`.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

impl FromStr for NbdAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("nbd=unix: needs a socket path".into());
            }
            return Ok(NbdAddress::Unix { path: path.into() });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("nbd={s:?}: expected HOST:PORT or unix:PATH"))?;
        let port = port.parse().map_err(|_| format!("nbd={s:?}: invalid port {port:?}"))?;
        if host.is_empty() {
            return Err(format!("nbd={s:?}: missing host"));
        }
        Ok(NbdAddress::Tcp { host: host.trim_matches(|c| c == '[' || c == ']').to_string(), port })
    }
}

impl TryFrom<String> for NbdAddress {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<NbdAddress> for String {
    fn from(a: NbdAddress) -> String {
        a.to_string()
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddress::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A virtio-blk disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Name used by the API and as the GET_ID serial; defaults to `disk<N>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A disk image file (raw) or block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// An NBD export instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdAddress>,
    /// The NBD export name (default: the server's default export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// Opens the image or export read-only, so the guest cannot write it.
    #[serde(default)]
    pub readonly: bool,
    /// I/O engine for a `path` disk; not accepted with `nbd` on the command line.
    #[serde(default)]
    pub engine: BlockEngine,
}

/// A virtio-net interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name used by the API; defaults to `net<N>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A tap interface: attached if it exists, created (and brought up) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// A Unix datagram socket path: each datagram is one Ethernet frame (no root needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<PathBuf>,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU in bytes (68 to 9000) announced to the guest; when absent the guest assumes 1500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// The virtio-vsock device (at most one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Name used by the API; defaults to `vsock0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host side: connect here and send `CONNECT <port>\n` to reach a guest port; guest
    /// connections to host port P arrive at `<socket>_P`.
    pub socket: PathBuf,
}

/// Splits `key=value,...` into a map, refusing unknown and repeated keys. An item without `=` gets a suggestion: `bare_key` says which key
/// such a value most likely belongs to (`--disk disk.img` means `path=disk.img`).
fn options<'a>(
    what: &str,
    s: &'a str,
    allowed: &[&str],
    bare_key: fn(&str) -> &'static str,
) -> Result<BTreeMap<&'a str, &'a str>, String> {
    let mut map = BTreeMap::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            format!("{what}: {item:?} is not key=value; did you mean {what} {}={item}?", bare_key(item))
        })?;
        if !allowed.contains(&key) {
            return Err(format!("{what}: unknown option {key:?} (known: {})", allowed.join(", ")));
        }
        if map.insert(key, value).is_some() {
            return Err(format!("{what}: option {key:?} given twice"));
        }
    }
    Ok(map)
}

fn on_off(what: &str, key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{what}: {key}={value:?}: expected on or off")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let o = options("--disk", s, &["path", "nbd", "export", "readonly", "engine", "id"], |item| {
            if item.starts_with("unix:") || item.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
                "nbd"
            } else {
                "path"
            }
        })?;
        let disk = DiskConfig {
            id: o.get("id").map(|v| v.to_string()),
            path: o.get("path").map(PathBuf::from),
            nbd: o.get("nbd").map(|v| v.parse()).transpose().map_err(|e| format!("--disk: {e}"))?,
            export: o.get("export").map(|v| v.to_string()),
            readonly: o.get("readonly").map(|v| on_off("--disk", "readonly", v)).transpose()?.unwrap_or(false),
            engine: o
                .get("engine")
                .map(|v| v.parse())
                .transpose()
                .map_err(|e| format!("--disk: {e}"))?
                .unwrap_or_default(),
        };
        if o.contains_key("engine") && disk.nbd.is_some() {
            return Err("--disk: engine= applies to path= disks, not nbd=".into());
        }
        disk.check().map_err(|e| format!("--disk: {e}"))?;
        Ok(disk)
    }
}

impl DiskConfig {
    /// Checks the combination of options.
    pub fn check(&self) -> Result<(), String> {
        match (&self.path, &self.nbd) {
            (None, None) => Err("needs path=FILE or nbd=HOST:PORT|unix:PATH".into()),
            (Some(_), Some(_)) => Err("path= and nbd= are exclusive".into()),
            (Some(_), None) if self.export.is_some() => Err("export= applies to nbd= disks".into()),
            _ => Ok(()),
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if bytes.len() != 6 {
        return Err(format!("mac={s:?}: expected six hex bytes like 52:54:00:12:34:56"));
    }
    for (out, b) in mac.iter_mut().zip(bytes) {
        *out = u8::from_str_radix(b, 16).map_err(|_| format!("mac={s:?}: {b:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac={s:?}: a multicast address cannot be a NIC address"));
    }
    Ok(mac)
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let o =
            options(
                "--net",
                s,
                &["tap", "unix", "mac", "mtu", "id"],
                |item| {
                    if item.contains('/') { "unix" } else { "tap" }
                },
            )?;
        let net = NetConfig {
            id: o.get("id").map(|v| v.to_string()),
            tap: o.get("tap").map(|v| v.to_string()),
            unix: o.get("unix").map(PathBuf::from),
            mac: o.get("mac").map(|v| v.to_string()),
            mtu: o
                .get("mtu")
                .map(|v| v.parse().map_err(|_| format!("--net: mtu={v:?} is not a number")))
                .transpose()?,
        };
        net.check().map_err(|e| format!("--net: {e}"))?;
        Ok(net)
    }
}

impl NetConfig {
    /// Checks the combination of options: exactly one of tap and unix, a valid tap name, MAC
    /// and MTU.
    pub fn check(&self) -> Result<(), String> {
        match (&self.tap, &self.unix) {
            (None, None) => return Err("needs tap=NAME or unix=PATH".into()),
            (Some(_), Some(_)) => return Err("tap= and unix= are exclusive".into()),
            (Some(name), None) if name.is_empty() || name.len() >= 16 => {
                return Err(format!("tap={name:?}: interface names are 1 to 15 characters"));
            }
            _ => {}
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac)?;
        }
        if let Some(mtu) = self.mtu
            && !(68..=9000).contains(&mtu)
        {
            return Err(format!("mtu={mtu}: expected 68 to 9000"));
        }
        Ok(())
    }
}

/// A shared-memory region of a swarm fabric, attached to the VM (see `docs/swarm.md`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShmConfig {
    /// The fabric server's Unix socket, which hands over the region's memory and doorbells.
    pub socket: PathBuf,
    /// The region's name on that server.
    pub region: String,
    /// This VM's party in the region (its doorbell; which lanes it uses is the guest's
    /// convention).
    pub party: u16,
}

impl FromStr for ShmConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let o = options("--shm", s, &["socket", "region", "party"], |_| "socket")?;
        let need = |key: &str| o.get(key).copied().ok_or_else(|| format!("--shm: needs {key}="));
        let party = need("party")?;
        let shm = ShmConfig {
            socket: PathBuf::from(need("socket")?),
            region: need("region")?.to_string(),
            party: party.parse().map_err(|_| format!("--shm: party={party:?} is not a number"))?,
        };
        shm.check().map_err(|e| format!("--shm: {e}"))?;
        Ok(shm)
    }
}

impl ShmConfig {
    /// Checks the fields.
    pub fn check(&self) -> Result<(), String> {
        if self.socket.as_os_str().is_empty() {
            return Err("socket= is empty".into());
        }
        if self.region.is_empty() || self.region.len() > 64 {
            return Err(format!("region={:?}: names are 1 to 64 characters", self.region));
        }
        if self.party >= 16 {
            return Err(format!("party={}: a region has at most 16 parties", self.party));
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let o = options("--vsock", s, &["cid", "socket", "id"], |item| {
            if item.parse::<u32>().is_ok() { "cid" } else { "socket" }
        })?;
        let cid = o.get("cid").ok_or("--vsock: needs cid=N")?;
        let cid = cid.parse().map_err(|_| format!("--vsock: cid={cid:?} is not a number"))?;
        let socket = o.get("socket").ok_or("--vsock: needs socket=PATH")?.into();
        let vsock = VsockConfig { id: o.get("id").map(|v| v.to_string()), cid, socket };
        vsock.check().map_err(|e| format!("--vsock: {e}"))?;
        Ok(vsock)
    }
}

impl VsockConfig {
    /// Checks that the CID is a guest CID (3 to 4294967294) and the socket path is not empty.
    pub fn check(&self) -> Result<(), String> {
        // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if self.cid < 3 || self.cid >= u64::from(u32::MAX) {
            return Err(format!("cid={}: guest CIDs are 3 to 4294967294", self.cid));
        }
        if self.socket.as_os_str().is_empty() {
            return Err("socket= needs a path".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_from_option_strings() {
        let d: DiskConfig = "path=/img,readonly=on,engine=io_uring,id=root".parse().unwrap();
        assert_eq!(d.path, Some("/img".into()));
        assert!(d.readonly);
        assert_eq!((d.engine, d.id.as_deref()), (BlockEngine::IoUring, Some("root")));
        let d: DiskConfig = "nbd=localhost:10809,export=vol".parse().unwrap();
        assert_eq!(d.nbd, Some(NbdAddress::Tcp { host: "localhost".into(), port: 10809 }));
        let d: DiskConfig = "nbd=unix:/run/nbd.sock".parse().unwrap();
        assert_eq!(d.nbd, Some(NbdAddress::Unix { path: "/run/nbd.sock".into() }));
        for (bad, needle) in [
            ("", "needs path="),
            ("path=/a,nbd=h:1", "exclusive"),
            ("path=/a,readonly=maybe", "expected on or off"),
            ("path=/a,engine=aio", "expected sync or io_uring"),
            ("path=/a,size=1", "unknown option \"size\""),
            ("path=/a,path=/b", "given twice"),
            ("path", "is not key=value"),
            ("nbd=host", "expected HOST:PORT"),
            ("nbd=h:99999", "invalid port"),
            ("nbd=h:1,engine=sync", "engine= applies"),
            ("path=/a,export=x", "export= applies"),
        ] {
            let err = bad.parse::<DiskConfig>().unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn nets_and_vsock() {
        let n: NetConfig = "tap=vmtap0,mac=52:54:00:12:34:56,id=eth0".parse().unwrap();
        assert_eq!((n.tap.as_deref(), n.mac.as_deref()), (Some("vmtap0"), Some("52:54:00:12:34:56")));
        let n: NetConfig = "unix=/tmp/sw.sock".parse().unwrap();
        assert_eq!(n.unix, Some("/tmp/sw.sock".into()));
        for (bad, needle) in [
            ("mac=52:54:00:12:34:56", "needs tap="),
            ("tap=a,unix=/b", "exclusive"),
            ("tap=averyveryverylongname", "1 to 15"),
            ("tap=t,mac=01:00:00:00:00:00", "multicast"),
            ("tap=t,mac=52:54:00:12:34", "six hex bytes"),
            ("tap=t,mtu=20", "68 to 9000"),
        ] {
            let err = bad.parse::<NetConfig>().unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        assert!("cid=2,socket=/x".parse::<VsockConfig>().unwrap_err().contains("3 to"));
        assert!("socket=/x".parse::<VsockConfig>().unwrap_err().contains("needs cid"));
        assert!("cid=5".parse::<VsockConfig>().unwrap_err().contains("needs socket"));
        assert_eq!(parse_mac("52:54:00:ab:cd:ef").unwrap(), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    }

    #[test]
    fn json_forms() {
        let d: DiskConfig = serde_json::from_str(r#"{"path": "/img", "engine": "io_uring"}"#).unwrap();
        assert_eq!(d.engine, BlockEngine::IoUring);
        let d: DiskConfig = serde_json::from_str(r#"{"nbd": "unix:/s", "export": "e"}"#).unwrap();
        assert_eq!(d.nbd, Some(NbdAddress::Unix { path: "/s".into() }));
        assert!(serde_json::from_str::<DiskConfig>(r#"{"nbd": "nohostport"}"#).is_err());
        assert!(serde_json::from_str::<DiskConfig>(r#"{"path": "/img", "cache": "none"}"#).is_err());
        let v: VsockConfig = serde_json::from_str(r#"{"cid": 3, "socket": "/v"}"#).unwrap();
        assert_eq!(v.cid, 3);
    }
}
