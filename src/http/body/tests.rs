//! Unit tests of `body`, beside it.

use super::*;

/// Feeds `input` in the given parts, in order, stopping once the body is done; returns the
/// total consumed and whether it finished. Asserts `done` is reported only by the last
/// feed that consumed anything.
fn feed_parts(kind: BodyKind, parts: &[&[u8]]) -> Result<(usize, bool, u64), BodyError> {
    let mut r = BodyReader::new(kind);
    let mut total = 0;
    // What the reader held back (an incomplete size line), fed again with the next part
    // as the relay does.
    let mut held: Vec<u8> = Vec::new();
    for part in parts {
        if r.is_done() {
            break;
        }
        held.extend_from_slice(part);
        let p = r.feed(&held)?;
        assert!(p.consumed <= held.len());
        total += p.consumed;
        if !p.done {
            assert!(
                held.len() - p.consumed <= MAX_SIZE_LINE,
                "held back more than a size line"
            );
        }
        held.drain(..p.consumed);
        assert_eq!(p.done, r.is_done());
    }
    Ok((total, r.is_done(), r.payload_bytes()))
}

/// Whole, byte by byte, and every two-way split give the same outcome.
fn check_all_splits(kind: BodyKind, input: &[u8]) -> Result<(usize, bool, u64), BodyError> {
    let whole = feed_parts(kind, &[input]);
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(feed_parts(kind, &bytes), whole, "byte by byte");
    for i in 0..=input.len() {
        let (a, b) = input.split_at(i);
        assert_eq!(feed_parts(kind, &[a, b]), whole, "split at {i}");
    }
    whole
}

macro_rules! chunked_ok {
    ($($name:ident: $input:expr, payload = $payload:expr;)*) => {$(
        #[test]
        fn $name() {
            // Each case is exactly one body: all of it is consumed.
            let input: &[u8] = $input;
            assert_eq!(
                check_all_splits(BodyKind::Chunked, input),
                Ok((input.len(), true, $payload)),
            );
        }
    )*};
}

macro_rules! chunked_err {
    ($($name:ident: $input:expr, $err:expr;)*) => {$(
        #[test]
        fn $name() {
            let input: &[u8] = &$input;
            assert_eq!(check_all_splits(BodyKind::Chunked, input), Err($err));
            // The error sticks.
            let mut r = BodyReader::new(BodyKind::Chunked);
            assert_eq!(r.feed(input), Err($err));
            assert_eq!(r.feed(b"0\r\n\r\n"), Err($err));
        }
    )*};
}

const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n";

fn with_next(body: &[u8]) -> Vec<u8> {
    [body, NEXT].concat()
}

chunked_ok! {
    single_chunk: b"5\r\nhello\r\n0\r\n\r\n", payload = 5;
    many_chunks: b"5\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n", payload = 12;
    zero_length_body: b"0\r\n\r\n", payload = 0;
    lowercase_hex: b"a\r\n0123456789\r\n0\r\n\r\n", payload = 10;
    uppercase_hex: b"A\r\n0123456789\r\n0\r\n\r\n", payload = 10;
}

#[test]
fn mixed_case_multi_digit_size() {
    let data = vec![b'x'; 0x1ab];
    let input = [b"1aB\r\n".as_slice(), &data, b"\r\n0\r\n\r\n"].concat();
    let len = input.len();
    assert_eq!(
        check_all_splits(BodyKind::Chunked, &input),
        Ok((len, true, 0x1ab))
    );
}

chunked_ok! {
    leading_zeros: b"0005\r\nhello\r\n000\r\n\r\n", payload = 5;
    sixteen_digits_zero: b"0000000000000000\r\n\r\n", payload = 0;
    extensions: b"5;name=value;flag\r\nhello\r\n0;last=\"a b\"\r\n\r\n", payload = 5;
    extension_with_tab: b"5;a\t=\tb\r\nhello\r\n0\r\n\r\n", payload = 5;
    trailers: b"5\r\nhello\r\n0\r\nChecksum: abc\r\nX-Other:\t v \r\n\r\n", payload = 5;
    trailer_empty_value: b"0\r\nX-Empty:\r\n\r\n", payload = 0;
    trailer_obs_text: b"0\r\nX: caf\xc3\xa9\r\n\r\n", payload = 0;
}

#[test]
fn next_request_not_consumed() {
    for body in [
        b"5\r\nhello\r\n0\r\n\r\n".as_slice(),
        b"0\r\n\r\n",
        b"3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
    ] {
        let input = with_next(body);
        assert_eq!(
            check_all_splits(BodyKind::Chunked, &input).map(|r| (r.0, r.1)),
            Ok((body.len(), true)),
        );
    }
}

#[test]
fn largest_chunk_size_is_2_pow_63_minus_1() {
    let mut r = BodyReader::new(BodyKind::Chunked);
    assert_eq!(
        r.feed(b"7fffffffffffffff\r\nabc"),
        Ok(BodyProgress {
            consumed: 21,
            done: false
        })
    );
    assert_eq!(r.payload_bytes(), 3);
    for size in [
        &b"8000000000000000"[..],
        b"ffffffffffffffff",
        b"FFFFFFFFFFFFFFFF",
    ] {
        let mut r = BodyReader::new(BodyKind::Chunked);
        // Refused as soon as the digits say so, before the line ends.
        assert_eq!(r.feed(size), Err(BodyError::ChunkSizeOverflow));
    }
}

#[test]
fn incomplete_size_line_is_held_back() {
    // A whole chunk, then the start of the next size line: only the chunk is consumed.
    let mut r = BodyReader::new(BodyKind::Chunked);
    let p = r.feed(b"5\r\nhello\r\n1f;ext=1").unwrap();
    assert_eq!((p.consumed, p.done), (10, false));
    // Fed again with the rest of the line, the whole line is consumed at once.
    let p = r.feed(b"1f;ext=1\r\n").unwrap();
    assert_eq!((p.consumed, p.done), (10, false));
    // A size line alone, incomplete: nothing is consumed.
    let mut r = BodyReader::new(BodyKind::Chunked);
    assert_eq!(r.feed(b"ffffff").unwrap().consumed, 0);
    assert_eq!(r.feed(b"ffffff\r").unwrap().consumed, 0);
    assert_eq!(r.feed(b"ffffff\r\n").unwrap().consumed, 8);
}

#[test]
fn partial_until_final_crlf() {
    let input = b"5\r\nhello\r\n0\r\n\r\n";
    for end in 0..input.len() {
        // Size lines are consumed only whole: "5\r\n" (0..3) and "0\r\n" (10..13).
        let consumed = match end {
            0..=2 => 0,
            11..=12 => 10,
            _ => end,
        };
        assert_eq!(
            feed_parts(BodyKind::Chunked, &[&input[..end]]),
            Ok((consumed, false, (end.saturating_sub(3)).min(5) as u64)),
            "prefix {end}",
        );
    }
}

fn long_extension(n: usize) -> Vec<u8> {
    let mut v = b"5;".to_vec();
    v.extend(std::iter::repeat_n(b'e', n - 1));
    v.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
    v
}

fn long_trailer(n: usize) -> Vec<u8> {
    let mut v = b"0\r\nX-Big: ".to_vec();
    v.extend(std::iter::repeat_n(b'v', n));
    v.extend_from_slice(b"\r\n\r\n");
    v
}

#[test]
fn extension_at_limit_accepted() {
    let input = long_extension(MAX_EXTENSION_LEN);
    assert_eq!(
        feed_parts(BodyKind::Chunked, &[&input]),
        Ok((input.len(), true, 5))
    );
    let input = long_extension(MAX_EXTENSION_LEN + 1);
    assert_eq!(
        feed_parts(BodyKind::Chunked, &[&input]),
        Err(BodyError::ExtensionTooLong)
    );
}

#[test]
fn trailer_at_limit_accepted() {
    // 3 ("0\r\n") precedes the trailer section; "X-Big: " + value + CRLF + CRLF.
    let value = MAX_TRAILER_LEN - 7 - 4;
    let input = long_trailer(value);
    assert_eq!(
        feed_parts(BodyKind::Chunked, &[&input]),
        Ok((input.len(), true, 0))
    );
    let input = long_trailer(value + 1);
    assert_eq!(
        feed_parts(BodyKind::Chunked, &[&input]),
        Err(BodyError::TrailerTooLarge)
    );
}

chunked_err! {
    negative_size: *b"-1\r\n", BodyError::ChunkSize;
    hex_prefix: *b"0x5\r\nhello\r\n", BodyError::ChunkSize;
    leading_space: *b" 5\r\nhello\r\n", BodyError::ChunkSize;
    trailing_space: *b"5 \r\nhello\r\n", BodyError::ChunkSize;
    space_before_extension: *b"5 ;a\r\nhello\r\n", BodyError::ChunkSize;
    plus_sign: *b"+5\r\nhello\r\n", BodyError::ChunkSize;
    empty_size: *b"\r\nhello\r\n", BodyError::ChunkSize;
    extension_without_size: *b";a\r\nhello\r\n", BodyError::ChunkSize;
    bare_lf_after_size: *b"5\nhello\r\n0\r\n\r\n", BodyError::LineEnding;
    bare_lf_first: *b"\n", BodyError::ChunkSize;
    cr_without_lf: *b"5\rxhello\r\n", BodyError::LineEnding;
    bare_lf_after_extension: *b"5;a\nhello\r\n", BodyError::LineEnding;
    seventeen_digits: *b"00000000000000005\r\nhello\r\n", BodyError::ChunkSizeOverflow;
    eighteen_f: *b"ffffffffffffffffff\r\n", BodyError::ChunkSizeOverflow;
    data_without_crlf: *b"5\r\nhelloX\r\n0\r\n\r\n", BodyError::ChunkDataEnd;
    data_with_bare_lf: *b"5\r\nhello\n0\r\n\r\n", BodyError::ChunkDataEnd;
    data_cr_then_junk: *b"5\r\nhello\rX0\r\n\r\n", BodyError::ChunkDataEnd;
    nul_in_extension: *b"5;a\0b\r\nhello\r\n0\r\n\r\n", BodyError::ChunkSize;
    del_in_extension: *b"5;a\x7fb\r\nhello\r\n0\r\n\r\n", BodyError::ChunkSize;
    trailer_obs_fold: *b"0\r\nX: a\r\n b\r\n\r\n", BodyError::TrailerMalformed;
    trailer_leading_tab: *b"0\r\n\tX: a\r\n\r\n", BodyError::TrailerMalformed;
    trailer_space_before_colon: *b"0\r\nX : a\r\n\r\n", BodyError::TrailerMalformed;
    trailer_empty_name: *b"0\r\n: a\r\n\r\n", BodyError::TrailerMalformed;
    trailer_no_colon: *b"0\r\nXa\r\n\r\n", BodyError::TrailerMalformed;
    trailer_nul_in_value: *b"0\r\nX: a\0b\r\n\r\n", BodyError::TrailerMalformed;
    trailer_bare_lf: *b"0\r\nX: a\n\r\n", BodyError::LineEnding;
    trailer_cr_without_lf: *b"0\r\nX: a\rb\r\n\r\n", BodyError::LineEnding;
    final_cr_without_lf: *b"0\r\n\rX", BodyError::LineEnding;
    final_bare_lf: *b"0\r\n\n", BodyError::LineEnding;
}

#[test]
fn extension_5000_bytes() {
    let input = long_extension(5000);
    assert_eq!(
        check_all_splits(BodyKind::Chunked, &input),
        Err(BodyError::ExtensionTooLong)
    );
}

#[test]
fn trailer_20_kib() {
    let input = long_trailer(20 * 1024);
    assert_eq!(
        feed_parts(BodyKind::Chunked, &[&input]),
        Err(BodyError::TrailerTooLarge)
    );
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(
        feed_parts(BodyKind::Chunked, &bytes),
        Err(BodyError::TrailerTooLarge)
    );
}

#[test]
fn many_chunks_is_linear_and_split_safe() {
    let mut input = Vec::new();
    for i in 1..200usize {
        input.extend_from_slice(format!("{i:x}\r\n").as_bytes());
        input.extend(std::iter::repeat_n(b'z', i));
        input.extend_from_slice(b"\r\n");
    }
    input.extend_from_slice(b"0\r\n\r\n");
    let payload: usize = (1..200).sum();
    let len = input.len();
    assert_eq!(
        feed_parts(BodyKind::Chunked, &[&with_next(&input)]),
        Ok((len, true, payload as u64))
    );
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(
        feed_parts(BodyKind::Chunked, &bytes),
        Ok((len, true, payload as u64))
    );
}

#[test]
fn length_exact() {
    assert_eq!(
        check_all_splits(BodyKind::Length(5), b"hello"),
        Ok((5, true, 5))
    );
}

#[test]
fn length_short() {
    let mut r = BodyReader::new(BodyKind::Length(10));
    assert_eq!(
        r.feed(b"hello"),
        Ok(BodyProgress {
            consumed: 5,
            done: false
        })
    );
    assert!(!r.is_done());
    assert_eq!(r.payload_bytes(), 5);
    assert_eq!(
        r.feed(b""),
        Ok(BodyProgress {
            consumed: 0,
            done: false
        })
    );
}

#[test]
fn length_extra_not_consumed() {
    let input = with_next(b"hello");
    assert_eq!(
        check_all_splits(BodyKind::Length(5), &input),
        Ok((5, true, 5))
    );
    let mut r = BodyReader::new(BodyKind::Length(5));
    assert_eq!(
        r.feed(&input),
        Ok(BodyProgress {
            consumed: 5,
            done: true
        })
    );
    assert_eq!(
        r.feed(&input),
        Ok(BodyProgress {
            consumed: 0,
            done: true
        })
    );
}

#[test]
fn length_zero_and_empty_done_immediately() {
    for kind in [BodyKind::Length(0), BodyKind::Empty] {
        let mut r = BodyReader::new(kind);
        assert!(r.is_done());
        assert_eq!(
            r.feed(NEXT),
            Ok(BodyProgress {
                consumed: 0,
                done: true
            })
        );
        assert_eq!(r.payload_bytes(), 0);
    }
}

#[test]
fn length_huge() {
    let mut r = BodyReader::new(BodyKind::Length(u64::MAX));
    assert_eq!(
        r.feed(b"abc"),
        Ok(BodyProgress {
            consumed: 3,
            done: false
        })
    );
}

#[test]
fn until_close_consumes_everything() {
    let mut r = BodyReader::new(BodyKind::UntilClose);
    for _ in 0..3 {
        assert_eq!(
            r.feed(NEXT),
            Ok(BodyProgress {
                consumed: NEXT.len(),
                done: false
            })
        );
    }
    assert!(!r.is_done());
    assert_eq!(r.payload_bytes(), 3 * NEXT.len() as u64);
}

#[test]
fn error_display() {
    assert_eq!(BodyError::ChunkSize.to_string(), "invalid chunk size line");
    let e: &dyn std::error::Error = &BodyError::TrailerTooLarge;
    assert_eq!(e.to_string(), "trailer section too large");
}

#[test]
fn never_panics_on_arbitrary_input() {
    // A cheap deterministic sweep over short inputs drawn from the interesting bytes.
    let alphabet = b"0aF;:\r\n \t\x00xZ-";
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 24) as usize;
        let mut s = seed;
        let input: Vec<u8> = (0..len)
            .map(|_| {
                s = s.rotate_left(5).wrapping_mul(31).wrapping_add(7);
                alphabet[(s % alphabet.len() as u64) as usize]
            })
            .collect();
        let whole = feed_parts(BodyKind::Chunked, &[&input]);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed_parts(BodyKind::Chunked, &bytes), whole);
    }
}
