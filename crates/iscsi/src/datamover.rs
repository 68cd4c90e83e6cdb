//! The datamover layer between iSCSI and its transport (the seed's iSER
//! datamover): the connection reads and writes whole PDUs through it and
//! never touches a socket. [`TcpDatamover`] is the default; an iSER
//! datamover over RDMA verbs would implement the same traits.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::pdu::{Digests, Pdu, PduError};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The PDU is bad; `header` is its basic header segment when the stream
    /// could go past it (a data digest error).
    #[error("{error}")]
    Pdu { error: PduError, header: Option<[u8; 48]> },
}

pub trait PduReader: Send + 'static {
    /// The next PDU, with the digests and the data segment limit in force.
    fn read_pdu(&mut self, digests: Digests, max_data: usize) -> impl Future<Output = Result<Pdu, ReadError>> + Send;
}

pub trait PduWriter: Send + 'static {
    /// Sends PDUs in order.
    fn write_pdus(&mut self, pdus: &[Pdu], digests: Digests) -> impl Future<Output = io::Result<()>> + Send;
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

pub trait Datamover: Send + 'static {
    type Reader: PduReader;
    type Writer: PduWriter;
    /// The peer's address, for logs.
    fn peer(&self) -> String;
    fn split(self) -> (Self::Reader, Self::Writer);
}

/// iSCSI over TCP.
pub struct TcpDatamover {
    stream: TcpStream,
}

impl TcpDatamover {
    pub fn new(stream: TcpStream) -> TcpDatamover {
        let _ = stream.set_nodelay(true);
        TcpDatamover { stream }
    }
}

pub struct TcpReader {
    half: OwnedReadHalf,
    buffer: BytesMut,
}

pub struct TcpWriter {
    half: OwnedWriteHalf,
    buffer: BytesMut,
}

impl Datamover for TcpDatamover {
    type Reader = TcpReader;
    type Writer = TcpWriter;

    fn peer(&self) -> String {
        self.stream.peer_addr().map(|address| address.to_string()).unwrap_or_default()
    }

    fn split(self) -> (TcpReader, TcpWriter) {
        let (read, write) = self.stream.into_split();
        (
            TcpReader { half: read, buffer: BytesMut::with_capacity(256 * 1024) },
            TcpWriter { half: write, buffer: BytesMut::with_capacity(256 * 1024) },
        )
    }
}

impl PduReader for TcpReader {
    async fn read_pdu(&mut self, digests: Digests, max_data: usize) -> Result<Pdu, ReadError> {
        loop {
            let header: Option<[u8; 48]> = self.buffer.get(..48).map(|bytes| bytes.try_into().expect("48 bytes"));
            match Pdu::take(&mut self.buffer, digests, max_data) {
                Ok(Some(pdu)) => return Ok(pdu),
                Ok(None) => {}
                Err(error) => {
                    let header = error.reject_reason().and(header);
                    return Err(ReadError::Pdu { error, header });
                }
            }
            self.buffer.reserve(64 * 1024);
            if self.half.read_buf(&mut self.buffer).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }
}

impl PduWriter for TcpWriter {
    async fn write_pdus(&mut self, pdus: &[Pdu], digests: Digests) -> io::Result<()> {
        self.buffer.clear();
        for pdu in pdus {
            pdu.encode(digests, &mut self.buffer);
        }
        self.half.write_all(&self.buffer).await
    }

    async fn shutdown(&mut self) {
        let _ = self.half.shutdown().await;
    }
}
