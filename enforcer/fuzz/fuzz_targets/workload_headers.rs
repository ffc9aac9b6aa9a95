//! The Workload API's rewriting of a client's HTTP/2 header blocks (HPACK decoded, `:authority`
//! made valid, encoded again), fed by an untrusted local caller: after the preface, arbitrary
//! frames. The rewriting must never panic; when it passes the bytes on, every header block in
//! them must decode, in order, with a decoder of the server's (so the rewriter's HPACK state
//! and the server's never drift apart), and every `:authority` in them must be one a strict
//! server accepts.

#![no_main]
#![forbid(unsafe_code)]

use enforcer::workload_api::rewrite_requests;
use libfuzzer_sys::fuzz_target;
use loona_hpack::Decoder;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(data);
    let Ok(output) = rewrite_requests(&input) else {
        return;
    };
    let mut frames = &output[PREFACE.len()..];
    let mut decoder = Decoder::new();
    let mut block = Vec::new();
    while frames.len() >= 9 {
        let length =
            usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        let (kind, flags) = (frames[3], frames[4]);
        let payload = &frames[9..9 + length];
        if kind == 0x1 || kind == 0x9 {
            block.extend_from_slice(payload);
            if flags & 0x4 != 0 {
                for (name, value) in decoder.decode(&block).expect("a rewritten block decodes") {
                    if name == b":authority" {
                        assert!(
                            http::uri::Authority::try_from(value.as_slice()).is_ok(),
                            "an invalid authority passed: {value:?}"
                        );
                    }
                }
                block.clear();
            }
        }
        frames = &frames[9 + length..];
    }
});
