//! Fuzzes the request plane's frame decoder on an arbitrary byte stream, fed
//! in the chunks a socket might deliver: every call returns a frame, asks
//! for more, or refuses; a refused stream is dropped as the server does.
#![no_main]

use bytes::BytesMut;
use kvrouter_runtime::request::FrameCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = FrameCodec::new(1 << 16);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => assert!(f.payload.len() < 1 << 16),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
