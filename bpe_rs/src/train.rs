//! BPE training: count pre-tokenized chunks in parallel, then merge with a priority queue.
//!
//! 1. Counting. Texts are cut at safe points (see `pretok::split_for_threads`) into pieces spread over std
//!    threads; each thread counts its chunks in a local map keyed by borrowed slices, and the maps are folded
//!    into one `chunk -> count` map. Counting is a sum, so the result does not depend on the number of threads.
//! 2. Words. Each unique chunk of two or more bytes becomes a word: its bytes as token ids, stored back to back
//!    in one flat array (`syms`), with its count. Single-byte chunks can never merge and are dropped.
//! 3. Merging. `pair_count[(a, b)]` is the number of adjacent occurrences of (a, b) over all words weighted by
//!    word count (overlapping occurrences count, as in every BPE trainer); `pair_words[(a, b)]` lists words that
//!    may contain it. A max-heap orders pairs by (count, then the smaller pair first) -- a total order, so the
//!    merges are deterministic. Entries are refreshed lazily: a popped entry whose count is stale is pushed
//!    back with its live count. Merging (a, b) rewrites only the words in its list, left to right without
//!    overlap, and updates counts by deltas: only pairs that touch a merged position change.
//!
//! The new token's bytes are bytes(a) + bytes(b). If that byte string is already a token (it can be reached by
//! two different splits, e.g. "ab"+"c" and "a"+"bc"), the merge reuses that token's id instead of adding a
//! duplicate, so the vocabulary stays a set of unique byte strings, as tiktoken's rank files require.

use crate::hash::{new_map, FxHashMap};
use crate::pretok::{split_for_threads, Pretokenizer};
use crate::tokenizer::{Special, Tokenizer};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Read;

/// Pieces of about this many bytes are handed to counting threads.
const PIECE_BYTES: usize = 1 << 20;
/// Files are read in blocks of about this size, so memory stays bounded on corpora larger than RAM.
const FILE_BLOCK: usize = 64 << 20;

pub struct Trainer {
    pub pretok: Pretokenizer,
    pub num_threads: usize,
    pub counts: FxHashMap<Box<[u8]>, u64>,
    pub num_bytes: u64,
    /// File blocks read but not counted yet (see `flush`).
    pending: Vec<Vec<u8>>,
    pending_bytes: usize,
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Trainer {
    pub fn new(pretok: Pretokenizer, num_threads: usize) -> Self {
        let num_threads = if num_threads == 0 { default_threads() } else { num_threads };
        Trainer { pretok, num_threads, counts: new_map(1 << 16), num_bytes: 0, pending: Vec::new(), pending_bytes: 0 }
    }

    /// Count the queued file blocks.
    pub fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let mut pieces: Vec<&[u8]> = Vec::new();
        for block in &pending {
            pieces.extend(split_for_threads(block, PIECE_BYTES));
            self.num_bytes += block.len() as u64;
        }
        self.count_pieces(&pieces);
        self.pending_bytes = 0;
    }

    /// Count the chunks of `texts` (each valid UTF-8; checked).
    pub fn feed(&mut self, texts: &[&[u8]]) -> Result<(), String> {
        for (k, t) in texts.iter().enumerate() {
            if let Err(e) = std::str::from_utf8(t) {
                return Err(format!("text {k} of the batch is not valid UTF-8 at byte {}", e.valid_up_to()));
            }
        }
        let mut pieces: Vec<&[u8]> = Vec::new();
        for t in texts {
            pieces.extend(split_for_threads(t, PIECE_BYTES));
            self.num_bytes += t.len() as u64;
        }
        self.count_pieces(&pieces);
        Ok(())
    }

    /// Queue a plain-text file for counting, read in blocks cut at safe points (counted by `flush`, which runs
    /// whenever enough is queued, and before stats or training).
    pub fn feed_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        let name = path.display();
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open {name}: {e}"))?;
        let mut buf: Vec<u8> = Vec::new();
        let mut offset: u64 = 0; // file offset of buf[0]
        let mut eof = false;
        while !eof || !buf.is_empty() {
            if !eof {
                // read_to_end grows the buffer only as far as the data goes: a small file costs a small buffer.
                let old = buf.len();
                (&mut file)
                    .take(FILE_BLOCK as u64)
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("cannot read {name}: {e}"))?;
                eof = buf.len() - old < FILE_BLOCK;
            }
            // Process up to the last safe cut (or everything at end of file); keep the tail for the next block.
            let cut = if eof { buf.len() } else { last_safe_cut(&buf).unwrap_or(0) };
            if cut == 0 && !eof {
                continue; // no safe point yet: read another block onto this one
            }
            let block = &buf[..cut];
            if let Err(e) = std::str::from_utf8(block) {
                return Err(format!("{name} is not valid UTF-8 at byte offset {}", offset + e.valid_up_to() as u64));
            }
            // Queue the block; blocks of many small files are counted together so all threads have work.
            self.pending_bytes += block.len();
            self.pending.push(block.to_vec());
            if self.pending_bytes >= FILE_BLOCK {
                self.flush();
            }
            buf.drain(..cut);
            offset += cut as u64;
        }
        Ok(())
    }

    fn count_pieces(&mut self, pieces: &[&[u8]]) {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if total == 0 {
            return;
        }
        let threads = self.num_threads.min(pieces.len()).max(1);
        // Contiguous groups of pieces with about equal bytes.
        let mut groups: Vec<&[&[u8]]> = Vec::with_capacity(threads);
        let per = total / threads + 1;
        let (mut start, mut acc) = (0, 0);
        for (i, p) in pieces.iter().enumerate() {
            acc += p.len();
            if acc >= per && groups.len() + 1 < threads {
                groups.push(&pieces[start..=i]);
                start = i + 1;
                acc = 0;
            }
        }
        groups.push(&pieces[start..]);
        let pretok = self.pretok;
        let locals: Vec<FxHashMap<&[u8], u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .iter()
                .map(|group| {
                    s.spawn(move || {
                        let mut local: FxHashMap<&[u8], u64> = new_map(1 << 14);
                        for piece in group.iter() {
                            pretok.for_each_chunk(piece, |a, b| *local.entry(&piece[a..b]).or_insert(0) += 1);
                        }
                        local
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("counting thread panicked")).collect()
        });
        for local in locals {
            for (chunk, c) in local {
                match self.counts.get_mut(chunk) {
                    Some(v) => *v += c,
                    None => {
                        self.counts.insert(chunk.into(), c);
                    }
                }
            }
        }
    }

    /// Learn merges until the vocabulary (256 bytes + merges + specials) has `vocab_size` entries.
    /// Consumes the counts gathered so far.
    pub fn train(&mut self, vocab_size: usize, specials: Vec<Vec<u8>>) -> Result<Tokenizer, String> {
        let min = 256 + specials.len();
        if vocab_size < min {
            return Err(format!(
                "vocab_size {vocab_size} is too small: it must be at least 256 byte tokens + {} special tokens = {min}",
                specials.len()
            ));
        }
        self.flush();
        if self.counts.is_empty() {
            return Err("the training corpus is empty: no text was fed to the trainer".into());
        }
        let target_ranks = vocab_size - specials.len();
        let counts = std::mem::replace(&mut self.counts, new_map(0));
        let decoder = learn(counts, target_ranks)?;
        let first_special = decoder.len() as u32;
        let specials = specials
            .into_iter()
            .enumerate()
            .map(|(k, text)| Special { text, id: first_special + k as u32 })
            .collect();
        Tokenizer::new(self.pretok, decoder, specials)
    }
}

/// Largest offset at which `buf` may be cut (see `pretok::safe_split_point`), searching backwards.
fn last_safe_cut(buf: &[u8]) -> Option<usize> {
    let mut k = buf.len().checked_sub(2)?;
    loop {
        if buf[k] == b'\n' && buf[k + 1] > b' ' && buf[k + 1] < 0x7f {
            return Some(k + 1);
        }
        if k == 0 {
            return None;
        }
        k -= 1;
    }
}

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

struct Words {
    syms: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

/// The merge loop; returns the byte string of every token in rank order (256 single bytes first).
fn learn(counts: FxHashMap<Box<[u8]>, u64>, target_ranks: usize) -> Result<Vec<Box<[u8]>>, String> {
    let mut decoder: Vec<Box<[u8]>> = (0..=255u8).map(|b| vec![b].into_boxed_slice()).collect();
    let mut ids: FxHashMap<Box<[u8]>, u32> = new_map(target_ranks);
    for (i, d) in decoder.iter().enumerate() {
        ids.insert(d.clone(), i as u32);
    }

    // Words in a canonical order (by bytes) so nothing depends on hash-map iteration order.
    let mut entries: Vec<(Box<[u8]>, u64)> = counts.into_iter().filter(|(c, _)| c.len() >= 2).collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let total_syms: usize = entries.iter().map(|e| e.0.len()).sum();
    let mut w = Words {
        syms: Vec::with_capacity(total_syms),
        start: Vec::with_capacity(entries.len()),
        len: Vec::with_capacity(entries.len()),
        count: Vec::with_capacity(entries.len()),
    };
    for (bytes, c) in entries {
        w.start.push(w.syms.len());
        w.len.push(bytes.len() as u32);
        w.count.push(c as i64);
        w.syms.extend(bytes.iter().map(|&b| b as u32));
    }
    let num_words = w.len.len();

    // Initial pair counts and pair -> word lists (word lists come out sorted and without repeats).
    let mut pair_count: FxHashMap<u64, i64> = new_map(1 << 16);
    let mut pair_words: FxHashMap<u64, Vec<u32>> = new_map(1 << 16);
    for wi in 0..num_words {
        let s = &w.syms[w.start[wi]..w.start[wi] + w.len[wi] as usize];
        for p in s.windows(2) {
            let k = key(p[0], p[1]);
            *pair_count.entry(k).or_insert(0) += w.count[wi];
            let list = pair_words.entry(k).or_default();
            if list.last() != Some(&(wi as u32)) {
                list.push(wi as u32);
            }
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> = pair_count.iter().map(|(&k, &c)| (c, Reverse(k))).collect();

    let mut delta: FxHashMap<u64, i64> = new_map(1 << 10);
    let mut merged_flag: Vec<bool> = Vec::new();
    let mut new_flag: Vec<bool> = Vec::new();
    let mut last_visit: Vec<u32> = vec![u32::MAX; num_words];
    let mut merge_no: u32 = 0;

    while decoder.len() < target_ranks {
        let Some((c, Reverse(k))) = heap.pop() else { break };
        let live = *pair_count.get(&k).unwrap_or(&0);
        if live != c {
            if live > 0 {
                heap.push((live, Reverse(k)));
            }
            continue;
        }
        if c <= 0 {
            break;
        }
        let (a, b) = ((k >> 32) as u32, k as u32);
        let mut bytes = Vec::with_capacity(decoder[a as usize].len() + decoder[b as usize].len());
        bytes.extend_from_slice(&decoder[a as usize]);
        bytes.extend_from_slice(&decoder[b as usize]);
        let bytes = bytes.into_boxed_slice();
        let new_id = match ids.get(&bytes) {
            Some(&id) => id,
            None => {
                let id = decoder.len() as u32;
                ids.insert(bytes.clone(), id);
                decoder.push(bytes);
                id
            }
        };

        let words = pair_words.remove(&k).unwrap_or_default();
        delta.clear();
        for &wi in &words {
            let wi = wi as usize;
            if last_visit[wi] == merge_no {
                continue;
            }
            last_visit[wi] = merge_no;
            let st = w.start[wi];
            let n = w.len[wi] as usize;
            let word = &mut w.syms[st..st + n];
            // Find merge sites (left to right, no overlap).
            merged_flag.clear();
            merged_flag.resize(n, false);
            let mut any = false;
            let mut i = 0;
            while i + 1 < n {
                if word[i] == a && word[i + 1] == b {
                    merged_flag[i] = true;
                    merged_flag[i + 1] = true;
                    any = true;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            if !any {
                continue; // stale: an earlier merge already rewrote this word
            }
            let cnt = w.count[wi];
            for j in 0..n - 1 {
                if merged_flag[j] || merged_flag[j + 1] {
                    *delta.entry(key(word[j], word[j + 1])).or_insert(0) -= cnt;
                }
            }
            // Rewrite in place.
            new_flag.clear();
            let (mut r, mut out) = (0, 0);
            while r < n {
                if r + 1 < n && merged_flag[r] && merged_flag[r + 1] && word[r] == a && word[r + 1] == b {
                    word[out] = new_id;
                    new_flag.push(true);
                    r += 2;
                } else {
                    word[out] = word[r];
                    new_flag.push(false);
                    r += 1;
                }
                out += 1;
            }
            w.len[wi] = out as u32;
            for j in 0..out.saturating_sub(1) {
                if new_flag[j] || new_flag[j + 1] {
                    let kk = key(word[j], word[j + 1]);
                    *delta.entry(kk).or_insert(0) += cnt;
                    let list = pair_words.entry(kk).or_default();
                    if list.last() != Some(&(wi as u32)) {
                        list.push(wi as u32);
                    }
                }
            }
        }
        for (&kk, &d) in delta.iter() {
            if d == 0 {
                continue;
            }
            let v = pair_count.entry(kk).or_insert(0);
            *v += d;
            if d > 0 {
                heap.push((*v, Reverse(kk)));
            }
        }
        pair_count.remove(&k);
        merge_no += 1;
    }
    if decoder.len() < target_ranks {
        return Err(format!(
            "the training corpus is too small for this vocabulary: it allows only {} tokens before every chunk \
             is a single token, but {target_ranks} ordinary tokens were asked for; use a smaller vocab_size or more text",
            decoder.len()
        ));
    }
    Ok(decoder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(texts: &[&str], vocab: usize, threads: usize) -> Vec<Box<[u8]>> {
        let mut t = Trainer::new(Pretokenizer::new(2).unwrap(), threads);
        let v: Vec<&[u8]> = texts.iter().map(|s| s.as_bytes()).collect();
        t.feed(&v).unwrap();
        t.train(vocab, vec![]).unwrap().decoder
    }

    #[test]
    fn learns_frequent_pairs_first() {
        let d = train(&["aaa bbb aaa bbb aaa ccc"], 259, 1);
        assert_eq!(&*d[256], b"aa");
    }

    #[test]
    fn thread_count_does_not_change_merges() {
        let text = "the quick brown fox jumps over the lazy dog\nthen the dog sleeps\n".repeat(500);
        assert_eq!(train(&[&text], 290, 1), train(&[&text], 290, 2));
    }
}
