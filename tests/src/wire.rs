//! A minimal MQTT 3.1.1 client over a blocking socket, for load generation
//! in benchmarks, where the generator shares the machine with what it
//! measures and so must cost little: QoS 1 publishes are written many to a
//! write, and a subscriber acknowledges all the messages of one read with one
//! write. Not a general client: no reconnect, no keep-alive (it is 0), no
//! QoS 2, loopback only. [`drive`] runs a load through a flow with them;
//! [`cpu_ns`] reads what a process's threads spent.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// The rule the MQTT benchmarks run: JSON telemetry on
/// `bench/<device>/telemetry` → clean-readings → threshold-alert → an alert
/// for every reading (its text names the reading's value, which [`drive`]
/// reads back as the message id).
pub const BENCH_RULE: &str = r#"
topics = ["bench/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 0.0, level = "critical" }] }
"#;

/// Nanoseconds on CPU of the threads of `pid` that `pick` (given the thread
/// id and name) selects, from the first field of each thread's schedstat.
pub fn cpu_ns(pid: &str, pick: impl Fn(&str, &str) -> bool) -> f64 {
    schedstat_field(pid, 0, pick)
}

/// Times the threads of `pid` that `pick` selects were put on a CPU (the
/// third field of schedstat): about one per wake-up for a thread that
/// sleeps between bursts of work.
pub fn runs(pid: &str, pick: impl Fn(&str, &str) -> bool) -> f64 {
    schedstat_field(pid, 2, pick)
}

fn schedstat_field(pid: &str, field: usize, pick: impl Fn(&str, &str) -> bool) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            pick(&tid, comm.trim()).then_some(())?;
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            stat.split_whitespace().nth(field)?.parse::<f64>().ok()
        })
        .sum()
}

/// Publishes `n` messages (ids 1..=n) on `<prefix>/d<id % 16>/telemetry` at
/// `rate` per second (0: as fast as the broker takes them, 100 in flight) and
/// times the outputs on `out_filter`, with these clients on threads of
/// their own (named `load…`): the publisher writes every message that is due
/// and fits the window in one write, the receiver acknowledges each read's
/// messages in one write.
pub fn drive(
    port: u16,
    prefix: &str,
    out_filter: &str,
    n: usize,
    rate: u64,
) -> (Vec<Option<Instant>>, Vec<Option<Instant>>) {
    const WINDOW: usize = 100;
    let got: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n + 1]));
    let stop = Arc::new(AtomicBool::new(false));

    let mut rx = connect(port, &format!("bench-rx-{}", crate::free_port())).unwrap();
    subscribe(&mut rx, out_filter).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let receiver = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::Builder::new()
            .name("load-rx".into())
            .spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let mut filled = 0;
                let mut acks = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if filled == buf.len() {
                        buf.resize(buf.len() * 2, 0);
                    }
                    match rx.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(k) => filled += k,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue;
                        }
                        Err(_) => break,
                    }
                    let now = Instant::now();
                    let (packets, used) = packets(&buf[..filled]);
                    {
                        let mut g = got.lock().unwrap();
                        for (pkid, payload) in packets.iter().filter_map(Packet::publish) {
                            encode_puback(&mut acks, pkid);
                            let text = String::from_utf8_lossy(payload);
                            if let Some(id) = text
                                .split("temperature ")
                                .nth(1)
                                .and_then(|t| t.split(' ').next())
                                .and_then(|v| v.parse::<usize>().ok())
                                && id < g.len()
                                && g[id].is_none()
                            {
                                g[id] = Some(now);
                            }
                        }
                    }
                    buf.copy_within(used..filled, 0);
                    filled -= used;
                    if !acks.is_empty() {
                        if rx.write_all(&acks).is_err() {
                            break;
                        }
                        acks.clear();
                    }
                }
                disconnect(&mut rx);
            })
            .unwrap()
    };

    let mut tx = connect(port, &format!("bench-tx-{}", crate::free_port())).unwrap();
    let in_flight = Arc::new((Mutex::new(0usize), std::sync::Condvar::new()));
    let acker = {
        let (mut acks, in_flight) = (tx.try_clone().unwrap(), in_flight.clone());
        std::thread::Builder::new()
            .name("load-ack".into())
            .spawn(move || {
                let mut buf = vec![0u8; 1 << 14];
                let mut filled = 0;
                while let Ok(k) = acks.read(&mut buf[filled..]) {
                    if k == 0 {
                        break;
                    }
                    filled += k;
                    let (packets, used) = packets(&buf[..filled]);
                    let acked = packets.iter().filter(|p| p.kind == PUBACK).count();
                    buf.copy_within(used..filled, 0);
                    filled -= used;
                    let (count, freed) = &*in_flight;
                    *count.lock().unwrap() -= acked;
                    freed.notify_one();
                }
            })
            .unwrap()
    };
    let mut sent = vec![None; n + 1];
    let mut batch = Vec::new();
    let start = Instant::now();
    let due = |id: usize| start + Duration::from_secs_f64((id - 1) as f64 / rate as f64);
    let mut id = 1;
    while id <= n {
        let room = {
            let (count, freed) = &*in_flight;
            let mut c = count.lock().unwrap();
            while *c >= WINDOW {
                c = freed.wait(c).unwrap();
            }
            WINDOW - *c
        };
        if rate > 0 {
            std::thread::sleep(due(id).saturating_duration_since(Instant::now()));
        }
        let now = Instant::now();
        batch.clear();
        let first = id;
        while id <= n && id - first < room && (rate == 0 || due(id) <= now) {
            let payload = format!(r#"{{"metric":"temperature","value":{id},"unit":"C"}}"#);
            let pkid = ((id - 1) % usize::from(u16::MAX) + 1) as u16;
            encode_publish(
                &mut batch,
                &format!("{prefix}/d{}/telemetry", id % 16),
                pkid,
                payload.as_bytes(),
            );
            sent[id] = Some(now);
            id += 1;
        }
        *in_flight.0.lock().unwrap() += id - first;
        tx.write_all(&batch).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.lock().unwrap().iter().skip(1).any(Option::is_none) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    disconnect(&mut tx);
    let _ = acker.join();
    let _ = receiver.join();
    let g = got.lock().unwrap().clone();
    (sent, g)
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
