//! Literal prefilter: one pass over the reply names the few rules worth running.
//!
//! At load, each rule's regex is reduced to a set of literals of which every match must
//! contain one (prefixes of some suffix of its top-level concatenation, via
//! `regex-syntax`'s extractor). All literals of all rules, `unless` patterns and provider
//! tokens go into one ASCII-case-insensitive [`Scanner`]; a reply then costs one scan plus
//! the regexes of the candidates it lit up, instead of every rule's regex. Rules whose regex
//! yields no useful literal (or that have no regex) are candidates for every reply. Where a
//! literal is by itself a whole match of an alternative ([`exact_literals`]), its
//! occurrence proves the candidate and no regex runs at all.
//!
//! The scanner reports every occurrence of every literal, like an overlapping
//! Aho-Corasick search, but filters offsets by a 16-bit key of their first four bytes
//! (one bit test a byte, in a table that stays in L1) and looks the survivors up in small
//! open-addressing tables. Its passes over a chunk of text decide without branches
//! until an offset is known to be worth a table lookup: which offsets pass depends on the
//! text alone, and a mispredicted branch at each of them cost more than the lookups. An
//! Aho-Corasick automaton over the same ~1800 case-folded literals measured 4-8 ns/byte
//! here (DFA: megabytes of transitions; contiguous NFA: failure chains), several times the
//! whole per-reply budget.

use super::rules::{MAX_RULES, MAX_TOKENS};
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind};
use std::collections::HashMap;

/// Literals shorter than this light up too many replies to be worth indexing.
const MIN_LITERAL: usize = 3;
/// A rule needing more literals than this is cheaper to keep as an always-candidate.
const MAX_LITERALS_PER_RULE: usize = 512;
/// One extracted prefix set is shortened until it has at most this many literals.
const MAX_PREFIXES: usize = 64;

/// The literal occurrence is a whole match of the target's regex.
pub(crate) const PROVES: u8 = 1;
/// … provided an ASCII word boundary sits right before it (`\b` leads the alternative).
pub(crate) const WB_BEFORE: u8 = 2;
/// … provided an ASCII word boundary sits right after it.
pub(crate) const WB_AFTER: u8 = 4;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    Rule(u32),
    Token(u32),
    /// A rule's `unless` pattern: when none of its literals occurs, it cannot match.
    Unless(u32),
}

/// Marks token keys apart from rule indices in [`Light::key`].
pub(crate) const TOKEN_KEY: u16 = 0x8000;
/// Marks the keys of rules' `unless` patterns (rule indices stay below `UNLESS_KEY`).
pub(crate) const UNLESS_KEY: u16 = 0x4000;
const _: () = assert!(MAX_RULES <= UNLESS_KEY as usize);
/// [`Light::bit`] of an `unless` pattern: it makes nothing a candidate.
pub(crate) const NO_BIT: u16 = u16::MAX;
/// [`Light::key`] of an occurrence that needs no place in the hit list.
pub(crate) const NO_KEY: u16 = u16::MAX;
const _: () = assert!(NO_KEY != TOKEN_KEY | (MAX_TOKENS as u16 - 1));
/// Words of the largest candidate set: rules first, then tokens from the word after the
/// last rule's ([`Prefilter::token_word`]).
pub(crate) const CANDIDATE_WORDS: usize = (MAX_RULES + MAX_TOKENS) / 64;

/// What one occurrence of a literal means for one target, precomputed so the per-hit
/// work is a bit set and a push.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Light {
    /// The target's key in the hit list: a rule index, `TOKEN_KEY | token`,
    /// `UNLESS_KEY | rule`, or [`NO_KEY`].
    pub key: u16,
    /// The target's bit in the candidate set (tokens from [`Prefilter::token_word`]), or
    /// [`NO_BIT`].
    pub bit: u16,
    /// Whether an occurrence of the literal is by itself a match of the target's regex
    /// ([`PROVES`]), given the word boundaries it asks for. Such candidates need no regex
    /// run.
    pub proof: u8,
}

impl Target {
    fn light(self, proof: u8, token_word: usize) -> Light {
        let (key, bit) = match self {
            Target::Rule(r) => (r as u16, r as u16),
            Target::Token(k) => (TOKEN_KEY | k as u16, (token_word * 64 + k as usize) as u16),
            Target::Unless(r) => (UNLESS_KEY | r as u16, NO_BIT),
        };
        Light { key, bit, proof }
    }
}

#[derive(Debug)]
pub(crate) struct Prefilter {
    pub scanner: Scanner,
    /// Per literal: the range of `lights` it lights up.
    pub spans: Vec<(u32, u32)>,
    pub lights: Vec<Light>,
    /// Rules and tokens that are candidates for every reply: the candidate set a reply
    /// starts from (rule words, then token words).
    pub always: Vec<u64>,
    /// The first word of token bits (the rule words come before it).
    pub token_word: usize,
    /// Per rule / token: its literals start every match (verify anchored at each hit).
    pub rule_anchored: Vec<bool>,
    pub token_anchored: Vec<bool>,
    /// Per rule: its `unless` pattern has literals in the scanner (else it is always run),
    /// and whether they start every match.
    pub unless_indexed: Vec<bool>,
    pub unless_anchored: Vec<bool>,
}

pub(crate) fn build(
    inputs: &[(Target, Option<&str>)],
    n_rules: usize,
    n_tokens: usize,
) -> Prefilter {
    let mut by_literal: HashMap<Vec<u8>, Vec<(Target, u8)>> = HashMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    let token_word = n_rules.div_ceil(64);
    let mut always = vec![0u64; token_word + n_tokens.div_ceil(64)];
    let mut rule_anchored = vec![false; n_rules];
    let mut token_anchored = vec![false; n_tokens];
    let mut unless_indexed = vec![false; n_rules];
    let mut unless_anchored = vec![false; n_rules];
    for &(target, pattern) in inputs {
        match pattern.and_then(required_literals) {
            Some(Required { lits, anchored }) => {
                match target {
                    Target::Rule(r) => rule_anchored[r as usize] = anchored,
                    Target::Token(t) => token_anchored[t as usize] = anchored,
                    Target::Unless(r) => {
                        unless_indexed[r as usize] = true;
                        unless_anchored[r as usize] = anchored;
                    }
                }
                // An occurrence of an alternative's whole literal proves the pattern
                // wherever it is, whether or not the other alternatives are anchored.
                let exact = pattern.map(exact_literals).unwrap_or_default();
                for lit in lits {
                    let key = lit.to_ascii_lowercase();
                    let proof = exact.get(&key).copied().unwrap_or(0);
                    let entry = by_literal.entry(key.clone()).or_insert_with(|| {
                        order.push(key);
                        Vec::new()
                    });
                    match entry.iter_mut().find(|(t, _)| *t == target) {
                        // Two spellings of one literal (case): either proof holds.
                        Some((_, p)) if *p == 0 => *p = proof,
                        Some(_) => {}
                        None => entry.push((target, proof)),
                    }
                }
            }
            None => {
                let bit = target.light(0, token_word).bit;
                if bit != NO_BIT {
                    always[bit as usize / 64] |= 1 << (bit % 64);
                }
            }
        }
    }
    let mut spans = Vec::with_capacity(order.len());
    let mut lights = Vec::new();
    for lit in &order {
        let t = &by_literal[lit];
        spans.push((lights.len() as u32, (lights.len() + t.len()) as u32));
        lights.extend(t.iter().map(|&(target, proof)| {
            let mut l = target.light(proof, token_word);
            // Where an unproven occurrence of an unanchored pattern is does not matter: its
            // verification searches the whole text. Only `unless` patterns ask whether one
            // occurred at all.
            let anchored = match target {
                Target::Rule(r) => rule_anchored[r as usize],
                Target::Token(t) => token_anchored[t as usize],
                Target::Unless(_) => true,
            };
            if proof == 0 && !anchored {
                l.key = NO_KEY;
            }
            l
        }));
    }
    let scanner = Scanner::new(&order);
    Prefilter {
        scanner,
        spans,
        lights,
        always,
        token_word,
        rule_anchored,
        token_anchored,
        unless_indexed,
        unless_anchored,
    }
}

/// Finds every occurrence of a set of literals (ASCII case-insensitive, each at least three
/// bytes long). A bit filter over the low four bits of the first four bytes of every
/// literal rejects most offsets with one L1 load; where it passes, sixteen bytes are
/// loaded, lowercased a word at a time, and checked against each table's bit filter; where
/// one passes, they are looked up by the literal's first sixteen bytes (or eight, four or
/// three, for shorter literals) in small open-addressing tables.
#[derive(Debug)]
pub(crate) struct Scanner {
    /// Bit filter indexed by [`head_key`] of each literal's first four bytes (a
    /// three-byte literal sets the key for every possible fourth byte).
    head: Box<[u64; HEAD_WORDS]>,
    /// Literals of 16 bytes or more, keyed by both words ([`sixteen_key`]): extracted
    /// literals often share their first eight bytes (`mailbox unavailable…`), and a key of
    /// eight bytes left a dozen of them to compare one by one.
    sixteen: Table<512>,
    eight: Table<256>,
    four: Table<512>,
    three: Table<64>,
    /// Lowercased literals.
    lits: Vec<Box<[u8]>>,
}

#[derive(Debug)]
struct Table<const W: usize> {
    /// Bit filter over the key's hash, `W` words (a power of two): its size is a
    /// constant, so a lookup needs neither a bounds check nor a shift loaded from memory.
    filter: Box<[u64; W]>,
    /// Power-of-two size, at most half full; a slot with no literals (`n == 0`) is free.
    slots: Vec<Slot>,
    shift: u32,
    /// Literals grouped by key (ranges in `Slot`).
    ids: Vec<Entry>,
}

/// One literal behind a table key, with the next eight bytes after the key (lowercased,
/// masked to the literal's length) so most literals that share the key are told apart by
/// one word compare instead of a byte-wise tail compare. Literals extracted from one
/// pattern often share a long prefix (`mailbox unavailable`, `mailbox unavailable:`, …).
#[derive(Copy, Clone, Debug)]
struct Entry {
    id: u32,
    len: u32,
    /// The literal's bytes at `word_at..word_at + 8`, big-endian, zero past its end.
    word: u64,
    mask: u64,
}

#[derive(Copy, Clone, Debug)]
struct Slot {
    key: u64,
    lo: u32,
    /// Literals behind the key: at least one in a slot that holds a key.
    n: u16,
}

#[inline(always)]
fn lower(b: u8) -> u8 {
    b | (((b.wrapping_sub(b'A') < 26) as u8) << 5)
}

/// Size of the head filter: 8 KiB, so it stays in L1.
const HEAD_WORDS: usize = (1 << (4 * HEAD_BITS)) / 64;
/// Bits of each byte in the head key. Five bits (a 128 KiB filter, 6.6% of offsets
/// passing instead of 8.6%) saved 3% of the instructions but was no faster: the filter
/// then lives in L2.
const HEAD_BITS: u32 = 4;
const BYTE_MASK: u8 = (1 << HEAD_BITS) - 1;
const KEY_MASK: usize = (1 << (4 * HEAD_BITS)) - 1;

/// The low four bits of each of four bytes, in 16 bits. Case lives in bit 5 of an ASCII
/// letter, so the text needs no lowercasing here; bytes that differ only above bit 3 (`a`
/// and `q`, a digit and a letter) collide, which only lets a few more offsets through to
/// the exact tables. Four bytes of context reject a quarter more offsets of reply text than
/// five bits of three bytes did.
#[inline(always)]
fn head_key(a: u8, b: u8, c: u8, d: u8) -> usize {
    ((a & BYTE_MASK) as usize) << (3 * HEAD_BITS)
        | ((b & BYTE_MASK) as usize) << (2 * HEAD_BITS)
        | ((c & BYTE_MASK) as usize) << HEAD_BITS
        | (d & BYTE_MASK) as usize
}

/// Up to eight bytes from the start of `b`, big-endian (first byte highest, zero-padded),
/// with ASCII letters lowercased in one word operation.
#[inline(always)]
fn load8_lower(b: &[u8]) -> u64 {
    let x = match b.first_chunk::<8>() {
        // One unaligned load; the byte copy below is only for the last few bytes of a text.
        Some(w) => u64::from_be_bytes(*w),
        None => {
            let mut buf = [0u8; 8];
            buf[..b.len()].copy_from_slice(b);
            u64::from_be_bytes(buf)
        }
    };
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let seven = x & LOW7;
    let above_z = seven + 0x2525_2525_2525_2525; // high bit set where byte > 'Z'
    let from_a = seven + 0x3F3F_3F3F_3F3F_3F3F; // high bit set where byte >= 'A'
    let upper = !x & (from_a ^ above_z) & HIGH;
    x | (upper >> 2)
}

/// The key of a literal of sixteen bytes or more: for a given first word, a different
/// second word always gives a different key.
#[inline(always)]
fn sixteen_key(first: u64, second: u64) -> u64 {
    first.rotate_left(29).wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ second
}

/// A zeroed bit filter of `W` words, on the heap (a filter is kilobytes).
fn zeroed_words<const W: usize>() -> Box<[u64; W]> {
    vec![0u64; W]
        .into_boxed_slice()
        .try_into()
        .expect("W words")
}

#[inline(always)]
fn mix(k: u64) -> u64 {
    k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl<const W: usize> Table<W> {
    /// Hash bits that index the filter.
    const FILTER_SHIFT: u32 = 64 - (W * 64).trailing_zeros();

    /// `keyed` literals grouped by key.
    fn new(mut keyed: Vec<(u64, Entry)>) -> Self {
        const { assert!(W.is_power_of_two()) };
        keyed.sort_unstable_by_key(|e| (e.0, e.1.id));
        let mut keys: Vec<u64> = keyed.iter().map(|e| e.0).collect();
        keys.dedup();
        let bits = (2 * keys.len().max(1))
            .next_power_of_two()
            .trailing_zeros()
            .max(4);
        let shift = 64 - bits;
        let free = Slot {
            key: 0,
            lo: 0,
            n: 0,
        };
        let mut slots = vec![free; 1 << bits];
        let mut filter = zeroed_words::<W>();
        let mut ids = Vec::with_capacity(keyed.len());
        let mut i = 0;
        for &k in &keys {
            let lo = ids.len() as u32;
            while i < keyed.len() && keyed[i].0 == k {
                ids.push(keyed[i].1);
                i += 1;
            }
            let mut h = (mix(k) >> shift) as usize;
            while slots[h].n != 0 {
                h = (h + 1) & (slots.len() - 1);
            }
            slots[h] = Slot {
                key: k,
                lo,
                n: u16::try_from(ids.len() - lo as usize).expect("literals per key"),
            };
            let f = (mix(k).rotate_left(32) >> Self::FILTER_SHIFT) as usize;
            filter[f / 64] |= 1 << (f % 64);
        }
        Table {
            filter,
            slots,
            shift,
            ids,
        }
    }

    /// Whether the filter lets `k` through: 0 or 1, without a branch.
    #[inline(always)]
    fn passes(&self, k: u64) -> u32 {
        let f = (mix(k).rotate_left(32) >> Self::FILTER_SHIFT) as usize;
        (self.filter[f / 64] >> (f % 64)) as u32 & 1
    }

    /// The literals whose key is `k`, from the slots (the filter passed).
    #[inline(always)]
    fn lookup(&self, k: u64) -> &[Entry] {
        let m = mix(k);
        let mask = self.slots.len() - 1;
        let mut h = (m >> self.shift) as usize;
        loop {
            let slot = self.slots[h];
            if slot.n == 0 {
                return &[];
            }
            if slot.key == k {
                let lo = slot.lo as usize;
                return &self.ids[lo..lo + slot.n as usize];
            }
            h = (h + 1) & mask;
        }
    }
}

impl Scanner {
    fn new(lits: &[Vec<u8>]) -> Scanner {
        let lits: Vec<Box<[u8]>> = lits
            .iter()
            .map(|l| l.iter().map(|&b| lower(b)).collect())
            .collect();
        let key = |l: &[u8], n: usize| l[..n].iter().fold(0u64, |k, &b| k << 8 | b as u64);
        let entry = |i: usize, l: &[u8], at: usize| {
            let rest = &l[at.min(l.len())..];
            let n = rest.len().min(8);
            let mut w = [0u8; 8];
            w[..n].copy_from_slice(&rest[..n]);
            Entry {
                id: i as u32,
                len: l.len() as u32,
                word: u64::from_be_bytes(w),
                mask: u64::MAX.checked_shl(8 * (8 - n) as u32).unwrap_or(0),
            }
        };
        let (mut sixteen, mut eight, mut four, mut three) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, l) in lits.iter().enumerate() {
            match l.len() {
                0..=2 => {}
                3 => three.push((key(l, 3), entry(i, l, 3))),
                4..=7 => four.push((key(l, 4), entry(i, l, 0))),
                8..=15 => {
                    eight.push((key(l, 8), entry(i, l, 8)));
                }
                _ => {
                    // The entry's word is the first eight bytes: with them the key
                    // determines the second eight.
                    let k8 = key(l, 8);
                    let e = Entry {
                        word: k8,
                        mask: u64::MAX,
                        ..entry(i, l, 8)
                    };
                    sixteen.push((sixteen_key(k8, key(&l[8..], 8)), e));
                }
            }
        }
        let mut head = zeroed_words::<HEAD_WORDS>();
        for l in lits.iter().filter(|l| l.len() >= 3) {
            // A three-byte literal may be followed by anything, or by the end of the text
            // (which the scan reads as a zero byte).
            let fourth = if l.len() == 3 {
                0..BYTE_MASK + 1
            } else {
                l[3] & BYTE_MASK..(l[3] & BYTE_MASK) + 1
            };
            for d in fourth {
                let h = head_key(l[0], l[1], l[2], d);
                head[h / 64] |= 1 << (h % 64);
            }
        }
        Scanner {
            head,
            sixteen: Table::new(sixteen),
            eight: Table::new(eight),
            four: Table::new(four),
            three: Table::new(three),
            lits,
        }
    }

    /// Calls `f(literal id, start, end)` for every occurrence of every literal.
    ///
    /// Which offsets hold a literal depends on the text alone, so a branch per offset or
    /// per table would be mispredicted at random; across many different replies those
    /// mispredictions cost more than the work itself. The text is therefore scanned in
    /// chunks, each in three passes: the head filter collects the offsets that pass
    /// without a branch; the four tables' filters are read for each of them, again without
    /// a branch, keeping the offsets some table lets through (about four in ten); only
    /// those are looked up.
    #[inline]
    pub fn for_each(&self, text: &[u8], mut f: impl FnMut(usize, usize, usize)) {
        const CHUNK: usize = 64;
        let n = text.len();
        if n < 3 {
            return;
        }
        // `roll` holds the head key of the four bytes at the offset; it rolls four bits a
        // byte. It is not masked in the loop: the mask is off the chain of dependent
        // operations from one byte to the next.
        let mut roll = head_key(0, text[0], text[1], text[2]) as u64;
        // Offsets of the chunk that some table lets through (offset in the chunk, table
        // bits) and the windows read there, in two arrays: one array of both measured 2%
        // slower.
        let mut found = [(0u8, 0u8); CHUNK];
        let mut windows = [(0u64, 0u64); CHUNK];
        // Offsets `from..` of a chunk start literals; the scan reads the byte three after.
        for from in (0..n - 3).step_by(CHUNK) {
            let end = (from + CHUNK).min(n - 3);
            // Shifted in one offset at a time (one add-with-carry after the bit test): bit
            // `j` stands for offset `end - 1 - j`.
            let mut passed = 0u64;
            for &b in &text[from + 3..end + 3] {
                roll = roll << HEAD_BITS | (b & BYTE_MASK) as u64;
                let k = roll as usize & KEY_MASK;
                passed = passed << 1 | (self.head[k / 64] >> (k % 64) & 1);
            }
            let last = (end - from - 1) as u8;
            let mut q = 0;
            while passed != 0 {
                let i = last - passed.trailing_zeros() as u8;
                passed &= passed - 1;
                let window = Self::window(&text[from + i as usize..]);
                let tables = self.tables(window);
                found[q % CHUNK] = (i, tables);
                windows[q % CHUNK] = window;
                q += (tables != 0) as usize;
            }
            for (&(i, tables), &window) in found[..q].iter().zip(&windows[..q]) {
                self.probe(text, from + i as usize, tables, window, &mut f);
            }
        }
        // The last offset: only a three-byte literal fits, followed by the end (which the
        // head key reads as a zero byte).
        let k = (roll << HEAD_BITS) as usize & KEY_MASK;
        if self.head[k / 64] & (1 << (k % 64)) != 0 {
            let window = Self::window(&text[n - 3..]);
            let tables = self.tables(window);
            if tables != 0 {
                self.probe(text, n - 3, tables, window, &mut f);
            }
        }
    }

    /// The first sixteen bytes of `rest`, lowercased; zero bytes past its end, which no
    /// literal holds.
    #[inline(always)]
    fn window(rest: &[u8]) -> (u64, u64) {
        (
            load8_lower(rest),
            load8_lower(rest.get(8..).unwrap_or_default()),
        )
    }

    /// A bit for each table whose filter lets the window (from [`Self::window`]) through.
    #[inline(always)]
    fn tables(&self, (k8, next): (u64, u64)) -> u8 {
        (self.three.passes(k8 >> 40)
            | self.four.passes(k8 >> 32) << 1
            | self.eight.passes(k8) << 2
            | self.sixteen.passes(sixteen_key(k8, next)) << 3) as u8
    }

    /// The literals that occur at `start`, in the tables whose filters let it through.
    #[inline(always)]
    fn probe(
        &self,
        text: &[u8],
        start: usize,
        tables: u8,
        (k8, next): (u64, u64),
        f: &mut impl FnMut(usize, usize, usize),
    ) {
        let rest = &text[start..];
        if tables & 1 != 0 {
            for e in self.three.lookup(k8 >> 40) {
                f(e.id as usize, start, start + 3);
            }
        }
        if tables & 2 != 0 {
            // The whole literal (four to seven bytes) is in the window already loaded.
            for e in self.four.lookup(k8 >> 32) {
                if rest.len() >= e.len as usize && k8 & e.mask == e.word {
                    f(e.id as usize, start, start + e.len as usize);
                }
            }
        }
        if tables & 4 != 0 {
            for e in self.eight.lookup(k8) {
                if rest.len() >= e.len as usize && next & e.mask == e.word {
                    f(e.id as usize, start, start + e.len as usize);
                }
            }
        }
        if tables & 8 != 0 {
            for e in self.sixteen.lookup(sixteen_key(k8, next)) {
                if e.word == k8
                    && rest.len() >= e.len as usize
                    && (e.len == 16 || self.tail_matches(rest, e))
                {
                    f(e.id as usize, start, start + e.len as usize);
                }
            }
        }
    }

    /// Bytes 16.. of a long literal, at the start of `rest` (long enough).
    #[inline(never)]
    fn tail_matches(&self, rest: &[u8], e: &Entry) -> bool {
        let lit = &self.lits[e.id as usize];
        rest[16..lit.len()].eq_ignore_ascii_case(&lit[16..])
    }
}

/// Whether `pattern` has a group with inline flags (`(?i)`, `(?-u:…)`): an unescaped `(?`
/// other than `(?:`. An escaped parenthesis made optional (`\(?`) is not one.
fn has_inline_flags(pattern: &str) -> bool {
    let b = pattern.as_bytes();
    b.windows(2).enumerate().any(|(i, w)| {
        let escaped = b[..i].iter().rev().take_while(|&&c| c == b'\\').count() % 2 == 1;
        w == b"(?" && !escaped && b.get(i + 2) != Some(&b':')
    })
}

/// Literals (lowercased) whose occurrence alone is a match of `pattern`, with the word
/// boundaries each needs ([`PROVES`] | [`WB_BEFORE`] | [`WB_AFTER`]): the exact literals of
/// top-level alternatives that contain no look-around except an ASCII `\b` at either end.
/// The rule regexes are case-insensitive, so an ASCII-case-insensitive occurrence of such a
/// literal is a match. Patterns with inline flags or groups other than `(?:` are left alone
/// (a `(?-i)` would make a literal case-sensitive).
pub(crate) fn exact_literals(pattern: &str) -> HashMap<Vec<u8>, u8> {
    use regex_syntax::hir::Look;
    let mut out = HashMap::new();
    if has_inline_flags(pattern) {
        return out;
    }
    let Ok(hir) = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
    else {
        return out;
    };
    let strip = |mut h: &Hir| -> Hir {
        while let HirKind::Capture(c) = h.kind() {
            h = &c.sub;
        }
        h.clone()
    };
    let top = strip(&hir);
    let alts: Vec<Hir> = match top.kind() {
        HirKind::Alternation(a) => a.iter().map(strip).collect(),
        _ => vec![top.clone()],
    };
    let is_wb = |h: &Hir| matches!(h.kind(), HirKind::Look(Look::WordAscii));
    for alt in alts {
        let mut flags = PROVES;
        let middle = match alt.kind() {
            HirKind::Concat(parts) => {
                let mut parts = &parts[..];
                if parts.first().is_some_and(is_wb) {
                    flags |= WB_BEFORE;
                    parts = &parts[1..];
                }
                if parts.last().is_some_and(is_wb) {
                    flags |= WB_AFTER;
                    parts = &parts[..parts.len() - 1];
                }
                Hir::concat(parts.to_vec())
            }
            _ => alt.clone(),
        };
        if !middle.properties().look_set().is_empty() {
            continue;
        }
        let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&middle);
        for lit in seq.literals().unwrap_or(&[]) {
            let b = lit.as_bytes();
            if lit.is_exact() && !b.is_empty() && caseless_prefix(b) == b {
                let e = out.entry(b.to_ascii_lowercase()).or_insert(flags);
                // Two alternatives spell the same literal: the weaker condition holds.
                *e &= flags;
            }
        }
    }
    out
}

/// Literals one of which occurs in every match of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Required {
    pub lits: Vec<Vec<u8>>,
    /// Every match *starts* with one of the literals, so a candidate can be verified with
    /// an anchored search at each literal occurrence instead of a scan of the whole reply.
    pub anchored: bool,
}

/// The literals one of which occurs in every match of `pattern`, or `None` if there is no
/// useful set. Extraction is case-sensitive and the automaton ASCII-case-insensitive, so the
/// pair over-approximates the case-insensitive regex; literals are cut before their first
/// non-ASCII character with case variants, which the automaton would not fold.
pub(crate) fn required_literals(pattern: &str) -> Option<Required> {
    // Byte-oriented, ASCII classes: `\d` stays ten digits instead of every Unicode digit,
    // which keeps patterns like `RL\d{6}` extractable. Non-ASCII literals still parse.
    let hir = match regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
    {
        Ok(h) => h,
        Err(_) => regex_syntax::ParserBuilder::new()
            .build()
            .parse(pattern)
            .ok()?,
    };
    let r = necessary(&hir)?;
    (r.lits.len() <= MAX_LITERALS_PER_RULE).then_some(r)
}

fn necessary(hir: &Hir) -> Option<Required> {
    match hir.kind() {
        HirKind::Capture(c) => necessary(&c.sub),
        HirKind::Alternation(alts) => {
            let mut all = Required {
                lits: Vec::new(),
                anchored: true,
            };
            for a in alts {
                let r = necessary(a)?;
                all.lits.extend(r.lits);
                all.anchored &= r.anchored;
            }
            all.lits.sort();
            all.lits.dedup();
            Some(all)
        }
        HirKind::Concat(parts) => {
            // Any suffix of a concatenation matches inside every match of the whole, so
            // the prefixes of each suffix are all valid; keep the most selective set. Only
            // the prefixes of the whole (i = 0) keep their position at the match start.
            let mut best: Option<Required> = None;
            for i in 0..parts.len() {
                let sub = Hir::concat(parts[i..].to_vec());
                let whole = prefixes(&sub).map(|lits| Required {
                    lits,
                    anchored: i == 0,
                });
                let part = necessary_part(&parts[i]).map(|r| Required {
                    anchored: r.anchored && i == 0,
                    lits: r.lits,
                });
                for cand in [whole, part].into_iter().flatten() {
                    if better(&cand, best.as_ref()) {
                        best = Some(cand);
                    }
                }
            }
            best
        }
        _ => prefixes(hir).map(|lits| Required {
            lits,
            anchored: true,
        }),
    }
}

/// A single concatenation element that is itself a group or alternation.
fn necessary_part(hir: &Hir) -> Option<Required> {
    match hir.kind() {
        HirKind::Capture(_) | HirKind::Alternation(_) => necessary(hir),
        _ => None,
    }
}

/// Longer literals light up fewer replies; anchored ones are much cheaper to verify, so
/// they win once their literals are reasonably long.
fn score(r: &Required) -> (usize, bool, bool, usize, std::cmp::Reverse<usize>) {
    let min = r.lits.iter().map(|l| l.len()).min().unwrap_or(0);
    (
        min.min(4),
        !r.lits.iter().any(|l| is_common_word(l)),
        r.anchored,
        min.min(8),
        std::cmp::Reverse(r.lits.len()),
    )
}

/// The commonest words of bounce text. A literal set with a member that is no more than
/// one of them (`user `, `mailbox `: the pattern goes on with something variable) lights
/// its rule up on a large share of all replies, so a set from another part of the pattern
/// is preferred even if it loses the anchored verification.
const COMMON_WORDS: [&[u8]; 12] = [
    b"account",
    b"address",
    b"box",
    b"domain",
    b"e-mail",
    b"email",
    b"mail",
    b"mailbox",
    b"message",
    b"recipient",
    b"sender",
    b"user",
];

fn is_common_word(lit: &[u8]) -> bool {
    let word = lit.trim_ascii();
    COMMON_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w))
}

fn better(cand: &Required, best: Option<&Required>) -> bool {
    match best {
        None => true,
        Some(b) => score(cand) > score(b),
    }
}

fn prefixes(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    // A generous total so cross products (`(BL|SL)\d{6}`) stay finite; shortened below.
    let mut seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_total(4096)
        .extract(hir);
    // Too many prefixes (digit runs, classes): shorten them until they collapse.
    let mut keep = seq.max_literal_len().unwrap_or(0);
    while seq.len().is_some_and(|n| n > MAX_PREFIXES) && keep > MIN_LITERAL {
        keep -= 1;
        seq.keep_first_bytes(keep);
        seq.dedup();
    }
    let lits = seq.literals()?;
    if lits.is_empty() || lits.len() > MAX_PREFIXES {
        return None;
    }
    let mut out = Vec::with_capacity(lits.len());
    for l in lits {
        let b = caseless_prefix(l.as_bytes());
        if b.len() < MIN_LITERAL {
            return None;
        }
        out.push(b.to_vec());
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// The literal up to its first non-ASCII character that has case variants: the automaton
/// folds ASCII case only, so `É` would miss `é`, but `ディ` or `→` are matched exactly.
fn caseless_prefix(b: &[u8]) -> &[u8] {
    let Ok(s) = std::str::from_utf8(b) else {
        return &b[..b.iter().position(|c| !c.is_ascii()).unwrap_or(b.len())];
    };
    for (i, c) in s.char_indices() {
        if !c.is_ascii() && (c.is_lowercase() || c.is_uppercase()) {
            return &b[..i];
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits(p: &str) -> Option<Vec<String>> {
        required_literals(p).map(|r| r.lits).map(|v| {
            v.into_iter()
                .map(|l| String::from_utf8(l).unwrap())
                .collect()
        })
    }

    #[test]
    fn extraction() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("user unknown", Some(&["user unknown"])),
            ("(spf|dkim) domain", Some(&["dkim domain", "spf domain"])),
            (
                r"\bAS\(\d{3,5}\)",
                Some(&[
                    "AS(0", "AS(1", "AS(2", "AS(3", "AS(4", "AS(5", "AS(6", "AS(7", "AS(8", "AS(9",
                ]),
            ),
            (r".*over quota", Some(&["over quota"])),
            (r"\d+ bytes exceeds", Some(&[" bytes exceeds"])),
            ("a|bc", None),
            (".*", None),
            ("bloqu[ée]", Some(&["bloqu", "bloque"])),
            (
                r"\bRL\d{6}\b",
                Some(&[
                    "RL0", "RL1", "RL2", "RL3", "RL4", "RL5", "RL6", "RL7", "RL8", "RL9",
                ]),
            ),
            ("ディレクトリ", Some(&["ディレクトリ"])),
            (
                "mailbox (is )?full",
                Some(&["mailbox full", "mailbox is full"]),
            ),
        ];
        for (p, want) in cases {
            let got = lits(p);
            let want = want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(got, want, "{p}");
        }
    }

    #[test]
    fn word_lowercasing_matches_bytewise() {
        let samples: [&[u8]; 5] = [
            b"ABCXYZ@[",
            b"Hello, W",
            b"\xC3\x89t\xC3\xA9 ok",
            b"`az{AZ}",
            b"ab",
        ];
        for s in samples {
            let mut want = [0u8; 8];
            for (i, &c) in s.iter().take(8).enumerate() {
                want[i] = lower(c);
            }
            assert_eq!(load8_lower(s), u64::from_be_bytes(want), "{s:?}");
        }
        for c in 0..=255u8 {
            assert_eq!(lower(c), c.to_ascii_lowercase(), "{c}");
        }
    }

    /// Literals as the scanner takes them.
    fn bytes(lits: &[&str]) -> Vec<Vec<u8>> {
        lits.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    /// Asserts that the scanner reports exactly the occurrences a byte-by-byte search finds
    /// (every literal at every offset, ASCII case-insensitively); returns how many.
    fn scan_as_brute_force(sc: &Scanner, lits: &[Vec<u8>], text: &[u8]) -> usize {
        let mut got = Vec::new();
        sc.for_each(text, |id, start, end| {
            assert_eq!(end - start, lits[id].len());
            got.push((id, start))
        });
        got.sort();
        let mut want = Vec::new();
        for (id, l) in lits.iter().enumerate() {
            for start in 0..text.len() {
                let t = &text[start..];
                if t.len() >= l.len() && t[..l.len()].eq_ignore_ascii_case(l) {
                    want.push((id, start));
                }
            }
        }
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(text));
        got.len()
    }

    #[test]
    fn scanner_finds_every_occurrence() {
        let lits = bytes(&[
            "user unknown",
            "unknown",
            "USER",
            "ディレクトリ",
            "abc",
            "abcd",
            "unknownabcd",
            // One eight-byte key, told apart by the next word and by the bytes after 16.
            "mailbox ",
            "mailbox unav",
            "mailbox unavailable",
            "mailbox unavailable: over quota",
            "mailbox unavailable: over limit",
            "mailbox is full",
            // One four-byte key, four to seven bytes long.
            "users",
            "userx1",
            "user ok",
        ]);
        let sc = Scanner::new(&lits);
        let mut total = 0;
        // Literals across the scanner's chunk boundaries (every 64 offsets) and at the end.
        let long: Vec<String> = (50..140)
            .step_by(3)
            .map(|pad| {
                let mut t = "x".repeat(pad);
                t.push_str("mailbox unavailable: over quota USER abc ");
                t.push_str(&"y".repeat(140 - pad));
                t.push_str("users userx1 abc");
                t
            })
            .collect();
        for text in [
            "User Unknown user unknownabcd ディレクトリ",
            "abc",
            "ABC",
            "xabc",
            "xyz abcd abc",
            "USER",
            "Mailbox unavailable: OVER QUOTA; mailbox is full. mailbox unavailable: over limi",
            "mailbox unavai",
            "MAILBOX UNAVAILABLE: OVER QUOT",
            "mailbox is ful mailbox ",
            "users userx1 USER OK userx user o",
        ]
        .into_iter()
        .chain(long.iter().map(String::as_str))
        {
            total += scan_as_brute_force(&sc, &lits, text.as_bytes());
        }
        assert!(total >= 30, "{total}");
        let mut none = 0;
        sc.for_each(b"ab", |_, _, _| none += 1);
        Scanner::new(&[]).for_each(b"anything", |_, _, _| none += 1);
        assert_eq!(none, 0);
    }

    /// Random texts of every length up to 300 bytes, made of pieces of the literals, mixed
    /// case and other bytes: the scanner reports exactly what a byte-by-byte search does,
    /// whatever chunk boundary or text end a literal meets.
    #[test]
    fn scanner_agrees_with_brute_force_on_random_texts() {
        let lits = bytes(&[
            "abc",
            "spf",
            "user",
            "users",
            "user unknown",
            "mailbox unavailable",
            "mailbox unavailable: over quota",
            "rate limited",
            "blocked",
            "550 5.7.1",
            "x.7.28",
        ]);
        let sc = Scanner::new(&lits);
        // A fixed xorshift sequence: the same texts on every run.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut found = 0;
        for len in 0..=300usize {
            for _ in 0..4 {
                let mut text = Vec::with_capacity(len + 40);
                while text.len() < len {
                    let r = next();
                    match r % 4 {
                        0 => text.push(b"ab -:.5x7"[(r >> 8) as usize % 9]),
                        _ => {
                            let l = &lits[(r >> 8) as usize % lits.len()];
                            let cut = 1 + (r >> 16) as usize % l.len();
                            text.extend(l[..cut].iter().map(|&b| {
                                if r >> 32 & 1 != 0 {
                                    b.to_ascii_uppercase()
                                } else {
                                    b
                                }
                            }));
                        }
                    }
                }
                text.truncate(len);
                found += scan_as_brute_force(&sc, &lits, &text);
            }
        }
        assert!(found > 1000, "{found}");
    }

    #[test]
    fn every_match_contains_a_literal() {
        // Soundness on a few tricky patterns: whatever the regex matches, a literal is inside.
        let cases = [
            (r"(?:spf|dkim) (?:domain|record)", "your SPF Domain is bad"),
            (
                r"unusual rate.{0,80}\bIP\b",
                "an Unusual Rate of mail from your IP",
            ),
            (r"\[TSS?0\d\]", "421 [TSS04] deferred"),
            (
                r"mailbox (?:is )?(?:full|over quota)",
                "MAILBOX IS OVER QUOTA",
            ),
        ];
        for (p, hay) in cases {
            let re = regex::RegexBuilder::new(p)
                .case_insensitive(true)
                .build()
                .unwrap();
            assert!(re.is_match(hay), "{p} on {hay}");
            let l = required_literals(p).expect(p).lits;
            let low = hay.to_ascii_lowercase();
            assert!(
                l.iter()
                    .any(|l| low.contains(&String::from_utf8_lossy(l).to_ascii_lowercase())),
                "{p}: {l:?} not in {hay}"
            );
        }
    }

    #[test]
    fn exact_literals_of_alternatives() {
        let cases: &[(&str, &[(&str, u8)])] = &[
            ("spam|junk", &[("spam", PROVES), ("junk", PROVES)]),
            (
                r"\bUBE\b|Spam",
                &[("ube", PROVES | WB_BEFORE | WB_AFTER), ("spam", PROVES)],
            ),
            (r"\bspam|spam", &[("spam", PROVES)]),
            (
                "mailbox (is )?full",
                &[("mailbox full", PROVES), ("mailbox is full", PROVES)],
            ),
            (
                "(?:spf|dkim) fail",
                &[("spf fail", PROVES), ("dkim fail", PROVES)],
            ),
            ("junk|abc.*x|^start|a\\bb", &[("junk", PROVES)]),
            ("(?-i)abc", &[]),
            // An escaped parenthesis made optional is no inline flag; an escaped backslash
            // before one leaves the flag a flag.
            (r"\(?abc", &[("(abc", PROVES), ("abc", PROVES)]),
            (r"\\(?i)abc", &[]),
            (r"\d+ bytes", &[]),
        ];
        for (p, want) in cases {
            let mut want: Vec<(Vec<u8>, u8)> = want
                .iter()
                .map(|(l, f)| (l.as_bytes().to_vec(), *f))
                .collect();
            want.sort();
            let mut got: Vec<(Vec<u8>, u8)> = exact_literals(p).into_iter().collect();
            got.sort();
            assert_eq!(got, want, "{p}");
        }
    }

    #[test]
    fn exact_literals_of_the_builtin_rules_are_matches() {
        let mut n = 0;
        for (_, text) in crate::classify::BUILTIN_SOURCES {
            let v: toml::Value = toml::from_str(text).unwrap();
            let mut patterns: Vec<String> = Vec::new();
            for r in v
                .get("rule")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
            {
                patterns.extend(r.get("text").and_then(|t| t.as_str()).map(String::from));
            }
            if let Some(t) = v
                .get("provider")
                .and_then(|p| p.get("tokens"))
                .and_then(|t| t.as_array())
            {
                patterns.extend(t.iter().filter_map(|t| t.as_str()).map(String::from));
            }
            for p in patterns {
                let re = crate::classify::rules::build_regex(&p).unwrap();
                for (lit, flags) in exact_literals(&p) {
                    let lit = String::from_utf8(lit).unwrap();
                    // Spaces around it give the boundaries a literal of word bytes asks for.
                    let word =
                        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                    if (flags & WB_BEFORE != 0 && !word(lit.chars().next()))
                        || (flags & WB_AFTER != 0 && !word(lit.chars().last()))
                    {
                        continue;
                    }
                    for hay in [
                        format!("x {lit} y"),
                        format!("x {} y", lit.to_ascii_uppercase()),
                    ] {
                        let m = re.find(&hay).unwrap_or_else(|| panic!("{p}: {hay:?}"));
                        assert_eq!(m.start(), 2, "{p}: {hay:?}");
                    }
                    n += 1;
                }
            }
        }
        assert!(n > 100, "{n} exact literals");
    }
}
