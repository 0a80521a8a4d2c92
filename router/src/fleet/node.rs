//! A node's identity and what it writes about itself under the prefix: its registry entry
//! (`<prefix>/nodes/<id>`) and its acknowledgement of the catalog it applied
//! (`<prefix>/acks/<id>`), both JSON so that `etcdctl get` shows them readably and a later
//! version may add fields (unknown fields are ignored when read).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Longest node id, in bytes.
pub const MAX_NODE_ID_BYTES: usize = 64;
/// Random bytes in a generated node id (printed as hex after [`GENERATED_PREFIX`]).
const GENERATED_BYTES: usize = 8;
/// What a generated node id starts with.
const GENERATED_PREFIX: &str = "node-";

/// A node's name in the fleet: 1 to [`MAX_NODE_ID_BYTES`] of `A-Z a-z 0-9 . _ -`. It is a key
/// segment in etcd (`<prefix>/nodes/<id>`), so no `/`, and it appears in logs and metrics
/// labels, so nothing that needs quoting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// Why a text is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node id {0:?} is not valid: 1 to {MAX_NODE_ID_BYTES} characters of A-Z, a-z, 0-9, '.', \
     '_' and '-'"
)]
pub struct BadNodeId(pub String);

impl NodeId {
    /// A fresh random id (`node-` and 16 hex digits): unique without coordination.
    pub fn generate() -> NodeId {
        let mut bytes = [0u8; GENERATED_BYTES];
        OsRng.fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        NodeId(format!("{GENERATED_PREFIX}{hex}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = BadNodeId;

    fn from_str(text: &str) -> Result<NodeId, BadNodeId> {
        let ok = (1..=MAX_NODE_ID_BYTES).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            // `.` and `..` would read as path segments to a human looking at the keys.
            && text != "."
            && text != "..";
        if ok {
            Ok(NodeId(text.to_owned()))
        } else {
            Err(BadNodeId(text.to_owned()))
        }
    }
}

impl TryFrom<String> for NodeId {
    type Error = BadNodeId;

    fn try_from(text: String) -> Result<NodeId, BadNodeId> {
        text.parse()
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the node id file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeIdFileError {
    /// Reading or creating the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file exists but does not hold a valid node id.
    #[error("{}: {source} (fix it, or remove the file to have a new id generated)", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        source: BadNodeId,
    },
}

/// The node id stored in `path` (one line); if there is no such file, a generated one written
/// there first (never replacing a file another process created meanwhile), so that the node
/// keeps its id across restarts without the operator naming it.
pub fn load_or_create_id(path: &Path) -> Result<NodeId, NodeIdFileError> {
    let io = |source| NodeIdFileError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            return text
                .trim()
                .parse()
                .map_err(|source| NodeIdFileError::Malformed {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(io(error)),
    }
    let id = NodeId::generate();
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut file) => {
            writeln!(file, "{id}")
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            Ok(id)
        }
        // Another router started with this directory at the same moment: its id stands (and
        // the registry refuses the second of the two).
        Err(error) if error.kind() == ErrorKind::AlreadyExists => load_or_create_id(path),
        Err(error) => Err(io(error)),
    }
}

/// A node's registry entry (`<prefix>/nodes/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's id (also the key's last segment).
    pub id: NodeId,
    /// Where other nodes reach it (`[node] peer`), if configured.
    pub peer: Option<SocketAddr>,
    /// The branchgate version it runs.
    pub version: String,
    /// When it started, in seconds since the Unix epoch.
    pub started_at: u64,
}

/// Why a registry entry or an acknowledgement could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source}")]
pub struct BadValue {
    /// The key.
    pub key: String,
    /// What is wrong with its value.
    pub source: serde_json::Error,
}

impl NodeRecord {
    /// The entry of this process, starting now.
    pub fn new(id: NodeId, peer: Option<SocketAddr>) -> NodeRecord {
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        NodeRecord {
            id,
            peer,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at,
        }
    }

    /// The value written to etcd.
    pub fn encode(&self) -> String {
        // A struct of strings and numbers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The entry read from `key`.
    pub fn decode(key: &str, value: &[u8]) -> Result<NodeRecord, BadValue> {
        serde_json::from_slice(value).map_err(|source| BadValue {
            key: key.to_owned(),
            source,
        })
    }
}

/// A node's acknowledgement (`<prefix>/acks/<id>`): the newest etcd revision of the catalog
/// it has dealt with, and whether it applied it or its reload guard refused it. A refusal is
/// acknowledged too, so that a `role` command waiting for the node learns it at once rather
/// than at its timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The catalog revision.
    pub revision: i64,
    /// `None`: the catalog of that revision is in force. `Some(why)`: the node kept the one it
    /// had (the reload guard refused the new one, or it is not a valid catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl Ack {
    /// The value written to etcd.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The acknowledgement read from `key`.
    pub fn decode(key: &str, value: &[u8]) -> Result<Ack, BadValue> {
        serde_json::from_slice(value).map_err(|source| BadValue {
            key: key.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_key_segments() {
        for good in ["a", "node-1", "eu-west-1.router_2", &"x".repeat(64)] {
            assert_eq!(good.parse::<NodeId>().expect(good).as_str(), good);
        }
        for bad in ["", "a/b", "a b", ".", "..", "ü", &"x".repeat(65)] {
            assert_eq!(
                bad.parse::<NodeId>(),
                Err(BadNodeId(bad.to_owned())),
                "{bad}"
            );
        }
        let generated = NodeId::generate();
        assert!(generated.as_str().starts_with("node-"), "{generated}");
        assert_eq!(generated.as_str().len(), 5 + 16);
        assert_eq!(generated.as_str().parse::<NodeId>(), Ok(generated.clone()));
        assert_ne!(generated, NodeId::generate());
    }

    #[test]
    fn the_id_file_is_created_once_and_read_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("node-id");
        let first = load_or_create_id(&path).expect("created");
        assert_eq!(
            std::fs::read_to_string(&path).expect("written"),
            format!("{first}\n")
        );
        assert_eq!(load_or_create_id(&path).expect("read back"), first);
        std::fs::write(&path, "  edge-7 \n").expect("write");
        assert_eq!(
            load_or_create_id(&path).expect("hand-written").as_str(),
            "edge-7"
        );
        std::fs::write(&path, "a/b\n").expect("write");
        let error = load_or_create_id(&path).expect_err("malformed");
        assert!(error.to_string().contains("remove the file"), "{error}");
    }

    #[test]
    fn registry_values_round_trip_and_read_leniently() {
        let record = NodeRecord {
            id: "n1".parse().expect("id"),
            peer: Some("10.0.0.1:7000".parse().expect("addr")),
            version: "0.1.0".into(),
            started_at: 1_700_000_000,
        };
        let text = record.encode();
        assert_eq!(
            text,
            r#"{"id":"n1","peer":"10.0.0.1:7000","version":"0.1.0","started_at":1700000000}"#
        );
        assert_eq!(
            NodeRecord::decode("k", text.as_bytes()).expect("decode"),
            record
        );
        let later = r#"{"id":"n2","peer":null,"version":"9","started_at":1,"zone":"eu"}"#;
        let read = NodeRecord::decode("k", later.as_bytes()).expect("unknown fields ignored");
        assert_eq!((read.id.as_str(), read.peer), ("n2", None));
        let bad = NodeRecord::decode("/p/nodes/x", br#"{"id":"a/b"}"#).expect_err("bad id");
        assert!(bad.to_string().starts_with("/p/nodes/x: "), "{bad}");

        let applied = Ack {
            revision: 42,
            refused: None,
        };
        assert_eq!(applied.encode(), r#"{"revision":42}"#);
        let refused = Ack {
            revision: 43,
            refused: Some("removes every branch (2 of 2)".into()),
        };
        assert_eq!(
            refused.encode(),
            r#"{"revision":43,"refused":"removes every branch (2 of 2)"}"#
        );
        for ack in [applied, refused] {
            assert_eq!(Ack::decode("k", ack.encode().as_bytes()).expect("ack"), ack);
        }
        assert!(Ack::decode("k", b"42").is_err());
    }
}
