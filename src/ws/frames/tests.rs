//! Unit tests of `frames`, beside it.

use super::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::{CloseFrame, Frame};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn bytes(frame: Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame.format(&mut out).unwrap();
    out
}

fn masked(mut frame: Frame, mask: [u8; 4]) -> Frame {
    frame.header_mut().mask = Some(mask);
    frame
}

fn text(s: &str, fin: bool) -> Frame {
    Frame::message(s.as_bytes().to_vec(), OpCode::Data(Data::Text), fin)
}

fn binary(len: usize, fin: bool) -> Frame {
    let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
    Frame::message(data, OpCode::Data(Data::Binary), fin)
}

fn cont(s: &str, fin: bool) -> Frame {
    Frame::message(s.as_bytes().to_vec(), OpCode::Data(Data::Continue), fin)
}

fn close(code: u16, reason: &'static str) -> Frame {
    Frame::close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Everything observable after feeding.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    completed: usize,
    frames: u64,
    messages: u64,
    frame_boundary: bool,
    message_boundary: bool,
    close_seen: bool,
    close_code: Option<u16>,
    released: u64,
    violation: Option<FrameError>,
}

fn run(dir: Direction, max: u64, parts: &[&[u8]]) -> Result<Seen, FrameError> {
    let mut t = FrameTracker::new(dir, max);
    let mut completed = 0;
    for part in parts {
        completed += t.feed(part)?;
    }
    Ok(Seen {
        completed,
        frames: t.frames(),
        messages: t.messages(),
        frame_boundary: t.at_frame_boundary(),
        message_boundary: t.at_message_boundary(),
        close_seen: t.close_seen(),
        close_code: t.close_code(),
        released: t.released(),
        violation: t.violation(),
    })
}

/// Whole, byte by byte and every two-way split must agree.
fn check_splits(dir: Direction, max: u64, input: &[u8]) -> Result<Seen, FrameError> {
    let whole = run(dir, max, &[input]);
    let single: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(run(dir, max, &single), whole, "byte by byte");
    for i in 0..=input.len() {
        let (a, b) = input.split_at(i);
        assert_eq!(run(dir, max, &[a, b]), whole, "split at {i}");
    }
    whole
}

fn conversation(mask: Option<[u8; 4]>) -> Vec<u8> {
    let frames = [
        text("hello", true),
        binary(3, true),
        Frame::ping(b"p".to_vec()),
        Frame::pong(Vec::new()),
        text("", true),
        close(1000, "bye"),
    ];
    frames
        .into_iter()
        .flat_map(|f| bytes(if let Some(m) = mask { masked(f, m) } else { f }))
        .collect()
}

#[test]
fn server_to_client_unmasked() {
    let input = conversation(None);
    let seen = check_splits(Direction::ServerToClient, 1 << 20, &input).unwrap();
    assert_eq!(
        seen,
        Seen {
            completed: 6,
            frames: 6,
            messages: 3,
            frame_boundary: true,
            message_boundary: true,
            close_seen: true,
            close_code: Some(1000),
            released: input.len() as u64,
            violation: None,
        }
    );
}

#[test]
fn client_to_server_masked() {
    let input = conversation(Some(MASK));
    let seen = check_splits(Direction::ClientToServer, 1 << 20, &input).unwrap();
    assert_eq!((seen.frames, seen.messages), (6, 3));
    assert_eq!(seen.close_code, Some(1000));
}

#[test]
fn fragmented_message_with_ping() {
    let parts = [
        bytes(masked(text("hel", false), MASK)),
        bytes(masked(Frame::ping(b"x".to_vec()), MASK)),
        bytes(masked(cont("lo ", false), MASK)),
        bytes(masked(cont("world", true), MASK)),
    ];
    let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
    let expected_message_boundary = [false, false, false, true];
    for (part, &mb) in parts.iter().zip(&expected_message_boundary) {
        assert_eq!(t.feed(part), Ok(1));
        assert!(t.at_frame_boundary());
        assert_eq!(t.at_message_boundary(), mb);
    }
    assert_eq!((t.frames(), t.messages()), (4, 1));

    let all = parts.concat();
    let seen = check_splits(Direction::ClientToServer, 1024, &all).unwrap();
    assert_eq!((seen.frames, seen.messages), (4, 1));
}

#[test]
fn boundaries_mid_frame() {
    let frame = bytes(text("hello", true));
    let mut t = FrameTracker::new(Direction::ServerToClient, 1024);
    assert!(t.at_frame_boundary() && t.at_message_boundary());
    assert_eq!(t.feed(&frame[..1]), Ok(0)); // partial header
    assert!(!t.at_frame_boundary());
    assert_eq!(t.feed(&frame[1..4]), Ok(0)); // inside payload
    assert!(!t.at_frame_boundary() && !t.at_message_boundary());
    assert_eq!(t.feed(&frame[4..]), Ok(1));
    assert!(t.at_message_boundary());
}

#[test]
fn lengths_16_and_64_bit() {
    for len in [126, 300, 65535, 65536, 70_000] {
        let s2c = bytes(binary(len, true));
        let c2s = bytes(masked(binary(len, true), MASK));
        let mut t = FrameTracker::new(Direction::ServerToClient, 70_000);
        assert_eq!(t.feed(&s2c), Ok(1), "len {len}");
        let mut t = FrameTracker::new(Direction::ClientToServer, 70_000);
        assert_eq!(t.feed(&c2s), Ok(1), "len {len}");
    }
    // Every split of a 16-bit and a 64-bit frame, plus a frame after each.
    for len in [300, 70_000] {
        let input = [
            bytes(masked(binary(len, true), MASK)),
            bytes(masked(text("x", true), MASK)),
        ]
        .concat();
        let seen = check_splits(Direction::ClientToServer, 70_000, &input).unwrap();
        assert_eq!((seen.frames, seen.messages), (2, 2));
    }
}

#[test]
fn max_payload_limit() {
    let at = bytes(binary(100, true));
    let over = bytes(binary(101, true));
    assert_eq!(
        run(Direction::ServerToClient, 100, &[&at]).unwrap().frames,
        1
    );
    assert_eq!(
        check_splits(Direction::ServerToClient, 100, &over),
        Err(FrameError::TooLarge)
    );
    // Rejected on the header alone, before any payload arrives.
    let mut t = FrameTracker::new(Direction::ServerToClient, 100);
    assert_eq!(t.feed(&over[..2]), Err(FrameError::TooLarge));
    // 64-bit lengths too.
    let big = bytes(binary(70_000, true));
    let mut t = FrameTracker::new(Direction::ServerToClient, 69_999);
    assert_eq!(t.feed(&big[..10]), Err(FrameError::TooLarge));
}

#[test]
fn close_code_split_across_feeds() {
    let frame = bytes(masked(close(4321, "reason"), MASK));
    // Header is 6 bytes (2 + mask); the code is bytes 6 and 7.
    for i in 0..frame.len() {
        for j in i..frame.len() {
            let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
            assert_eq!(t.feed(&frame[..i]), Ok(0));
            assert_eq!(t.feed(&frame[i..j]), Ok(0));
            assert!(!t.close_seen());
            assert_eq!(t.feed(&frame[j..]), Ok(1));
            assert!(t.close_seen());
            assert_eq!(t.close_code(), Some(4321), "splits {i} {j}");
        }
    }
}

#[test]
fn close_without_code() {
    let empty = bytes(Frame::close(None));
    let seen = check_splits(Direction::ServerToClient, 1024, &empty).unwrap();
    assert!(seen.close_seen);
    assert_eq!(seen.close_code, None);
    // A one-byte close body is invalid (RFC 6455 §5.5.1) but carries no code either way.
    let one = [0x88, 0x01, 0x03];
    let seen = run(Direction::ServerToClient, 1024, &[&one]).unwrap();
    assert_eq!((seen.close_seen, seen.close_code), (true, None));
}

#[test]
fn bytes_to_frame_end_stops_exactly_at_boundaries() {
    let mut stream = bytes(masked(binary(70_000, true), [9, 9, 9, 9]));
    stream.extend(conversation(Some([1, 2, 3, 4])));
    let mut t = FrameTracker::new(Direction::ClientToServer, u64::MAX);
    let mut rest = &stream[..];
    let mut boundaries = 0;
    while !rest.is_empty() {
        let n = (t.bytes_to_frame_end() as usize).min(rest.len());
        assert!(n > 0);
        t.feed(&rest[..n]).unwrap();
        rest = &rest[n..];
        if t.at_frame_boundary() {
            boundaries += 1;
        }
    }
    assert_eq!(
        boundaries as u64,
        t.frames(),
        "every frame end was hit exactly"
    );
}

#[test]
fn feed_inspect_reassembles_masked_messages_across_splits() {
    let mut stream = bytes(masked(text("hel", false), [1, 2, 3, 4]));
    stream.extend(bytes(masked(Frame::ping(vec![9]), [5, 6, 7, 8])));
    stream.extend(bytes(masked(cont("lo world", true), [9, 8, 7, 6])));
    stream.extend(bytes(masked(binary(0, true), [1, 1, 1, 1])));
    for cut in 0..stream.len() {
        let mut t = FrameTracker::new(Direction::ClientToServer, u64::MAX);
        let mut msg = Vec::new();
        let mut done = Vec::new();
        for part in [&stream[..cut], &stream[cut..]] {
            t.feed_inspect(part, |p| {
                p.unmask_into(&mut msg);
                if p.message_end {
                    done.push((p.opcode, std::mem::take(&mut msg)));
                }
            })
            .unwrap();
        }
        assert_eq!(
            done,
            [(1, b"hello world".to_vec()), (2, vec![])],
            "cut {cut}"
        );
    }
}

#[test]
fn rsv_bits_pass_through() {
    let mut f = text("compressed", true);
    f.header_mut().rsv1 = true;
    let seen = check_splits(Direction::ServerToClient, 1024, &bytes(f)).unwrap();
    assert_eq!(seen.messages, 1);
}

fn expect_err(dir: Direction, max: u64, input: &[u8], err: FrameError) {
    assert_eq!(check_splits(dir, max, input), Err(err));
    let mut t = FrameTracker::new(dir, max);
    assert_eq!(t.feed(input), Err(err));
    // The error sticks, even for input that would be fine on its own.
    assert_eq!(t.feed(&bytes(text("ok", true))), Err(err));
    assert_eq!(t.error(), Some(err));
    assert!(!t.at_frame_boundary());
}

/// A broken rule the endpoints decide on: the frame is relayed whole (released), the
/// violation is noted, every split agrees, and no message boundary is offered after it.
fn expect_violation(dir: Direction, input: &[u8], v: FrameError, frames: u64) {
    let seen = check_splits(dir, 1024, input).unwrap();
    assert_eq!(seen.frames, frames);
    assert!(seen.frame_boundary && !seen.message_boundary);
    let mut t = FrameTracker::new(dir, 1024);
    assert_eq!(t.feed(input), Ok(frames as usize));
    assert_eq!((t.violation(), t.error()), (Some(v), None));
    assert_eq!(t.released(), input.len() as u64);
}

#[test]
fn violation_masking() {
    use Direction::*;
    let unmasked = bytes(text("a", true));
    expect_violation(ClientToServer, &unmasked, FrameError::Masking, 1);
    let masked_frame = bytes(masked(text("a", true), MASK));
    expect_violation(ServerToClient, &masked_frame, FrameError::Masking, 1);
}

#[test]
fn violation_reserved_opcode_is_relayed_with_what_follows() {
    for op in [3u8, 7, 0xb, 0xf] {
        let input = [vec![0x80 | op, 0x01, 0x55], bytes(text("x", true))].concat();
        expect_violation(
            Direction::ServerToClient,
            &input,
            FrameError::ReservedOpcode,
            2,
        );
        // A 16-bit length and a mask, split anywhere (the general header path).
        let mut long = vec![0x80 | op, 0xfe, 0, 200, 1, 2, 3, 4];
        long.extend(std::iter::repeat_n(7u8, 200));
        expect_violation(
            Direction::ClientToServer,
            &long,
            FrameError::ReservedOpcode,
            1,
        );
    }
}

#[test]
fn violation_control_too_long() {
    let ping = bytes(Frame::ping(vec![0u8; 126]));
    expect_violation(
        Direction::ServerToClient,
        &ping,
        FrameError::ControlTooLong,
        1,
    );
    let ok = bytes(Frame::ping(vec![0u8; 125]));
    let mut t = FrameTracker::new(Direction::ServerToClient, 1024);
    assert_eq!(t.feed(&ok), Ok(1));
    assert_eq!(t.violation(), None);
}

#[test]
fn violation_fragmented_control() {
    let mut ping = Frame::ping(b"x".to_vec());
    ping.header_mut().is_final = false;
    expect_violation(
        Direction::ServerToClient,
        &bytes(ping),
        FrameError::FragmentedControl,
        1,
    );
}

#[test]
fn violation_continuation_order() {
    expect_violation(
        Direction::ServerToClient,
        &bytes(cont("x", true)),
        FrameError::UnexpectedContinuation,
        1,
    );
    let after_complete = [bytes(text("a", true)), bytes(cont("b", true))].concat();
    expect_violation(
        Direction::ServerToClient,
        &after_complete,
        FrameError::UnexpectedContinuation,
        2,
    );
    let input = [bytes(text("a", false)), bytes(binary(1, true))].concat();
    expect_violation(
        Direction::ServerToClient,
        &input,
        FrameError::ExpectedContinuation,
        2,
    );
}

#[test]
fn bytes_after_close_are_ignored_not_released() {
    let close_frame = bytes(close(1000, ""));
    for late in [
        bytes(text("late", true)),
        bytes(Frame::ping(Vec::new())),
        bytes(close(1001, "")),
        bytes(text("frag", false)),
    ] {
        let input = [close_frame.clone(), late.clone()].concat();
        let seen = check_splits(Direction::ServerToClient, 1024, &input).unwrap();
        assert_eq!((seen.frames, seen.close_code), (1, Some(1000)));
        let mut t = FrameTracker::new(Direction::ServerToClient, 1024);
        assert_eq!(t.feed(&input), Ok(1));
        assert_eq!(t.released(), close_frame.len() as u64);
        assert_eq!(t.ignored(), late.len() as u64);
        assert_eq!(t.error(), None);
    }
}

#[test]
fn partial_headers_are_held_until_whole() {
    let frame = bytes(masked(binary(300, true), MASK)); // 2 + 2 + 4 header bytes
    let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
    assert_eq!(t.feed(&frame[..3]), Ok(0));
    assert_eq!((t.released(), t.held_header()), (0, &frame[..3]));
    assert_eq!(t.feed(&frame[3..10]), Ok(0));
    assert_eq!((t.released(), t.held_header()), (10, &[][..]));
    // A header that fails is never released, though its first bytes were fed earlier.
    let over = bytes(masked(binary(2000, true), MASK));
    let input = [frame.clone(), over].concat();
    let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
    assert_eq!(t.feed(&input[..frame.len() + 2]), Ok(1));
    assert_eq!(t.feed(&input[frame.len() + 2..]), Err(FrameError::TooLarge));
    assert_eq!(t.released(), frame.len() as u64);
}

#[test]
fn error_bad_header_length_top_bit() {
    let input = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
    expect_err(
        Direction::ServerToClient,
        u64::MAX,
        &input,
        FrameError::BadHeader,
    );
}

#[test]
fn error_mapping() {
    assert_eq!(FrameError::TooLarge.close_code(), 1009);
    assert_eq!(FrameError::Masking.close_code(), 1002);
    assert_eq!(FrameError::BadHeader.close_code(), 1002);
    assert_eq!(FrameError::ReservedOpcode.to_string(), "reserved opcode");
    let e: &dyn std::error::Error = &FrameError::TooLarge;
    assert_eq!(e.to_string(), "frame too large");
}

fn parse(buf: &[u8]) -> (FrameHeader, u64, u64) {
    let mut cursor = Cursor::new(buf);
    let (h, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
    (h, len, cursor.position())
}

#[test]
fn encode_close_round_trip() {
    let mut out = [0u8; 8];
    assert_eq!(encode_close(1001, None, &mut out), 4);
    let (h, len, pos) = parse(&out[..4]);
    assert_eq!(
        (h.opcode, h.is_final, h.mask, len, pos),
        (OpCode::Control(Control::Close), true, None, 2, 2)
    );
    assert_eq!(&out[2..4], &1001u16.to_be_bytes());
    let seen = run(Direction::ServerToClient, 1024, &[&out[..4]]).unwrap();
    assert_eq!(seen.close_code, Some(1001));

    assert_eq!(encode_close(1009, Some(MASK), &mut out), 8);
    let (h, len, pos) = parse(&out);
    assert_eq!(
        (h.opcode, h.mask, len, pos),
        (OpCode::Control(Control::Close), Some(MASK), 2, 6)
    );
    assert_eq!(out.to_vec(), bytes(masked(close(1009, ""), MASK)));
    let seen = check_splits(Direction::ClientToServer, 1024, &out).unwrap();
    assert_eq!(seen.close_code, Some(1009));
}

#[test]
fn encode_close_reason_round_trip() {
    for mask in [None, Some(MASK)] {
        for reason in ["", "backend went away", &"é".repeat(70)] {
            let mut out = Vec::new();
            encode_close_reason(1001, reason, mask, &mut out);
            let (h, len, pos) = parse(&out);
            assert_eq!((h.opcode, h.mask), (OpCode::Control(Control::Close), mask));
            let payload: Vec<u8> = out[pos as usize..]
                .iter()
                .zip(mask.unwrap_or_default().iter().cycle())
                .map(|(b, k)| b ^ k)
                .collect();
            assert_eq!(payload.len() as u64, len);
            assert!(len <= 125);
            assert_eq!(&payload[..2], &1001u16.to_be_bytes());
            let got = std::str::from_utf8(&payload[2..]).unwrap();
            assert!(reason.starts_with(got));
            let dir = if mask.is_some() {
                Direction::ClientToServer
            } else {
                Direction::ServerToClient
            };
            let seen = check_splits(dir, 1024, &out).unwrap();
            assert_eq!((seen.close_code, seen.violation), (Some(1001), None));
        }
    }
}

#[test]
fn encode_header_round_trip() {
    let cases = [
        (0x1, 0u64, 2),
        (0x2, 125, 2),
        (0x2, 126, 4),
        (0x1, 65535, 4),
        (0x2, 65536, 10),
        (0x2, 1 << 40, 10),
        (0x9, 5, 2),
        (0xa, 0, 2),
        (0x8, 2, 2),
    ];
    for (opcode, len, header_len) in cases {
        let mut out = [0u8; 14];
        assert_eq!(encode_header(opcode, len, &mut out), header_len);
        let (h, parsed_len, pos) = parse(&out[..header_len]);
        assert_eq!(u8::from(h.opcode), opcode);
        assert!(h.is_final && !h.rsv1 && h.mask.is_none());
        assert_eq!((parsed_len, pos), (len, header_len as u64));
        let mut expected = Vec::new();
        FrameHeader {
            opcode: OpCode::from(opcode),
            ..FrameHeader::default()
        }
        .format(len, &mut expected)
        .unwrap();
        assert_eq!(&out[..header_len], expected.as_slice());
    }
}

#[test]
fn never_panics_and_splits_agree_on_noise() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..5_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 40) as usize;
        let input: Vec<u8> = (0..len)
            .map(|i| (seed.rotate_left(i as u32 * 7) & 0xff) as u8)
            .collect();
        for dir in [Direction::ClientToServer, Direction::ServerToClient] {
            let whole = run(dir, 64, &[&input]);
            let single: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(run(dir, 64, &single), whole);
        }
    }
}

#[test]
fn pong_bits_live_here() {
    let mut frame = vec![0x80 | OPCODE_PONG, 0x80 | 4, 1, 2, 3, 4];
    frame.extend(b"wslb".iter().zip([1u8, 2, 3, 4]).map(|(b, m)| b ^ m));
    assert!(is_pong(frame[0]));
    assert!(!is_pong(0x80 | OPCODE_PING));
    assert_eq!(masked_control_payload(&frame), b"wslb");
    // Shorter than its header says: nothing, never a panic.
    assert!(masked_control_payload(&frame[..3]).is_empty());
    assert!(masked_control_payload(&frame[..8]).len() <= 2);
}
