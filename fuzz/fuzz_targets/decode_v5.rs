#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_codec::fuzzing::decode_stream_v5(data));
