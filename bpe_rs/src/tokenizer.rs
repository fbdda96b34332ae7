//! Encoding and decoding with a trained vocabulary, with exactly tiktoken's semantics.
//!
//! A vocabulary is a list of byte strings ("ranks": token id = rank) plus special tokens. Encoding splits the
//! text with the pre-tokenizer; a chunk that is itself a token is emitted directly, otherwise it starts as single
//! bytes and repeatedly merges the adjacent pair whose concatenation has the lowest rank (leftmost on ties) --
//! tiktoken's `byte_pair_merge`. We look pairs up by (left id, right id) instead of hashing the concatenated
//! bytes: since every part is a token, the concatenation is a token exactly when that pair is one of its
//! two-token splits, which we index once at load time.

use crate::hash::{new_map, FxHashMap};
use crate::pretok::Pretokenizer;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SpecialMode {
    /// Special-token text is encoded like any other text.
    Ordinary,
    /// Special-token text becomes the special token.
    Allowed,
    /// Special-token text is an error.
    Disallowed,
}

pub struct Special {
    pub text: Vec<u8>,
    pub id: u32,
}

pub struct Tokenizer {
    pub pretok: Pretokenizer,
    /// Byte string of every ordinary token, indexed by rank.
    pub decoder: Vec<Box<[u8]>>,
    encoder: FxHashMap<Box<[u8]>, u32>,
    pair_rank: FxHashMap<u64, u32>,
    byte_rank: [u32; 256],
    pub specials: Vec<Special>,
}

#[inline(always)]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

const NO_RANK: u32 = u32::MAX;
/// Chunks longer than this use the heap-based merge (O(n log n)) instead of the quadratic scan.
const LONG_CHUNK: usize = 48;

impl Tokenizer {
    /// Build from ranks (byte string of every token, in rank order) and special tokens.
    pub fn new(pretok: Pretokenizer, decoder: Vec<Box<[u8]>>, specials: Vec<Special>) -> Result<Self, String> {
        let n = decoder.len();
        if n > (u32::MAX - 1) as usize {
            return Err("too many tokens".into());
        }
        let mut encoder: FxHashMap<Box<[u8]>, u32> = new_map(n);
        for (rank, bytes) in decoder.iter().enumerate() {
            if bytes.is_empty() {
                return Err(format!("token {rank} is empty"));
            }
            if let Some(prev) = encoder.insert(bytes.clone(), rank as u32) {
                return Err(format!("tokens {prev} and {rank} have the same bytes {:?}", String::from_utf8_lossy(bytes)));
            }
        }
        let mut byte_rank = [NO_RANK; 256];
        for b in 0..256usize {
            match encoder.get(&[b as u8][..]) {
                Some(&r) => byte_rank[b] = r,
                None => return Err(format!("the vocabulary has no token for the single byte 0x{b:02x}")),
            }
        }
        let mut pair_rank: FxHashMap<u64, u32> = new_map(n * 4);
        for (rank, bytes) in decoder.iter().enumerate() {
            for cut in 1..bytes.len() {
                if let (Some(&l), Some(&r)) = (encoder.get(&bytes[..cut]), encoder.get(&bytes[cut..])) {
                    pair_rank.insert(pair_key(l, r), rank as u32);
                }
            }
        }
        let mut seen_ids = std::collections::HashSet::new();
        for s in &specials {
            if s.text.is_empty() {
                return Err("a special token is empty".into());
            }
            if (s.id as usize) < n {
                return Err(format!(
                    "special token {:?} has id {} which collides with an ordinary token (ids 0..{n})",
                    String::from_utf8_lossy(&s.text),
                    s.id
                ));
            }
            if !seen_ids.insert(s.id) {
                return Err(format!("two special tokens share id {}", s.id));
            }
        }
        Ok(Tokenizer { pretok, decoder, encoder, pair_rank, byte_rank, specials })
    }

    pub fn num_ranks(&self) -> usize {
        self.decoder.len()
    }

    /// One past the largest token id (ordinary or special).
    pub fn vocab_size(&self) -> usize {
        let max_special = self.specials.iter().map(|s| s.id as usize + 1).max().unwrap_or(0);
        self.decoder.len().max(max_special)
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        if let Some(b) = self.decoder.get(id as usize) {
            return Some(b);
        }
        self.specials.iter().find(|s| s.id == id).map(|s| &s.text[..])
    }

    /// Encode text with no special tokens recognised.
    pub fn encode_ordinary(&self, text: &[u8], out: &mut Vec<u32>) {
        let mut parts: Vec<u32> = Vec::with_capacity(LONG_CHUNK);
        let mut ranks: Vec<u32> = Vec::with_capacity(LONG_CHUNK);
        self.pretok.for_each_chunk(text, |a, b| {
            let chunk = &text[a..b];
            if chunk.len() == 1 {
                out.push(self.byte_rank[chunk[0] as usize]);
            } else if let Some(&r) = self.encoder.get(chunk) {
                out.push(r);
            } else if chunk.len() <= LONG_CHUNK {
                self.merge_short(chunk, &mut parts, &mut ranks, out);
            } else {
                self.merge_long(chunk, out);
            }
        });
    }

    #[inline]
    fn rank_of_pair(&self, a: u32, b: u32) -> u32 {
        *self.pair_rank.get(&pair_key(a, b)).unwrap_or(&NO_RANK)
    }

    /// tiktoken's quadratic merge loop, on token ids. `parts`/`ranks` are scratch buffers.
    fn merge_short(&self, chunk: &[u8], parts: &mut Vec<u32>, ranks: &mut Vec<u32>, out: &mut Vec<u32>) {
        parts.clear();
        parts.extend(chunk.iter().map(|&b| self.byte_rank[b as usize]));
        ranks.clear();
        ranks.extend(parts.windows(2).map(|w| self.rank_of_pair(w[0], w[1])));
        loop {
            let mut best = NO_RANK;
            let mut at = 0;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == NO_RANK {
                break;
            }
            parts[at] = best;
            parts.remove(at + 1);
            ranks.remove(at);
            if at > 0 {
                ranks[at - 1] = self.rank_of_pair(parts[at - 1], best);
            }
            if at < ranks.len() {
                ranks[at] = self.rank_of_pair(best, parts[at + 1]);
            }
        }
        out.extend_from_slice(parts);
    }

    /// The same merge order as `merge_short` (lowest rank, then leftmost), with a heap and a linked list so a
    /// long chunk (a run of spaces, a base64 blob) costs O(n log n) rather than O(n^2).
    fn merge_long(&self, chunk: &[u8], out: &mut Vec<u32>) {
        let n = chunk.len();
        let mut tok: Vec<u32> = chunk.iter().map(|&b| self.byte_rank[b as usize]).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.rank_of_pair(tok[i], tok[i + 1]);
            if r != NO_RANK {
                heap.push(Reverse((r, i)));
            }
        }
        while let Some(Reverse((r, i))) = heap.pop() {
            if !alive[i] || next[i] >= n || self.rank_of_pair(tok[i], tok[next[i]]) != r {
                continue; // stale entry
            }
            let j = next[i];
            tok[i] = r;
            alive[j] = false;
            next[i] = next[j];
            if next[i] < n {
                prev[next[i]] = i;
                let r2 = self.rank_of_pair(r, tok[next[i]]);
                if r2 != NO_RANK {
                    heap.push(Reverse((r2, i)));
                }
            }
            let p = prev[i];
            if p < n {
                let r0 = self.rank_of_pair(tok[p], r);
                if r0 != NO_RANK {
                    heap.push(Reverse((r0, p)));
                }
            }
        }
        let mut i = 0;
        while i < n {
            out.push(tok[i]);
            i = next[i];
        }
    }

    /// Encode arbitrary bytes: valid UTF-8 runs as text, every other byte as its single-byte token, so any
    /// byte string round-trips through `decode`.
    pub fn encode_bytes(&self, data: &[u8], out: &mut Vec<u32>) {
        let mut rest = data;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(_) => {
                    self.encode_ordinary(rest, out);
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.encode_ordinary(&rest[..good], out);
                    let bad = e.error_len().unwrap_or(rest.len() - good);
                    out.extend(rest[good..good + bad].iter().map(|&b| self.byte_rank[b as usize]));
                    rest = &rest[good + bad..];
                }
            }
        }
    }

    /// Encode with special tokens handled per `modes` (one entry per special token, in `self.specials` order).
    pub fn encode(&self, text: &[u8], modes: &[SpecialMode], out: &mut Vec<u32>) -> Result<(), String> {
        if modes.len() != self.specials.len() {
            return Err(format!("expected {} special-token modes, got {}", self.specials.len(), modes.len()));
        }
        if modes.iter().all(|&m| m == SpecialMode::Ordinary) {
            self.encode_ordinary(text, out);
            return Ok(());
        }
        let mut first_bytes = [false; 256];
        for (s, &m) in self.specials.iter().zip(modes) {
            if m != SpecialMode::Ordinary {
                first_bytes[s.text[0] as usize] = true;
            }
        }
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            if first_bytes[text[i] as usize] {
                // Longest special token that starts here.
                let mut found: Option<(usize, SpecialMode)> = None;
                for (k, (s, &m)) in self.specials.iter().zip(modes).enumerate() {
                    if m != SpecialMode::Ordinary
                        && text[i..].starts_with(&s.text)
                        && found.map_or(true, |(f, _)| self.specials[f].text.len() < s.text.len())
                    {
                        found = Some((k, m));
                    }
                }
                if let Some((k, m)) = found {
                    let special = &self.specials[k];
                    if m == SpecialMode::Disallowed {
                        return Err(format!(
                            "the text contains the special token {:?} (at byte {i}), which is not allowed here; \
                             allow it with allowed_special or encode it as text with disallowed_special=()",
                            String::from_utf8_lossy(&special.text)
                        ));
                    }
                    self.encode_ordinary(&text[start..i], out);
                    out.push(special.id);
                    i += special.text.len();
                    start = i;
                    continue;
                }
            }
            i += 1;
        }
        self.encode_ordinary(&text[start..], out);
        Ok(())
    }

    pub fn decode(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), String> {
        for (k, &id) in ids.iter().enumerate() {
            match self.token_bytes(id) {
                Some(b) => out.extend_from_slice(b),
                None => return Err(format!("token id {id} (position {k}) is not in the vocabulary of size {}", self.vocab_size())),
            }
        }
        Ok(())
    }
}

// ---- tiktoken ranks file: one line per token, "base64(bytes) rank" -------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8], out: &mut Vec<u8>) {
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let v = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(B64[(v >> 18) as usize & 63]);
        out.push(B64[(v >> 12) as usize & 63]);
        out.push(if c.len() > 1 { B64[(v >> 6) as usize & 63] } else { b'=' });
        out.push(if c.len() > 2 { B64[v as usize & 63] } else { b'=' });
    }
}

pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.is_empty() || s.len() % 4 != 0 {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let quads = s.len() / 4;
    for (q, c) in s.chunks(4).enumerate() {
        let last = q + 1 == quads;
        let pad = c.iter().rev().take_while(|&&x| x == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut v = 0u32;
        for &x in &c[..4 - pad] {
            v = v << 6 | val(x)?;
        }
        v <<= 6 * pad as u32;
        out.push((v >> 16) as u8);
        if pad < 2 {
            out.push((v >> 8) as u8);
        }
        if pad < 1 {
            out.push(v as u8);
        }
    }
    Some(out)
}

/// The ranks in tiktoken's file format.
pub fn write_ranks(decoder: &[Box<[u8]>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(decoder.len() * 16);
    for (rank, bytes) in decoder.iter().enumerate() {
        base64_encode(bytes, &mut out);
        out.push(b' ');
        out.extend_from_slice(rank.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Parse a tiktoken ranks file. Ranks must be 0..n-1, each exactly once (every file tiktoken ships is so).
pub fn parse_ranks(data: &[u8]) -> Result<Vec<Box<[u8]>>, String> {
    let mut slots: Vec<Option<Box<[u8]>>> = Vec::new();
    for (lineno, line) in data.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("ranks file line {}: {why}", lineno + 1);
        let sp = line.iter().position(|&b| b == b' ').ok_or_else(|| bad("expected 'base64 rank'"))?;
        let bytes = base64_decode(&line[..sp]).ok_or_else(|| bad("invalid base64"))?;
        let rank: usize = std::str::from_utf8(&line[sp + 1..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("rank is not a non-negative integer"))?;
        if rank > 50_000_000 {
            return Err(bad("rank is implausibly large"));
        }
        if slots.len() <= rank {
            slots.resize(rank + 1, None);
        }
        if slots[rank].is_some() {
            return Err(bad(&format!("rank {rank} appears twice")));
        }
        slots[rank] = Some(bytes.into_boxed_slice());
    }
    if slots.is_empty() {
        return Err("ranks file is empty".into());
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(r, s)| s.ok_or_else(|| format!("ranks file has no token with rank {r} (ranks must be 0..n-1)")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrip() {
        for n in 0..20usize {
            let data: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37)).collect();
            let mut enc = Vec::new();
            base64_encode(&data, &mut enc);
            if n == 0 {
                continue;
            }
            assert_eq!(base64_decode(&enc).unwrap(), data);
        }
        assert!(base64_decode(b"ab=c").is_none());
        assert!(base64_decode(b"abc").is_none());
    }

    fn byte_vocab() -> Vec<Box<[u8]>> {
        (0..=255u8).map(|b| vec![b].into_boxed_slice()).collect()
    }

    #[test]
    fn merge_short_and_long_agree() {
        let mut dec = byte_vocab();
        for t in ["ab", "abab", "aa", "aaaa", " a", "ba"] {
            dec.push(t.as_bytes().to_vec().into_boxed_slice());
        }
        let tok = Tokenizer::new(Pretokenizer::new(2).unwrap(), dec, vec![]).unwrap();
        for text in ["abababab", "aaaaaaa", "abaabbaba"] {
            let long = text.repeat(20);
            let mut a = Vec::new();
            let (mut p, mut r) = (Vec::new(), Vec::new());
            tok.merge_short(long.as_bytes(), &mut p, &mut r, &mut a);
            let mut b = Vec::new();
            tok.merge_long(long.as_bytes(), &mut b);
            assert_eq!(a, b, "{text}");
        }
    }
}
