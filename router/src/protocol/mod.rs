//! PostgreSQL wire protocol codec (version 3.0), per
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>.
//!
//! Parsers borrow from the read buffer and never allocate; writers append to a reused buffer.
//! Only the messages routing, authentication and pooling need are decoded; everything else is
//! located with [`frame`] and forwarded as raw bytes. Message docs name their direction:
//! (F) frontend, sent by the client; (B) backend, sent by the server.
//!
//! - [`reader`]: the byte cursor every parser uses, and [`DecodeError`].
//! - [`frame`]: finding complete tagged frames in a buffer.
//! - [`startup`]: the untagged first packet: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
//! - [`frontend`]: client messages we decode, and frontend type bytes.
//! - [`backend`]: server messages we decode, and backend type bytes.
//! - [`write`](mod@write): writers for the messages the router sends either way.
//! - [`sqlstate`]: SQLSTATE codes the router reports.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod reader;
pub mod sqlstate;
pub mod startup;
pub mod write;

pub use frame::{FrameError, FrameHeader};
pub use reader::{DecodeError, Reader};
pub use sqlstate::SqlState;
