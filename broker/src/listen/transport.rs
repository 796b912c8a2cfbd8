//! The byte pipe a session runs over, so one state machine serves TCP, TLS
//! and WebSocket alike.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read size per syscall: big enough that a busy publisher's pipelined
/// packets arrive in one read.
pub const READ_CHUNK: usize = 64 * 1024;

pub trait Transport: Send + 'static {
    /// Appends what is available to `buf`; `Ok(0)` means the peer closed.
    /// Must be cancel-safe: it is raced against other events.
    fn read_into(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;

    fn write_all(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Any byte stream: TCP or TLS.
pub struct StreamTransport<S>(pub S);

impl<S> Transport for StreamTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        self.0.read_buf(buf).await
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data).await?;
        self.0.flush().await
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}
