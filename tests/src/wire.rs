//! A minimal MQTT 3.1.1 client over a blocking socket, for load generation
//! in benchmarks, where the generator shares the machine with what it
//! measures and so must cost little: QoS 1 publishes are written many to a
//! write, and a subscriber acknowledges all the messages of one read with one
//! write. Not a general client: no reconnect, no keep-alive (it is 0), no
//! QoS 2, loopback only.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// One control packet: its type (the high nibble of the first byte), its
/// flags (the low nibble) and what follows the length.
pub struct Packet<'a> {
    pub kind: u8,
    pub flags: u8,
    pub body: &'a [u8],
}

/// Packet types used here.
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;

impl<'a> Packet<'a> {
    /// A PUBLISH packet's packet id (0 at QoS 0) and payload.
    pub fn publish(&self) -> Option<(u16, &'a [u8])> {
        if self.kind != PUBLISH {
            return None;
        }
        let topic_len = usize::from(u16::from_be_bytes([
            *self.body.first()?,
            *self.body.get(1)?,
        ]));
        let mut at = 2 + topic_len;
        let pkid = if (self.flags >> 1) & 3 > 0 {
            at += 2;
            u16::from_be_bytes([*self.body.get(at - 2)?, *self.body.get(at - 1)?])
        } else {
            0
        };
        Some((pkid, self.body.get(at..)?))
    }
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            return;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn write_packet(s: &mut TcpStream, first: u8, body: &[u8]) -> io::Result<()> {
    let mut out = vec![first];
    put_len(&mut out, body.len());
    out.extend_from_slice(body);
    s.write_all(&out)
}

/// The whole packets at the front of `buf`, and how many bytes they take; a
/// packet cut off at the end stays for the next read.
pub fn packets(buf: &[u8]) -> (Vec<Packet<'_>>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    'next: while at < buf.len() {
        let mut len = 0usize;
        let mut shift = 0;
        let mut i = at + 1;
        loop {
            let Some(&b) = buf.get(i) else {
                break 'next;
            };
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let Some(body) = buf.get(i..i + len) else {
            break;
        };
        out.push(Packet {
            kind: buf[at] >> 4,
            flags: buf[at] & 0x0f,
            body,
        });
        at = i + len;
    }
    (out, at)
}

/// Connects to a broker on loopback with a clean session and waits for its
/// CONNACK.
pub fn connect(port: u16, client_id: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 0]);
    put_str(&mut body, client_id.as_bytes());
    write_packet(&mut s, 0x10, &body)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(io::Error::other(format!("connection refused: {ack:?}")));
    }
    Ok(s)
}

/// Subscribes to `filter` at QoS 1 and waits for the SUBACK.
pub fn subscribe(s: &mut TcpStream, filter: &str) -> io::Result<()> {
    let mut body = vec![0, 1];
    put_str(&mut body, filter.as_bytes());
    body.push(1);
    write_packet(s, 0x82, &body)?;
    let mut ack = [0u8; 5];
    s.read_exact(&mut ack)?;
    if ack[0] != 0x90 || ack[4] > 1 {
        return Err(io::Error::other(format!("subscription refused: {ack:?}")));
    }
    Ok(())
}

/// Appends a QoS 1 PUBLISH.
pub fn encode_publish(out: &mut Vec<u8>, topic: &str, pkid: u16, payload: &[u8]) {
    out.push(0x32);
    put_len(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends a PUBACK.
pub fn encode_puback(out: &mut Vec<u8>, pkid: u16) {
    out.extend_from_slice(&[0x40, 0x02]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Sends DISCONNECT and closes the socket.
pub fn disconnect(s: &mut TcpStream) {
    let _ = s.write_all(&[0xe0, 0x00]);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_split_at_whole_packets_and_publishes_decode() {
        let mut buf = Vec::new();
        encode_publish(&mut buf, "a/b", 7, &[b'x'; 200]);
        encode_puback(&mut buf, 9);
        let whole = buf.len();
        encode_publish(&mut buf, "c", 8, b"cut");
        let (ps, used) = packets(&buf[..buf.len() - 1]);
        assert_eq!(used, whole);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].publish(), Some((7, &[b'x'; 200][..])));
        assert_eq!((ps[1].kind, ps[1].body), (PUBACK, &[0, 9][..]));
        let (ps, used) = packets(&buf);
        assert_eq!((ps.len(), used), (3, buf.len()));
        assert_eq!(ps[2].publish(), Some((8, &b"cut"[..])));
    }
}
