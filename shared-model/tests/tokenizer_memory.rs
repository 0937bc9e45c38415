//! Found by the `gguf` fuzz target (its process grew past 2 GiB): tokenizers 0.23 keeps each
//! BPE instance's word cache in a thread-local map that is never freed, so every tokenizer
//! built, or cloned, leaked up to 10,000 cached words per thread. Building, using and dropping
//! tokenizers must give the memory back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use shared_model::tokenizer::Tokenizer;

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn dropped_tokenizers_give_their_memory_back() {
    let json = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-tokenizer.json"
    ))
    .expect("fixture tokenizer");
    // Distinct words of letters (digits are split one by one), so that a word cache would fill.
    let word = |mut i: usize| {
        let mut w = String::from(" q");
        while i > 0 {
            w.push(char::from(b'a' + (i % 26) as u8));
            i /= 26;
        }
        w
    };
    let text: String = (1..3000).map(word).collect();
    let round = || {
        let tokenizer = Tokenizer::from_json(&json).expect("tokenizer");
        let copy = tokenizer.clone();
        assert!(!tokenizer.encode(&text).expect("encode").is_empty());
        assert!(!copy.encode(&text).expect("encode").is_empty());
    };
    // The first round pays for what is built once per process.
    round();
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..5 {
        round();
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    // Ten tokenizers' caches would hold ~60,000 words (megabytes); an empty cache entry per
    // instance is ~50 bytes.
    assert!(
        grown < 64 << 10,
        "{grown} bytes still live after the tokenizers were dropped"
    );
}
