//! The cancel key of a tokio-postgres client, which tokio-postgres keeps private: its
//! CancelRequest is written into a capturing stream and read back.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};
use tokio_postgres::Client;

/// CancelRequest: length 16, then the code 80877102.
pub const CANCEL_REQUEST_HEADER: [u8; 8] = [0x00, 0x00, 0x00, 0x10, 0x04, 0xd2, 0x16, 0x2e];

/// The cancel key (BackendKeyData) a tokio-postgres client was given. tokio-postgres keeps it
/// private, so its CancelRequest is written into a [`Capture`] stream and read back.
pub async fn cancel_key(client: &Client) -> (i32, u32) {
    let written = Arc::new(Mutex::new(Vec::new()));
    let capture = Capture {
        written: written.clone(),
        answered: false,
    };
    client
        .cancel_token()
        .cancel_query_raw(capture, PassThrough)
        .await
        .expect("write the CancelRequest into the capture");
    let bytes = written.lock().expect("capture lock").clone();
    assert!(bytes.len() >= 16, "no CancelRequest captured: {bytes:?}");
    let request = &bytes[bytes.len() - 16..];
    assert_eq!(request[..8], CANCEL_REQUEST_HEADER, "{bytes:?}");
    let pid = i32::from_be_bytes([request[8], request[9], request[10], request[11]]);
    let secret = u32::from_be_bytes([request[12], request[13], request[14], request[15]]);
    (pid, secret)
}

/// Answers `S` to an SSLRequest and records everything written to it.
struct Capture {
    written: Arc<Mutex<Vec<u8>>>,
    answered: bool,
}

impl AsyncRead for Capture {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.answered {
            self.answered = true;
            buf.put_slice(b"S");
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written
            .lock()
            .expect("capture lock")
            .extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl TlsStream for Capture {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// A "TLS" connector that leaves the stream as it is.
struct PassThrough;

impl TlsConnect<Capture> for PassThrough {
    type Stream = Capture;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Capture>>;

    fn connect(self, stream: Capture) -> Self::Future {
        std::future::ready(Ok(stream))
    }
}
