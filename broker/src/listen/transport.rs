//! The byte pipe a session runs over, so one state machine serves TCP, TLS
//! and WebSocket alike.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read size per syscall: big enough that a busy publisher's pipelined
/// packets arrive in one read.
pub const READ_CHUNK: usize = 64 * 1024;

pub trait Transport: Send + 'static {
    /// An idle connection over this transport may be parked outside a task
    /// (`session::park`). Plain TCP only: the parker watches the socket's
    /// readiness, and TLS or WebSocket can hold decoded bytes the socket
    /// knows nothing about.
    const PARKS: bool = false;

    /// Appends what is available to `buf`; `Ok(0)` means the peer closed.
    /// Must be cancel-safe: it is raced against other events.
    fn read_into(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;

    fn write_all(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Says goodbye within [`CLOSE_DEADLINE`], whatever the peer does: shuts
    /// down the write side (TLS close_notify, WebSocket Close) and, with
    /// `linger`, reads and discards what the client still sends until it
    /// closes too. Closing a socket with unread input makes the kernel send
    /// a reset, which destroys the DISCONNECT or CONNACK just written before
    /// the client reads it; lingering lets the client learn why it was
    /// closed. A peer that stops reading cannot hold the task past the
    /// deadline (a TLS shutdown otherwise waits for its flush forever).
    fn close(&mut self, linger: bool) -> impl Future<Output = ()> + Send;
}

/// Longest time a connection spends closing.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(1);
/// Most input discarded while lingering.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// Reads and drops input until EOF, an error or [`LINGER_BYTES`].
async fn discard<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = vec![0u8; 8192];
    let mut total = 0;
    while total < LINGER_BYTES {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

async fn shut_and_linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, linger: bool) {
    let _ = tokio::time::timeout(CLOSE_DEADLINE, async {
        let _ = s.shutdown().await;
        if linger {
            discard(s).await;
        }
    })
    .await;
}

/// Plain TCP. Waits for readability *before* reserving the read buffer, so
/// an idle connection holds no read buffer at all (the session drops an
/// empty one after each batch): idle connections cost bytes, not 64 KiB.
/// Reads start small and go to [`READ_CHUNK`] once a read fills its space,
/// so a chatty client gets big reads and a quiet one small allocations.
pub struct TcpTransport {
    stream: TcpStream,
    busy: bool,
}

impl TcpTransport {
    pub fn new(stream: TcpStream) -> Self {
        TcpTransport {
            stream,
            busy: false,
        }
    }

    /// The socket without its registration in tokio's reactor, for the
    /// parker to hold: that registration is a quarter of what an idle
    /// connection costs, and the parker watches parked sockets itself.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        self.stream.into_std()
    }

    /// Registers a socket the parker held with tokio's reactor again. Must
    /// run inside the runtime.
    pub fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        TcpStream::from_std(stream).map(Self::new)
    }
}

impl Transport for TcpTransport {
    const PARKS: bool = true;

    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            self.stream.readable().await?;
            // Readiness and try_read never spend tokio's cooperative budget:
            // a client whose socket always has data would keep its worker
            // thread and starve every connection queued there. Spent before
            // reading, so a cancelled call has read nothing (cancel safety).
            tokio::task::consume_budget().await;
            let want = if self.busy { READ_CHUNK } else { 2048 };
            if buf.capacity() - buf.len() < want / 4 {
                buf.reserve(want);
            }
            let space = buf.capacity() - buf.len();
            // A read that did not fill its space emptied the socket: its
            // readiness is cleared now (by answering WouldBlock to tokio),
            // not by one more read that finds nothing. Edge-triggered
            // epoll reports what arrives after this read anew.
            let stream = &self.stream;
            let mut short = None;
            let r = stream.try_io(tokio::io::Interest::READABLE, || {
                let n = stream.try_read_buf(buf)?;
                if n > 0 && n < space {
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            if let Some(n) = short {
                self.busy = false;
                return Ok(n);
            }
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness was stale: give the buffer back before
                    // waiting, or every idle connection would keep one.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                    continue;
                }
                Ok(n) => {
                    self.busy = n == space;
                    return Ok(n);
                }
                r => return r,
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await
    }

    async fn close(&mut self, linger: bool) {
        shut_and_linger(&mut self.stream, linger).await;
    }
}

/// Any other byte stream (TLS). Its reads need buffer space up front; TLS
/// keeps its own record buffers anyway, so a smaller first reserve is used.
pub struct StreamTransport<S>(pub S);

impl<S> Transport for StreamTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let spare = buf.capacity() - buf.len();
        if spare < 1024 {
            // Grow towards READ_CHUNK only while data keeps coming.
            buf.reserve(if buf.capacity() == 0 {
                4096
            } else {
                READ_CHUNK
            });
        }
        self.0.read_buf(buf).await
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data).await?;
        self.0.flush().await
    }

    async fn close(&mut self, linger: bool) {
        shut_and_linger(&mut self.0, linger).await;
    }
}

/// A connection whose socket was lost while it had no task (the reactor
/// refused it again): every read and write fails, so the connection ends
/// as lost through its ordinary path (will, session expiry, counters).
pub struct Severed;

impl Transport for Severed {
    async fn read_into(&mut self, _buf: &mut BytesMut) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::NotConnected))
    }

    async fn write_all(&mut self, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::NotConnected))
    }

    async fn close(&mut self, _linger: bool) {}
}
