//! The pre-tokenizer: splits text into chunks exactly as the GPT-4-style split pattern does, by hand.
//!
//! The pattern (nanochat's, with the digit-group length as a parameter N; N = 3 gives GPT-4's cl100k grouping):
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! A regex engine tries the alternatives left to right at every position; `chunk_end` does the same with one
//! pass over the characters and a class table (letter, number, White_Space, other) generated from Unicode data.
//! Two facts keep it exact: every character starts some alternative (so no byte is ever skipped), and the
//! case-insensitive contractions match `s`/`S`/`ſ` (U+017F folds to `s`), `d`, `m`, `t`, `ll`, `ve`, `re`.
//! Tests compare it with the `regex` package on random Unicode text.

use crate::unicode_tables::CLASS_RUNS;
use std::sync::OnceLock;

pub const OTHER: u8 = 0;
pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const SPACE: u8 = 3;

const BLOCK_BITS: u32 = 7;
const BLOCK: usize = 1 << BLOCK_BITS;

/// Two-level table: `stage2[stage1[cp >> 7] * 128 + (cp & 127)]` is the class of code point `cp`.
struct ClassTable {
    stage1: Vec<u16>,
    stage2: Vec<u8>,
}

fn build_table() -> ClassTable {
    let mut flat = vec![OTHER; 0x110000];
    for (k, &(start, class)) in CLASS_RUNS.iter().enumerate() {
        let end = CLASS_RUNS.get(k + 1).map_or(0x110000, |r| r.0) as usize;
        flat[start as usize..end].fill(class);
    }
    let mut stage1 = Vec::with_capacity(0x110000 / BLOCK);
    let mut stage2: Vec<u8> = Vec::new();
    let mut seen: std::collections::HashMap<&[u8], u16> = std::collections::HashMap::new();
    for block in flat.chunks(BLOCK) {
        let idx = *seen.entry(block).or_insert_with(|| {
            stage2.extend_from_slice(block);
            (stage2.len() / BLOCK - 1) as u16
        });
        stage1.push(idx);
    }
    ClassTable { stage1, stage2 }
}

static TABLE: OnceLock<ClassTable> = OnceLock::new();

const fn ascii_classes() -> [u8; 128] {
    let mut t = [OTHER; 128];
    let mut c = 0;
    while c < 128 {
        let b = c as u8;
        t[c] = if b.is_ascii_alphabetic() {
            LETTER
        } else if b.is_ascii_digit() {
            NUMBER
        } else if b == b' ' || (b >= 0x09 && b <= 0x0d) {
            SPACE
        } else {
            OTHER
        };
        c += 1;
    }
    t
}
static ASCII_CLASS: [u8; 128] = ascii_classes();

/// Class as stored in the table: OTHER, LETTER, NUMBER, SPACE, or UNASSIGNED (a code point with no character
/// in the tables' Unicode version; the pre-tokenizer treats it as OTHER).
pub const UNASSIGNED: u8 = 4;

#[inline]
pub fn table_class(cp: u32) -> u8 {
    if cp < 128 {
        ASCII_CLASS[cp as usize]
    } else {
        let t = TABLE.get_or_init(build_table);
        let block = t.stage1[(cp >> BLOCK_BITS) as usize] as usize;
        t.stage2[block * BLOCK + (cp as usize & (BLOCK - 1))]
    }
}

/// Pre-tokenizer class of a code point (< 0x110000): OTHER, LETTER, NUMBER or SPACE.
#[inline]
pub fn class_of(cp: u32) -> u8 {
    table_class(cp) & 3 // UNASSIGNED (4) -> OTHER (0)
}

/// Decode the UTF-8 character starting at `s[i]`; `s` must be valid UTF-8 and `i` a character boundary.
#[inline(always)]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
    } else {
        let cp = ((b0 & 0x07) << 18)
            | ((s[i + 1] as u32 & 0x3F) << 12)
            | ((s[i + 2] as u32 & 0x3F) << 6)
            | (s[i + 3] as u32 & 0x3F);
        (cp, 4)
    }
}

/// Class of the character at `i` and its length in bytes; `(None-class, 0)` past the end.
#[inline(always)]
fn class_at(s: &[u8], i: usize) -> (u8, u32, usize) {
    if i >= s.len() {
        return (u8::MAX, 0, 0);
    }
    let b = s[i];
    if b < 0x80 {
        return (ASCII_CLASS[b as usize], b as u32, 1);
    }
    let (cp, len) = decode(s, i);
    (class_of(cp), cp, len)
}

#[inline(always)]
fn is_crlf(cp: u32) -> bool {
    cp == 0x0A || cp == 0x0D
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pretokenizer {
    /// Longest run of \p{N} characters in one chunk (the `N` of `\p{N}{1,N}`).
    pub max_digits: u32,
}

impl Pretokenizer {
    pub fn new(max_digits: u32) -> Result<Self, String> {
        if !(1..=16).contains(&max_digits) {
            return Err(format!("max_digits must be between 1 and 16, got {max_digits}"));
        }
        Ok(Pretokenizer { max_digits })
    }

    /// The regex this pre-tokenizer implements, as written into tokenizer files (tiktoken's `pat_str`).
    pub fn pattern(&self) -> String {
        format!(
            r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
            self.max_digits
        )
    }

    /// Inverse of `pattern`: which `max_digits` a pattern string stands for, if it is one we implement.
    pub fn from_pattern(pattern: &str) -> Option<Self> {
        (1..=16).map(|n| Pretokenizer { max_digits: n }).find(|p| p.pattern() == pattern)
    }

    /// End (exclusive byte offset) of the chunk starting at byte `i` of the valid UTF-8 text `s`.
    #[inline]
    pub fn chunk_end(&self, s: &[u8], i: usize) -> usize {
        let (class, cp, len) = class_at(s, i);
        let next = i + len;
        // Alternative 1: contractions.
        if cp == '\'' as u32 {
            if let Some(end) = contraction_end(s, next) {
                return end;
            }
        }
        match class {
            LETTER => letters_end(s, next),
            NUMBER => {
                let mut j = next;
                let mut count = 1;
                while count < self.max_digits {
                    let (c, _, l) = class_at(s, j);
                    if c != NUMBER {
                        break;
                    }
                    j += l;
                    count += 1;
                }
                j
            }
            OTHER => {
                // Alternative 2: one non-letter/number prefix, then letters.
                let (c2, _, l2) = class_at(s, next);
                if c2 == LETTER {
                    return letters_end(s, next + l2);
                }
                // Alternative 4 (without the space): punctuation run, then any \r / \n.
                punct_end(s, next)
            }
            _ => {
                // White space (SPACE): alternatives 2, 4, then the three white-space ones.
                let (c2, _, l2) = class_at(s, next);
                if c2 == LETTER && !is_crlf(cp) {
                    return letters_end(s, next + l2);
                }
                if c2 == OTHER && cp == ' ' as u32 {
                    return punct_end(s, next + l2);
                }
                whitespace_end(s, i, cp, len)
            }
        }
    }

    /// Calls `f(start, end)` for every chunk of `text`, in order.
    #[inline]
    pub fn for_each_chunk(&self, text: &[u8], mut f: impl FnMut(usize, usize)) {
        let mut i = 0;
        while i < text.len() {
            let end = self.chunk_end(text, i);
            f(i, end);
            i = end;
        }
    }
}

#[inline]
fn contraction_end(s: &[u8], i: usize) -> Option<usize> {
    let lower = |k: usize| s.get(k).map(|b| b.to_ascii_lowercase());
    match lower(i)? {
        b's' | b'd' | b'm' | b't' => Some(i + 1),
        b'l' if lower(i + 1) == Some(b'l') => Some(i + 2),
        b'v' if lower(i + 1) == Some(b'e') => Some(i + 2),
        b'r' if lower(i + 1) == Some(b'e') => Some(i + 2),
        // U+017F LATIN SMALL LETTER LONG S case-folds to 's'.
        0xC5 if s.get(i + 1) == Some(&0xBF) => Some(i + 2),
        _ => None,
    }
}

#[inline]
fn letters_end(s: &[u8], mut j: usize) -> usize {
    loop {
        // ASCII fast path: most letters in most text.
        while j < s.len() && s[j] < 0x80 && s[j].is_ascii_alphabetic() {
            j += 1;
        }
        let (c, _, l) = class_at(s, j);
        if c != LETTER {
            return j;
        }
        j += l;
    }
}

#[inline]
fn punct_end(s: &[u8], mut j: usize) -> usize {
    loop {
        let (c, _, l) = class_at(s, j);
        if c != OTHER {
            break;
        }
        j += l;
    }
    while j < s.len() && (s[j] == b'\r' || s[j] == b'\n') {
        j += 1;
    }
    j
}

/// Alternatives 5-7 for a chunk starting with white space at `i` (first char `cp`, `len` bytes).
#[inline]
fn whitespace_end(s: &[u8], i: usize, cp: u32, len: usize) -> usize {
    let mut last_crlf_end = if is_crlf(cp) { i + len } else { 0 };
    let mut last_char_start = i;
    let mut j = i + len;
    loop {
        let (c, cp2, l) = class_at(s, j);
        if c != SPACE {
            break;
        }
        if is_crlf(cp2) {
            last_crlf_end = j + l;
        }
        last_char_start = j;
        j += l;
    }
    if last_crlf_end != 0 {
        return last_crlf_end; // \s*[\r\n]
    }
    if j == s.len() {
        return j; // \s+(?!\S) at the end of the text
    }
    if last_char_start > i {
        return last_char_start; // \s+(?!\S): leave the last space to prefix the next word
    }
    j // \s+
}

/// Where a text may be cut so that pre-tokenizing the pieces gives the same chunks as the whole: right after
/// a '\n' that is followed by an ASCII character that is not white space. Every alternative that can consume a
/// '\n' ends at the end of its white-space or CR/LF run, so no chunk crosses such a point.
pub fn safe_split_point(s: &[u8], from: usize) -> Option<usize> {
    let mut k = from;
    while k + 1 < s.len() {
        if s[k] == b'\n' {
            let b = s[k + 1];
            if b > b' ' && b < 0x7f {
                return Some(k + 1);
            }
        }
        k += 1;
    }
    None
}

/// Cut `text` into pieces of about `target` bytes at safe split points (see `safe_split_point`).
pub fn split_for_threads(text: &[u8], target: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        match safe_split_point(text, start + target) {
            Some(cut) => {
                out.push(&text[start..cut]);
                start = cut;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str, n: u32) -> Vec<&str> {
        let p = Pretokenizer::new(n).unwrap();
        let mut out = Vec::new();
        p.for_each_chunk(text.as_bytes(), |a, b| out.push(&text[a..b]));
        out
    }

    #[test]
    fn basic_split() {
        assert_eq!(chunks("Hello world", 2), vec!["Hello", " world"]);
        assert_eq!(chunks("I'm 12345 ok!!\n\n  x", 2), vec!["I", "'m", " ", "12", "34", "5", " ok", "!!\n\n", " ", " x"]);
        assert_eq!(chunks("12345", 3), vec!["123", "45"]);
        assert_eq!(chunks("a  \n  b", 2), vec!["a", "  \n", " ", " b"]);
        assert_eq!(chunks("x   ", 2), vec!["x", "   "]);
        assert_eq!(chunks("'ſ 'LL", 2), vec!["'ſ", " '", "LL"]);
    }

    #[test]
    fn classes() {
        assert_eq!(class_of('é' as u32), LETTER);
        assert_eq!(class_of('中' as u32), LETTER);
        assert_eq!(class_of('٣' as u32), NUMBER);
        assert_eq!(class_of(0x3000), SPACE);
        assert_eq!(class_of(0x1c), OTHER);
        assert_eq!(class_of('😀' as u32), OTHER);
    }

    #[test]
    fn split_points_do_not_change_chunks() {
        let text = "def f(x):\n    return x  \n\n\nclass A:\n  pass\n".repeat(50);
        let p = Pretokenizer::new(2).unwrap();
        let mut whole = Vec::new();
        p.for_each_chunk(text.as_bytes(), |a, b| whole.push(&text.as_bytes()[a..b]));
        let mut parts = Vec::new();
        for piece in split_for_threads(text.as_bytes(), 37) {
            p.for_each_chunk(piece, |a, b| parts.push(&piece[a..b]));
        }
        assert_eq!(whole, parts);
    }
}
