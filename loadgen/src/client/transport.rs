//! The byte stream under a connection: TCP, plain or TLS, optionally from a chosen source IP.
//!
//! Binding each connection to one of many loopback addresses (127.0.0.0/8 is all local) lifts
//! the limit of one source address: about 28k ephemeral ports towards one server port.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use branchgate::buf::ReadBuf;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::tls::TlsStream;
use super::ClientError;

/// A connection's stream.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP (`sslmode=disable`).
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

impl Transport {
    /// Reads into `dst`'s free space; 0 at the end of the stream. Not cancel-safe.
    pub async fn read(&mut self, dst: &mut ReadBuf) -> Result<usize, ClientError> {
        match self {
            Transport::Plain(tcp) => Ok(dst.fill_from(tcp).await?),
            Transport::Tls(tls) => tls.read(dst).await,
        }
    }

    /// Sends all of `buf`, leaving it as it was (its allocation is lent to the kernel and
    /// returned).
    pub async fn write_all(&mut self, buf: &mut Vec<u8>) -> Result<(), ClientError> {
        match self {
            Transport::Plain(tcp) => {
                let owned = std::mem::take(buf);
                let (result, owned) = tcp.write_all(owned).await;
                *buf = owned;
                result?;
                Ok(())
            }
            Transport::Tls(tls) => tls.write_all(buf).await,
        }
    }

    /// Ends TLS with close_notify; plain TCP needs nothing (dropping closes the socket).
    pub async fn close(&mut self) {
        if let Transport::Tls(tls) = self {
            tls.close().await;
        }
    }

    /// Frees buffers of a connection that will only be written to from now on.
    pub fn shrink(&mut self) {
        if let Transport::Tls(tls) = self {
            tls.shrink();
        }
    }
}

impl AsRawFd for Transport {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Transport::Plain(tcp) => tcp.as_raw_fd(),
            Transport::Tls(tls) => tls.as_raw_fd(),
        }
    }
}

/// Opens a TCP connection to `addr`, from `source` (any port) when given, with TCP_NODELAY.
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect_addr(addr).await?,
        Some(source) => connect_from(addr, source).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_from(addr: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    // Pick the port at connect() time, by the whole 4-tuple, rather than at bind() time, where
    // it would have to be unique per source address across all servers.
    set_bind_address_no_port(&socket);
    socket.bind(&SocketAddr::new(source, 0).into())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable(false).await?;
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    match SockRef::from(&fd).take_error()? {
        Some(error) => Err(error),
        None => Ok(stream),
    }
}

fn set_bind_address_no_port(socket: &Socket) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and a pointer to a c_int with its size, as setsockopt expects.
    // Failure (an old kernel) only means ports are chosen at bind() time.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> monoio::FusionRuntime<
        monoio::time::TimeDriver<monoio::IoUringDriver>,
        monoio::time::TimeDriver<monoio::LegacyDriver>,
    > {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
    }

    #[test]
    fn connects_from_a_chosen_loopback_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let source: IpAddr = "127.0.0.7".parse().expect("ip");
        runtime().block_on(async move {
            let stream = tcp_connect(addr, Some(source)).await.expect("connect");
            let (_, peer) = listener.accept().expect("accept");
            assert_eq!(peer.ip(), source);
            assert!(stream.nodelay().expect("nodelay"));
            let stream = tcp_connect(addr, None).await.expect("connect");
            drop(stream);
        });
    }

    #[test]
    fn refused_connection_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        runtime().block_on(async move {
            let source = Some("127.0.0.9".parse().expect("ip"));
            let error = tcp_connect(addr, source)
                .await
                .expect_err("nothing listens");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
            assert!(tcp_connect(addr, None).await.is_err());
        });
    }
}
