//! The C ABI used by the Python package (through cffi, which releases the GIL around every call).
//!
//! Conventions: functions return 0 on success and -1 on error (pointer-returning ones return NULL); the error
//! message is then available from `bpe_last_error()` on the same thread. Every entry point runs inside
//! `catch_unwind`, so a Rust panic becomes an error message, never an abort of the Python process. Buffers
//! handed to Python (`BpeU32s`, `BpeBytes`, `BpeSizes`) are owned by Rust and released with their `_free`.

use crate::pretok::Pretokenizer;
use crate::tokenizer::{parse_ranks, write_ranks, Special, SpecialMode, Tokenizer};
use crate::train::{default_threads, Trainer};
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::new("").unwrap());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn guard<T>(on_error: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(msg)) => {
            set_error(msg);
            on_error
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal error in bpe_rs (a Rust panic, please report it): {what}"));
            on_error
        }
    }
}

fn status(f: impl FnOnce() -> Result<(), String>) -> i32 {
    guard(-1, || f().map(|_| 0))
}

/// Message of the last error on this thread (valid until the next failing call on this thread).
#[no_mangle]
pub extern "C" fn bpe_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[repr(C)]
pub struct BpeU32s {
    pub data: *mut u32,
    pub len: usize,
    pub cap: usize,
}

#[repr(C)]
pub struct BpeBytes {
    pub data: *mut u8,
    pub len: usize,
    pub cap: usize,
}

#[repr(C)]
pub struct BpeSizes {
    pub data: *mut usize,
    pub len: usize,
    pub cap: usize,
}

macro_rules! buffer_impl {
    ($name:ident, $t:ty) => {
        impl $name {
            fn fill(out: *mut $name, v: Vec<$t>) -> Result<(), String> {
                let out = unsafe { out.as_mut() }.ok_or("null output pointer")?;
                let mut v = std::mem::ManuallyDrop::new(v);
                *out = $name { data: v.as_mut_ptr(), len: v.len(), cap: v.capacity() };
                Ok(())
            }
            fn release(&mut self) {
                if !self.data.is_null() {
                    drop(unsafe { Vec::from_raw_parts(self.data, self.len, self.cap) });
                }
                self.data = std::ptr::null_mut();
                self.len = 0;
                self.cap = 0;
            }
        }
    };
}
buffer_impl!(BpeU32s, u32);
buffer_impl!(BpeBytes, u8);
buffer_impl!(BpeSizes, usize);

// The `_free` functions are spelled out (not macro-generated) so maturin's header generator sees them.

/// Release a buffer returned by bpe_rs (safe to call twice or on a zeroed struct).
#[no_mangle]
pub unsafe extern "C" fn bpe_u32s_free(buf: *mut BpeU32s) {
    if let Some(b) = buf.as_mut() {
        b.release()
    }
}

/// Release a buffer returned by bpe_rs (safe to call twice or on a zeroed struct).
#[no_mangle]
pub unsafe extern "C" fn bpe_bytes_free(buf: *mut BpeBytes) {
    if let Some(b) = buf.as_mut() {
        b.release()
    }
}

/// Release a buffer returned by bpe_rs (safe to call twice or on a zeroed struct).
#[no_mangle]
pub unsafe extern "C" fn bpe_sizes_free(buf: *mut BpeSizes) {
    if let Some(b) = buf.as_mut() {
        b.release()
    }
}

/// Slices of a blob given n+1 offsets.
unsafe fn blob_slices<'a>(blob: *const u8, offsets: *const usize, n: usize) -> Result<Vec<&'a [u8]>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if offsets.is_null() {
        return Err("null offsets".into());
    }
    let offs = std::slice::from_raw_parts(offsets, n + 1);
    let total = offs[n];
    if blob.is_null() && total > 0 {
        return Err("null data pointer".into());
    }
    let data: &[u8] = if total == 0 { &[] } else { std::slice::from_raw_parts(blob, total) };
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let (a, b) = (offs[k], offs[k + 1]);
        if a > b || b > total {
            return Err(format!("bad offsets at item {k}"));
        }
        out.push(&data[a..b]);
    }
    Ok(out)
}

/// A byte slice argument; NULL is accepted only with length 0 (and then means empty).
unsafe fn bytes_arg<'a>(data: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || data.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(data, len)
    }
}

// ---- pre-tokenizer ------------------------------------------------------------------------------------------

/// Chunk boundaries of `text` (UTF-8): byte offsets 0 = b0 < b1 < ... < bn = len.
#[no_mangle]
pub unsafe extern "C" fn bpe_pretokenize(max_digits: u32, text: *const u8, len: usize, out: *mut BpeSizes) -> i32 {
    status(|| {
        let p = Pretokenizer::new(max_digits)?;
        let t = bytes_arg(text, len);
        std::str::from_utf8(t).map_err(|e| format!("text is not valid UTF-8 at byte {}", e.valid_up_to()))?;
        let mut b = vec![0usize];
        p.for_each_chunk(t, |_, e| b.push(e));
        BpeSizes::fill(out, b)
    })
}

/// The split pattern (regex syntax) for `max_digits`.
#[no_mangle]
pub extern "C" fn bpe_pattern(max_digits: u32, out: *mut BpeBytes) -> i32 {
    status(|| BpeBytes::fill(out, Pretokenizer::new(max_digits)?.pattern().into_bytes()))
}

/// `max_digits` for a pattern string, or 0 if the hand-written pre-tokenizer does not implement it.
#[no_mangle]
pub unsafe extern "C" fn bpe_pattern_digits(pattern: *const u8, len: usize) -> u32 {
    guard(0, || {
        let s = std::str::from_utf8(bytes_arg(pattern, len)).map_err(|e| e.to_string())?;
        Ok(Pretokenizer::from_pattern(s).map_or(0, |p| p.max_digits))
    })
}

/// Class of a code point in the generated tables: 0 other, 1 letter, 2 number, 3 white space, 4 unassigned;
/// 255 past U+10FFFF.
#[no_mangle]
pub extern "C" fn bpe_char_class(cp: u32) -> u8 {
    if cp >= 0x110000 {
        255
    } else {
        crate::pretok::table_class(cp)
    }
}

#[no_mangle]
pub extern "C" fn bpe_unicode_version(out: *mut BpeBytes) -> i32 {
    status(|| BpeBytes::fill(out, crate::UNICODE_VERSION.as_bytes().to_vec()))
}

#[no_mangle]
pub extern "C" fn bpe_default_threads() -> usize {
    default_threads()
}

// ---- training -----------------------------------------------------------------------------------------------

/// The trainer behind a mutex: cffi releases the GIL, so two Python threads may call into one trainer at once.
pub struct BpeTrainer(std::sync::Mutex<Trainer>);

impl BpeTrainer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Trainer> {
        // A panic while counting poisons the mutex; the counts may be partial, but they stay memory-safe.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[no_mangle]
pub extern "C" fn bpe_trainer_new(max_digits: u32, num_threads: usize) -> *mut BpeTrainer {
    guard(std::ptr::null_mut(), || {
        let p = Pretokenizer::new(max_digits)?;
        Ok(Box::into_raw(Box::new(BpeTrainer(std::sync::Mutex::new(Trainer::new(p, num_threads))))))
    })
}

#[no_mangle]
pub unsafe extern "C" fn bpe_trainer_free(t: *mut BpeTrainer) {
    if !t.is_null() {
        drop(Box::from_raw(t));
    }
}

/// Count the chunks of n texts stored back to back in `blob` (n+1 offsets).
#[no_mangle]
pub unsafe extern "C" fn bpe_trainer_feed(t: *mut BpeTrainer, blob: *const u8, offsets: *const usize, n: usize) -> i32 {
    status(|| {
        let t = t.as_ref().ok_or("null trainer")?;
        let texts = blob_slices(blob, offsets, n)?;
        t.lock().feed(&texts)
    })
}

/// Count the chunks of a UTF-8 text file (path as bytes).
#[no_mangle]
pub unsafe extern "C" fn bpe_trainer_feed_file(t: *mut BpeTrainer, path: *const u8, len: usize) -> i32 {
    status(|| {
        let t = t.as_ref().ok_or("null trainer")?;
        use std::os::unix::ffi::OsStrExt;
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(bytes_arg(path, len)));
        t.lock().feed_file(p)
    })
}

/// Unique chunks and bytes counted so far.
#[no_mangle]
pub unsafe extern "C" fn bpe_trainer_stats(t: *mut BpeTrainer, unique_chunks: *mut u64, num_bytes: *mut u64) -> i32 {
    status(|| {
        let t = t.as_ref().ok_or("null trainer")?;
        let mut t = t.lock();
        t.flush();
        *unique_chunks.as_mut().ok_or("null")? = t.counts.len() as u64;
        *num_bytes.as_mut().ok_or("null")? = t.num_bytes;
        Ok(())
    })
}

/// Learn the merges (consumes the counts) and return a tokenizer with the given special tokens appended.
#[no_mangle]
pub unsafe extern "C" fn bpe_trainer_train(
    t: *mut BpeTrainer,
    vocab_size: usize,
    specials_blob: *const u8,
    specials_offsets: *const usize,
    num_specials: usize,
) -> *mut BpeTokenizer {
    guard(std::ptr::null_mut(), || {
        let t = t.as_ref().ok_or("null trainer")?;
        let specials = blob_slices(specials_blob, specials_offsets, num_specials)?;
        let tok = t.lock().train(vocab_size, specials.iter().map(|s| s.to_vec()).collect())?;
        Ok(Box::into_raw(Box::new(BpeTokenizer(tok))))
    })
}

// ---- tokenizer ----------------------------------------------------------------------------------------------

pub struct BpeTokenizer(Tokenizer);

/// Build a tokenizer from the contents of a tiktoken ranks file and special tokens (texts + ids).
#[no_mangle]
pub unsafe extern "C" fn bpe_tokenizer_from_ranks(
    ranks: *const u8,
    ranks_len: usize,
    max_digits: u32,
    specials_blob: *const u8,
    specials_offsets: *const usize,
    special_ids: *const u32,
    num_specials: usize,
) -> *mut BpeTokenizer {
    guard(std::ptr::null_mut(), || {
        let p = Pretokenizer::new(max_digits)?;
        let decoder = parse_ranks(bytes_arg(ranks, ranks_len))?;
        let texts = blob_slices(specials_blob, specials_offsets, num_specials)?;
        if special_ids.is_null() && num_specials > 0 {
            return Err("null special ids".into());
        }
        let ids: &[u32] = if num_specials == 0 { &[] } else { std::slice::from_raw_parts(special_ids, num_specials) };
        let specials = texts.iter().zip(ids).map(|(t, &id)| Special { text: t.to_vec(), id }).collect();
        Ok(Box::into_raw(Box::new(BpeTokenizer(Tokenizer::new(p, decoder, specials)?))))
    })
}

#[no_mangle]
pub unsafe extern "C" fn bpe_tokenizer_free(t: *mut BpeTokenizer) {
    if !t.is_null() {
        drop(Box::from_raw(t));
    }
}

/// Sizes: ordinary tokens (ranks), special tokens, vocab size (1 + largest id), max_digits of the pattern.
#[no_mangle]
pub unsafe extern "C" fn bpe_tokenizer_info(t: *const BpeTokenizer, out4: *mut u64) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        if out4.is_null() {
            return Err("null output pointer".into());
        }
        let out = std::slice::from_raw_parts_mut(out4, 4);
        out[0] = t.num_ranks() as u64;
        out[1] = t.specials.len() as u64;
        out[2] = t.vocab_size() as u64;
        out[3] = t.pretok.max_digits as u64;
        Ok(())
    })
}

/// Special token `k`: its text and id.
#[no_mangle]
pub unsafe extern "C" fn bpe_tokenizer_special(t: *const BpeTokenizer, k: usize, text: *mut BpeBytes, id: *mut u32) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        let s = t.specials.get(k).ok_or_else(|| format!("no special token {k}"))?;
        *id.as_mut().ok_or("null")? = s.id;
        BpeBytes::fill(text, s.text.clone())
    })
}

/// The ranks in tiktoken's file format.
#[no_mangle]
pub unsafe extern "C" fn bpe_tokenizer_ranks(t: *const BpeTokenizer, out: *mut BpeBytes) -> i32 {
    status(|| BpeBytes::fill(out, write_ranks(&t.as_ref().ok_or("null tokenizer")?.0.decoder)))
}

/// Bytes of every ordinary token, back to back, with num_ranks+1 offsets.
#[no_mangle]
pub unsafe extern "C" fn bpe_tokenizer_vocab(t: *const BpeTokenizer, blob: *mut BpeBytes, offsets: *mut BpeSizes) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        let mut data = Vec::new();
        let mut offs = vec![0usize];
        for d in &t.decoder {
            data.extend_from_slice(d);
            offs.push(data.len());
        }
        BpeBytes::fill(blob, data)?;
        BpeSizes::fill(offsets, offs)
    })
}

fn modes_of(t: &Tokenizer, modes: *const u8) -> Result<Vec<SpecialMode>, String> {
    let n = t.specials.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    if modes.is_null() {
        return Ok(vec![SpecialMode::Ordinary; n]);
    }
    unsafe { std::slice::from_raw_parts(modes, n) }
        .iter()
        .map(|&m| match m {
            0 => Ok(SpecialMode::Ordinary),
            1 => Ok(SpecialMode::Allowed),
            2 => Ok(SpecialMode::Disallowed),
            _ => Err(format!("bad special-token mode {m}")),
        })
        .collect()
}

/// Encode one UTF-8 text. `modes`: one byte per special token (0 ordinary text, 1 allowed, 2 disallowed), or NULL.
#[no_mangle]
pub unsafe extern "C" fn bpe_encode(t: *const BpeTokenizer, text: *const u8, len: usize, modes: *const u8, out: *mut BpeU32s) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        let text = bytes_arg(text, len);
        std::str::from_utf8(text).map_err(|e| format!("text is not valid UTF-8 at byte {}", e.valid_up_to()))?;
        let modes = modes_of(t, modes)?;
        let mut ids = Vec::with_capacity(len / 3 + 8);
        t.encode(text, &modes, &mut ids)?;
        BpeU32s::fill(out, ids)
    })
}

/// Encode arbitrary bytes (invalid UTF-8 becomes single-byte tokens), so any byte string round-trips.
#[no_mangle]
pub unsafe extern "C" fn bpe_encode_bytes(t: *const BpeTokenizer, data: *const u8, len: usize, out: *mut BpeU32s) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        let mut ids = Vec::with_capacity(len / 3 + 8);
        t.encode_bytes(bytes_arg(data, len), &mut ids);
        BpeU32s::fill(out, ids)
    })
}

/// Encode n texts on `num_threads` threads (0 = all cores). Output: all ids back to back and n+1 offsets.
#[no_mangle]
pub unsafe extern "C" fn bpe_encode_batch(
    t: *const BpeTokenizer,
    blob: *const u8,
    offsets: *const usize,
    n: usize,
    modes: *const u8,
    num_threads: usize,
    out_ids: *mut BpeU32s,
    out_offsets: *mut BpeSizes,
) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        let texts = blob_slices(blob, offsets, n)?;
        for (k, s) in texts.iter().enumerate() {
            std::str::from_utf8(s).map_err(|e| format!("text {k} is not valid UTF-8 at byte {}", e.valid_up_to()))?;
        }
        let modes = modes_of(t, modes)?;
        let threads = if num_threads == 0 { default_threads() } else { num_threads }.min(n.max(1));
        let total: usize = texts.iter().map(|s| s.len()).sum();
        // Contiguous ranges of texts with about equal bytes, one per thread.
        let mut bounds = vec![0usize];
        let (mut acc, per) = (0usize, total / threads + 1);
        for (k, s) in texts.iter().enumerate() {
            acc += s.len();
            if acc >= per && bounds.len() < threads {
                bounds.push(k + 1);
                acc = 0;
            }
        }
        if *bounds.last().unwrap() != n {
            bounds.push(n);
        }
        let results: Vec<Result<(Vec<u32>, Vec<usize>), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = bounds
                .windows(2)
                .map(|r| {
                    let (texts, modes) = (&texts[r[0]..r[1]], &modes);
                    s.spawn(move || -> Result<(Vec<u32>, Vec<usize>), String> {
                        let mut ids = Vec::new();
                        let mut ends = Vec::with_capacity(texts.len());
                        for text in texts {
                            t.encode(text, modes, &mut ids)?;
                            ends.push(ids.len());
                        }
                        Ok((ids, ends))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("encoding thread panicked".into()))).collect()
        });
        let mut all = Vec::new();
        let mut offs = vec![0usize];
        for r in results {
            let (ids, ends) = r?;
            let base = all.len();
            all.extend_from_slice(&ids);
            offs.extend(ends.iter().map(|e| base + e));
        }
        BpeU32s::fill(out_ids, all)?;
        BpeSizes::fill(out_offsets, offs)
    })
}

/// Concatenated bytes of the tokens `ids`; an unknown id is an error.
#[no_mangle]
pub unsafe extern "C" fn bpe_decode(t: *const BpeTokenizer, ids: *const u32, n: usize, out: *mut BpeBytes) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        if ids.is_null() && n > 0 {
            return Err("null ids pointer".into());
        }
        let ids: &[u32] = if n == 0 { &[] } else { std::slice::from_raw_parts(ids, n) };
        let mut bytes = Vec::with_capacity(n * 4);
        t.decode(ids, &mut bytes)?;
        BpeBytes::fill(out, bytes)
    })
}

/// Byte length of every id 0..vocab_size into `out` (0 for special tokens and unused ids): the table
/// bits-per-byte divides by.
#[no_mangle]
pub unsafe extern "C" fn bpe_token_byte_lengths(t: *const BpeTokenizer, out: *mut u32, n: usize) -> i32 {
    status(|| {
        let t = &t.as_ref().ok_or("null tokenizer")?.0;
        if n != t.vocab_size() || out.is_null() {
            return Err(format!("output must have vocab_size = {} entries, got {n}", t.vocab_size()));
        }
        let out = std::slice::from_raw_parts_mut(out, n);
        out.fill(0);
        for (k, d) in t.decoder.iter().enumerate() {
            out[k] = d.len() as u32;
        }
        Ok(())
    })
}

/// Deliberately panics inside the FFI guard: lets tests prove a panic becomes a Python exception.
#[no_mangle]
pub extern "C" fn bpe_debug_panic() -> i32 {
    status(|| panic!("deliberate panic for testing"))
}
