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
    socket: Socket,
    busy: bool,
}

/// A socket resumed from the parker is used directly until it would block,
/// and only then registered with tokio's reactor: a client that wakes for
/// one message and its acknowledgement is served with a read and a write,
/// without a registration (and a reactor turn before the first byte moves)
/// that the next park would undo.
enum Socket {
    Loose(std::net::TcpStream),
    Registered(TcpStream),
    /// Only while changing from the one to the other.
    Gone,
}

impl TcpTransport {
    pub fn new(stream: TcpStream) -> Self {
        TcpTransport {
            socket: Socket::Registered(stream),
            busy: false,
        }
    }

    /// A socket the parker held (non-blocking, registered nowhere).
    pub fn loose(stream: std::net::TcpStream) -> Self {
        TcpTransport {
            socket: Socket::Loose(stream),
            busy: false,
        }
    }

    /// The socket without its registration in tokio's reactor, for the
    /// parker to hold: that registration is a quarter of what an idle
    /// connection costs, and the parker watches parked sockets itself.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self.socket {
            Socket::Loose(s) => Ok(s),
            Socket::Registered(s) => s.into_std(),
            Socket::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Socket {
    /// The socket registered with the reactor (inside the runtime); a
    /// failure loses it, and the connection ends.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let Socket::Loose(_) = self
            && let Socket::Loose(s) = std::mem::replace(self, Socket::Gone)
        {
            match TcpStream::from_std(s) {
                Ok(s) => *self = Socket::Registered(s),
                Err(e) => {
                    tracing::warn!(error = %e, "a resumed connection's socket could not be registered with the reactor; the connection is closed");
                    return Err(e);
                }
            }
        }
        match self {
            Socket::Registered(s) => Ok(s),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// Space to read into, reserved only now that there is input.
fn reserve_read(busy: bool, buf: &mut BytesMut) -> usize {
    let want = if busy { READ_CHUNK } else { 2048 };
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
    buf.capacity() - buf.len()
}

impl Transport for TcpTransport {
    const PARKS: bool = true;

    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if let Socket::Loose(s) = &self.socket {
            // Resumed by the parker (input, or a wake): read at once.
            let space = reserve_read(self.busy, buf);
            let len = buf.len();
            // Zeroed, not uninitialised: `Read` wants initialised bytes,
            // and a couple of kilobytes cost nothing next to the syscall.
            buf.resize(len + space, 0);
            let r = std::io::Read::read(&mut &*s, &mut buf[len..]);
            buf.truncate(len + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(n) => {
                    self.busy = n == space;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing yet: wait through the reactor from now on.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let stream = self.socket.registered()?;
        loop {
            stream.readable().await?;
            // Readiness and try_read never spend tokio's cooperative budget:
            // a client whose socket always has data would keep its worker
            // thread and starve every connection queued there. Spent before
            // reading, so a cancelled call has read nothing (cancel safety).
            tokio::task::consume_budget().await;
            let space = reserve_read(self.busy, buf);
            // A read that did not fill its space emptied the socket: its
            // readiness is cleared now (by answering WouldBlock to tokio),
            // not by one more read that finds nothing. Edge-triggered
            // epoll reports what arrives after this read anew.
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

    async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        if let Socket::Loose(s) = &self.socket {
            while !data.is_empty() {
                match std::io::Write::write(&mut &*s, data) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => data = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if data.is_empty() {
                return Ok(());
            }
        }
        self.socket.registered()?.write_all(data).await
    }

    async fn close(&mut self, linger: bool) {
        if let Ok(s) = self.socket.registered() {
            shut_and_linger(s, linger).await;
        }
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

/// A connection whose socket was lost on its way to the parker (the
/// reactor would not let go of it): every read and write fails, so the
/// connection ends as lost through its ordinary path (will, session
/// expiry, counters).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connected pair: the broker's side as the parker hands it over
    /// (std, non-blocking), and the client's side (blocking std).
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (server, _) = l.accept().expect("accept");
        server.set_nonblocking(true).expect("non-blocking");
        (server, client)
    }

    #[tokio::test]
    async fn a_loose_socket_serves_what_is_there_and_registers_only_to_wait() {
        let (server, mut client) = pair();
        client.write_all(b"first").expect("client write");
        // The bytes are in the socket before the transport looks.
        std::thread::sleep(Duration::from_millis(20));
        let mut t = TcpTransport::loose(server);
        let mut buf = BytesMut::new();
        assert_eq!(t.read_into(&mut buf).await.expect("read"), 5);
        assert_eq!(&buf[..], b"first");
        assert!(
            matches!(t.socket, Socket::Loose(_)),
            "read without registering"
        );
        t.write_all(b"ack").await.expect("write");
        assert!(
            matches!(t.socket, Socket::Loose(_)),
            "written without registering"
        );
        let mut got = [0u8; 3];
        client.read_exact(&mut got).expect("client read");
        assert_eq!(&got, b"ack");

        // Nothing to read: it must wait, through the reactor.
        buf.clear();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            client.write_all(b"later").expect("client write");
            client
        });
        let n = tokio::time::timeout(Duration::from_secs(5), t.read_into(&mut buf))
            .await
            .expect("woken by the reactor")
            .expect("read");
        assert_eq!(&buf[..n], b"later");
        assert!(matches!(t.socket, Socket::Registered(_)));
        // And it can go back to the parker.
        let client = writer.join().expect("writer");
        let std = t.into_std().expect("out of the reactor");
        drop(client);
        let mut t = TcpTransport::loose(std);
        buf.clear();
        assert_eq!(
            t.read_into(&mut buf).await.expect("eof"),
            0,
            "the peer closed"
        );
    }
}
