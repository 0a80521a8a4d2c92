//! The file as written: serde structs that mirror the TOML, before defaults and checks.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A duration written for humans ("10s", "500ms"); a newtype so it can sit inside [`Spanned`].
#[derive(Debug)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(HumanDuration)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) workers: Option<NonZeroUsize>,
    pub(super) steering: Option<RawSteering>,
    pub(super) pin_workers: Option<bool>,
    pub(super) rebalance: Option<Spanned<HumanDuration>>,
    /// A file path, or an `etcd://` URL.
    pub(super) catalog: Spanned<String>,
    pub(super) tls: Spanned<RawTls>,
    pub(super) listen: RawListen,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) pool: super::pool::RawPool,
    #[serde(default)]
    pub(super) node: RawNode,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) id: Option<Spanned<String>>,
    pub(super) peer: Option<SocketAddr>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) lease_ttl: Option<Spanned<HumanDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Option<Spanned<PathBuf>>,
    pub(super) key: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) direct: SocketAddr,
    pub(super) pooled: Option<Spanned<SocketAddr>>,
    pub(super) admin: Option<Spanned<SocketAddr>>,
    pub(super) admin_public: Option<bool>,
    pub(super) proxy_from: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) startup: Option<Spanned<HumanDuration>>,
    pub(super) handshake: Option<Spanned<HumanDuration>>,
    pub(super) connect: Option<Spanned<HumanDuration>>,
    pub(super) drain: Option<Spanned<HumanDuration>>,
    pub(super) health_check_interval: Option<Spanned<HumanDuration>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_client_connections: Option<NonZeroU32>,
    pub(super) max_startup_connections: Option<NonZeroU32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) mock_secret_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) max_removed_percent: Option<Spanned<u8>>,
    pub(super) force: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) socket: Option<PathBuf>,
}

/// `steering = "ebpf" | "userspace" | "off"`.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawSteering {
    Ebpf,
    Userspace,
    Off,
}
