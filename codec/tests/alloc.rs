//! The PUBLISH hot paths must not allocate. A counting global allocator is
//! installed for this test binary only; the count is per thread so tests
//! running in parallel do not disturb each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use starling_codec::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (ALLOCS.with(Cell::get) - before, r)
}

fn publish(qos: QoS) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: ByteString::from("sensors/room-1/temperature"),
        pkid: if qos == QoS::AtMostOnce { 0 } else { 7 },
        properties: Properties::default(),
        payload: Bytes::from_static(b"{\"t\":21.5}"),
    })
}

#[test]
fn decoding_publish_without_properties_does_not_allocate() {
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        for i in 0..100 {
            let qos = [QoS::AtMostOnce, QoS::AtLeastOnce][i % 2];
            encode(&publish(qos), v, &mut buf).unwrap();
        }
        // The first split of a fresh buffer moves it to shared storage (one
        // allocation per read buffer, not per packet); take it out of the count.
        let first = decode(&mut buf, v, usize::MAX).unwrap().unwrap();
        drop(first);
        let (n, decoded) = allocations(|| {
            let mut count = 0;
            while let Some(p) = decode(&mut buf, v, usize::MAX).unwrap() {
                assert!(matches!(p, Packet::Publish(_)));
                count += 1;
            }
            count
        });
        assert_eq!(decoded, 99);
        assert_eq!(n, 0, "{v:?}: {n} allocations for {decoded} PUBLISH decodes");
    }
}

#[test]
fn decoding_acks_does_not_allocate() {
    let mut buf = BytesMut::with_capacity(4096);
    for i in 1..=100u16 {
        encode(
            &Packet::PubAck(PubResp::new(i, 0)),
            ProtocolVersion::V5,
            &mut buf,
        )
        .unwrap();
    }
    let (n, _) = allocations(|| {
        while let Some(p) = decode(&mut buf, ProtocolVersion::V5, usize::MAX).unwrap() {
            assert!(matches!(p, Packet::PubAck(_)));
        }
    });
    assert_eq!(n, 0);
}

#[test]
fn encode_publish_does_not_allocate_beyond_out() {
    let props = Properties {
        content_type: Some(ByteString::from("application/json")),
        user_properties: vec![(ByteString::from("k"), ByteString::from("v"))],
        ..Properties::default()
    };
    let ids = [3u32, 4];
    let p = PublishRef {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "a/b/c",
        pkid: 9,
        payload: &[1u8; 200],
        properties: Some(&props),
        topic_alias: Some(1),
        subscription_identifiers: &ids,
        message_expiry_interval: Some(60),
    };
    let mut out = BytesMut::with_capacity(64 * 1024);
    let (n, _) = allocations(|| {
        for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for _ in 0..100 {
                encode_publish(&p, v, &mut out);
                let _ = publish_encoded_len(&p, v);
            }
        }
    });
    assert_eq!(n, 0);
}
