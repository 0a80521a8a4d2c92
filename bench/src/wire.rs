//! Wire fixtures: the first packet a libpq client sends, and what a backend streams back.

use branchgate::protocol::backend::{COMMAND_COMPLETE, DATA_ROW, READY_FOR_QUERY, ROW_DESCRIPTION};
use branchgate::protocol::startup::PROTOCOL_3_0;

/// The parameters psql 17 sends when told `user`, `dbname`, `options` and an encoding.
pub const LIBPQ_STARTUP_PARAMS: [(&str, &str); 5] = [
    ("user", "my.dotted.role.branch_x|replica"),
    ("database", "shop"),
    ("application_name", "psql"),
    ("client_encoding", "UTF8"),
    (
        "options",
        "-c statement_timeout=5000 -c search_path=app,public",
    ),
];

/// Rows in each result set of [`result_set_stream`]: a typical page of a point/range query.
pub const ROWS_PER_RESULT: usize = 20;

/// A StartupMessage (F), protocol 3.0, with `params` in order.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = vec![0; 4];
    packet.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (name, value) in params {
        for s in [name, value] {
            packet.extend_from_slice(s.as_bytes());
            packet.push(0);
        }
    }
    packet.push(0);
    set_length(&mut packet, 0);
    packet
}

/// The StartupMessage of [`LIBPQ_STARTUP_PARAMS`].
pub fn libpq_startup() -> Vec<u8> {
    startup_message(&LIBPQ_STARTUP_PARAMS)
}

/// Backend frames for `SELECT id, name, balance ... LIMIT 20`, repeated until at least
/// `min_bytes`: RowDescription, [`ROWS_PER_RESULT`] DataRows, CommandComplete, ReadyForQuery.
/// Ends on a frame boundary.
pub fn result_set_stream(min_bytes: usize) -> Vec<u8> {
    let mut one = Vec::new();
    row_description(&mut one, &[("id", 20), ("name", 25), ("balance", 1700)]);
    for row in 0..ROWS_PER_RESULT {
        let id = (1000 + row).to_string();
        let name = format!("customer-{row:04}");
        data_row(&mut one, &[id.as_bytes(), name.as_bytes(), b"1234.50"]);
    }
    frame(&mut one, COMMAND_COMPLETE, |b| {
        b.extend_from_slice(b"SELECT 20\0")
    });
    frame(&mut one, READY_FOR_QUERY, |b| b.push(b'I'));
    one.repeat(min_bytes.div_ceil(one.len()))
}

/// Appends one tagged frame whose body `body` writes.
fn frame(buf: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.push(tag);
    buf.extend_from_slice(&[0; 4]);
    body(buf);
    set_length(buf, start + 1);
}

/// Writes the Int32 length at `at`, counting itself and everything after it.
fn set_length(buf: &mut [u8], at: usize) {
    let len = i32::try_from(buf.len() - at).expect("fixture frames are small");
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// RowDescription (B) of text columns `(name, type oid)`.
fn row_description(buf: &mut Vec<u8>, columns: &[(&str, u32)]) {
    frame(buf, ROW_DESCRIPTION, |b| {
        b.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for (i, (name, oid)) in columns.iter().enumerate() {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&16_384u32.to_be_bytes()); // table oid
            b.extend_from_slice(&(i as u16 + 1).to_be_bytes()); // attribute number
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&(-1i16).to_be_bytes()); // type size: variable
            b.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
            b.extend_from_slice(&0u16.to_be_bytes()); // text format
        }
    });
}

/// DataRow (B) of non-null text values.
fn data_row(buf: &mut Vec<u8>, values: &[&[u8]]) {
    frame(buf, DATA_ROW, |b| {
        b.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for value in values {
            b.extend_from_slice(&(value.len() as u32).to_be_bytes());
            b.extend_from_slice(value);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchgate::protocol::frame::Frames;
    use branchgate::protocol::startup::{check_startup, parse_startup, StartupPacket};

    #[test]
    fn startup_message_bytes() {
        let packet = startup_message(&[("user", "a.b")]);
        assert_eq!(packet, b"\x00\x00\x00\x12\x00\x03\x00\x00user\0a.b\0\0");
    }

    #[test]
    fn libpq_startup_parses_back() {
        let packet = libpq_startup();
        assert_eq!(check_startup(&packet), Ok(Some(packet.len())));
        let Ok(StartupPacket::Startup(message)) = parse_startup(&packet) else {
            panic!("not a StartupMessage");
        };
        assert!(message.params().eq(LIBPQ_STARTUP_PARAMS));
    }

    #[test]
    fn result_set_bytes() {
        let mut one = Vec::new();
        frame(&mut one, READY_FOR_QUERY, |b| b.push(b'I'));
        data_row(&mut one, &[b"7"]);
        assert_eq!(
            one,
            b"Z\x00\x00\x00\x05ID\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x017"
        );
    }

    #[test]
    fn result_set_stream_is_whole_frames() {
        let stream = result_set_stream(64 * 1024);
        assert!(stream.len() >= 64 * 1024);
        let mut frames = Frames::new(&stream, 1024);
        let mut counts = [0usize; 256];
        for frame in frames.by_ref() {
            counts[usize::from(frame.expect("valid frame").0.tag)] += 1;
        }
        assert_eq!(frames.consumed(), stream.len());
        let results = counts[usize::from(READY_FOR_QUERY)];
        assert!(results > 0);
        assert_eq!(counts[usize::from(ROW_DESCRIPTION)], results);
        assert_eq!(counts[usize::from(COMMAND_COMPLETE)], results);
        assert_eq!(counts[usize::from(DATA_ROW)], results * ROWS_PER_RESULT);
    }
}
