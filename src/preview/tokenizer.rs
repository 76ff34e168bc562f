//! CLIP's byte-level BPE tokenizer, offline, and A1111's chunking of a parsed prompt into the
//! 77-token windows its text encoders read.
//!
//! The vocabulary is `bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP's, shipped here gzip-compressed,
//! byte for byte as in the `open_clip_torch` wheel; see `bpe_simple_vocab_16e6.LICENSE`). It is the
//! same file for SD1's CLIP-L and the OpenCLIP encoders of SD2 and SDXL: 256 byte symbols, their
//! end-of-word (`</w>`) forms, 48,894 merges, then `<|startoftext|>` and `<|endoftext|>`.
//!
//! Ids equal those of transformers' `CLIPTokenizer` as A1111 runs it (ftfy installed), which
//! first cleans the text with `ftfy.fix_text`, collapses whitespace and lowercases. Of ftfy's fixes,
//! the character-level ones are reproduced (C1 controls read as Windows-1252, Latin ligatures,
//! full/half-width forms, curly quotes, line breaks, terminal escapes, control characters, NFC);
//! two are not: HTML entities (`&amp;` → `&`, which ftfy decodes on lines without `<`) and mojibake
//! repair (`cafÃ©` → `café`). open_clip's tokenizer, which A1111 uses for OpenCLIP encoders, also
//! decodes HTML entities and does not know the `<|endoftext|>` spelling of the specials; everything
//! else agrees. fixtures/prompts/tokenizer.json records both peers.

use super::prompt::PromptPiece;
use crate::{Error, Result};
use regex::Regex;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::OnceLock;
use unicode_normalization::UnicodeNormalization;

/// `<|startoftext|>`, the first token of every window.
pub const START_OF_TEXT: u32 = 49406;
/// `<|endoftext|>`, the token after the text; SD1's CLIP-L also pads with it.
pub const END_OF_TEXT: u32 = 49407;
/// `,</w>`, where A1111 prefers to end a chunk.
pub const COMMA: u32 = 267;
/// Tokens of text per window; with the start and end tokens a window has 77.
pub const CHUNK_LENGTH: usize = 75;
/// Tokens per window as the text encoder reads them.
pub const WINDOW_LENGTH: usize = CHUNK_LENGTH + 2;

const VOCABULARY_GZ: &[u8] = include_bytes!("bpe_simple_vocab_16e6.txt.gz");
/// Merges used by CLIP: lines 1..=48,894 of the file (line 0 is a version header; the rest of the
/// file's 262,145 lines were never part of the vocabulary).
const MERGES: usize = 49152 - 256 - 2;

/// CLIP's `bytes_to_unicode`: the byte symbols in vocabulary order. Printable Latin-1 bytes map to
/// themselves and come first; the other 68 bytes follow in byte order, mapped to U+0100 onwards.
fn byte_symbols() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut symbols: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    for (n, b) in others.enumerate() {
        symbols.push((b, char::from_u32(256 + n as u32).expect("below U+0200")));
    }
    symbols
}

/// The BPE model: every symbol is a token id; a merge of two ids has the id 512 + its rank.
pub struct ClipTokenizer {
    /// Token id of each byte's symbol; the end-of-word form is this + 256.
    byte_ids: [u32; 256],
    /// (left id, right id) → rank; the merged token's id is 512 + rank.
    merge_ranks: HashMap<(u32, u32), u32>,
}

impl ClipTokenizer {
    /// The tokenizer over the vocabulary shipped with loratool.
    pub fn new() -> Result<Self> {
        Self::from_gzip(VOCABULARY_GZ)
    }

    /// A tokenizer over a `bpe_simple_vocab_16e6.txt.gz`-format file (gzip-compressed).
    pub fn from_gzip(bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| Error::Invalid(format!("CLIP vocabulary: {why}"));
        let symbols = byte_symbols();
        let mut byte_ids = [0u32; 256];
        let mut ids: HashMap<String, u32> = HashMap::with_capacity(2 * 256 + MERGES);
        for (i, &(byte, symbol)) in symbols.iter().enumerate() {
            byte_ids[byte as usize] = i as u32;
            ids.insert(symbol.to_string(), i as u32);
            ids.insert(format!("{symbol}</w>"), i as u32 + 256);
        }
        let reader = BufReader::new(flate2::read::GzDecoder::new(bytes));
        let mut merge_ranks = HashMap::with_capacity(MERGES);
        for (number, line) in reader.lines().enumerate().skip(1).take(MERGES) {
            let line = line.map_err(|e| bad(format!("line {}: {e}", number + 1)))?;
            let mut parts = line.split_whitespace();
            let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(format!("line {} is not a merge: '{line}'", number + 1)));
            };
            let id_of = |symbol: &str| {
                ids.get(symbol).copied().ok_or_else(|| {
                    bad(format!(
                        "line {}: '{symbol}' is not defined before it is merged",
                        number + 1
                    ))
                })
            };
            let pair = (id_of(left)?, id_of(right)?);
            let rank = merge_ranks.len() as u32;
            merge_ranks.insert(pair, rank);
            ids.insert(format!("{left}{right}"), 512 + rank);
        }
        if merge_ranks.len() != MERGES {
            return Err(bad(format!(
                "{} merges, expected {MERGES}",
                merge_ranks.len()
            )));
        }
        Ok(ClipTokenizer {
            byte_ids,
            merge_ranks,
        })
    }

    /// The token ids of a text, without the start and end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean_text(text);
        let mut ids = Vec::new();
        for word in word_pattern().find_iter(&cleaned) {
            match word.as_str() {
                "<|startoftext|>" => ids.push(START_OF_TEXT),
                "<|endoftext|>" => ids.push(END_OF_TEXT),
                word => ids.extend(self.bpe(word)),
            }
        }
        ids
    }

    /// One word: its UTF-8 bytes as symbols, the last one marked end-of-word, then the
    /// lowest-ranked adjacent pair merged everywhere, left to right, until no pair has a rank.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let mut symbols: Vec<u32> = word.bytes().map(|b| self.byte_ids[b as usize]).collect();
        if let Some(last) = symbols.last_mut() {
            *last += 256;
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| self.merge_ranks.get(&(pair[0], pair[1])))
                .min()
                .copied();
            let Some(rank) = best else { break };
            let merged = 512 + rank;
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len()
                    && self.merge_ranks.get(&(symbols[i], symbols[i + 1])) == Some(&rank)
                {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
            if symbols.len() == 1 {
                break;
            }
        }
        symbols
    }
}

/// CLIP's split of cleaned text into words: the specials, English contractions, runs of letters,
/// single digits, runs of anything else but spaces (case-insensitive, as the peers compile it).
fn word_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .expect("static pattern")
    })
}

/// ftfy's `remove_terminal_escapes` (`\d` of Python's `re` is any script's decimal digit).
fn terminal_escape() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").expect("static pattern"))
}

/// transformers' `CLIPTokenizer._tokenize` cleaning with ftfy present:
/// `whitespace_clean(ftfy.fix_text(text)).lower()`.
pub fn clean_text(text: &str) -> String {
    // ftfy fixes line by line (each segment keeps its '\n'), each until nothing changes.
    let mut fixed = String::with_capacity(text.len());
    for segment in text.split_inclusive('\n') {
        let mut current = segment.to_string();
        loop {
            let next = fix_segment(&current);
            if next == current {
                break;
            }
            current = next;
        }
        fixed.push_str(&current);
    }
    // `re.sub(r"\s+", " ", text).strip()` with the `regex` module: \s is Unicode White_Space.
    let collapsed = fixed.split(char::is_whitespace).filter(|s| !s.is_empty());
    collapsed.collect::<Vec<_>>().join(" ").to_lowercase()
}

/// One round of ftfy's character-level fixers, in ftfy's order, each over the whole segment.
fn fix_segment(text: &str) -> String {
    let text: String = text.chars().map(c1_as_windows_1252).collect();
    let text: String = text
        .chars()
        .map(|c| latin_ligature(c).map_or_else(|| c.to_string(), str::to_string))
        .collect();
    let text: String = text
        .chars()
        .map(|c| standard_width(c).unwrap_or_else(|| c.to_string()))
        .collect();
    let text: String = text.chars().map(uncurl_quote).collect();
    let text = text
        .replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
    let text = terminal_escape().replace_all(&text, "");
    let text: String = text.chars().filter(|&c| !is_removed_control(c)).collect();
    text.nfc().collect()
}

/// ftfy's `sloppy-windows-1252` for U+0080–U+009F; the five bytes Windows-1252 leaves undefined
/// stay as they are.
fn c1_as_windows_1252(c: char) -> char {
    const TABLE: [u32; 32] = [
        0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x008D, 0x017D, 0x008F, 0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
        0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178,
    ];
    match c as u32 {
        code @ 0x80..=0x9F => char::from_u32(TABLE[(code - 0x80) as usize]).unwrap_or(c),
        _ => c,
    }
}

/// ftfy's `LIGATURES`: Latin typographic ligatures and legacy digraphs.
fn latin_ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// ftfy's `fix_character_width`: the ideographic space becomes a space, and the Halfwidth and
/// Fullwidth Forms block (U+FF01–U+FFEF) its NFKC form where that differs.
fn standard_width(c: char) -> Option<String> {
    match c as u32 {
        0x3000 => Some(" ".into()),
        0xFF01..=0xFFEF => {
            let standard: String = std::iter::once(c).nfkc().collect();
            (standard.chars().ne(std::iter::once(c))).then_some(standard)
        }
        _ => None,
    }
}

/// ftfy's `uncurl_quotes`.
fn uncurl_quote(c: char) -> char {
    match c {
        '\u{02BC}' | '\u{2018}'..='\u{201B}' => '\'',
        '\u{201C}'..='\u{201F}' => '"',
        _ => c,
    }
}

/// ftfy's `remove_control_chars`: ASCII controls but tab, newlines and form feed; deprecated Arabic
/// format controls; the byte-order mark; interlinear annotations and the object replacement
/// character.
fn is_removed_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

/// What fills a window after the end token: SD1's CLIP-L (and SDXL's, in A1111) repeats the end
/// token, OpenCLIP encoders (SD2, SDXL's bigG) use id 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipPadding {
    EndOfText,
    Zero,
}

/// A1111's chunking settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOptions {
    pub padding: ClipPadding,
    /// `comma_padding_backtrack`: when a chunk fills up less than this many tokens after a comma,
    /// the words after the comma move to the next chunk. 0 turns it off; A1111's default is 20.
    pub comma_backtrack: usize,
}

impl ChunkOptions {
    /// A1111's defaults for an encoder that pads with the given token.
    pub fn a1111(padding: ClipPadding) -> Self {
        ChunkOptions {
            padding,
            comma_backtrack: 20,
        }
    }
}

/// A textual-inversion embedding the prompt may name: its trigger word and how many token vectors
/// it stands for. Loading the vectors is the encoder's business; chunking only reserves the slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextualInversion {
    pub name: String,
    pub vectors: usize,
}

/// Where an embedding's vectors go in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingSlot {
    /// Index into the embeddings passed to [`ClipTokenizer::chunk`].
    pub embedding: usize,
    /// Index in the 77-token window of the first vector (A1111's fix offset + 1, for the start
    /// token). The vectors occupy `position..position + vectors`, tokens there are 0.
    pub position: usize,
}

/// One 77-token window: start token, 75 tokens of text or end/padding, end token.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// Token ids as the encoder reads them, padding applied.
    pub tokens: Vec<u32>,
    /// Emphasis multiplier per token (1 for start, end and padding).
    pub multipliers: Vec<f64>,
    pub embeddings: Vec<EmbeddingSlot>,
}

/// A prompt as A1111 feeds it to a text encoder: windows encoded one by one and concatenated.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkedPrompt {
    pub chunks: Vec<PromptChunk>,
    /// A1111's token count ("12/75" in its UI): 75 per full chunk plus the tokens of the last.
    pub token_count: usize,
}

/// A registered embedding: the ids its name encodes to.
struct EmbeddingName {
    ids: Vec<u32>,
    index: usize,
}

impl ClipTokenizer {
    /// `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`: each piece encoded on its own, tokens
    /// gathered into chunks of 75 with their piece's weight; a chunk that fills up within
    /// `comma_backtrack` tokens after a comma moves the words after the comma to the next chunk;
    /// [`PromptPiece::Break`] closes the chunk; an embedding's name becomes `vectors` zero tokens
    /// and starts a new chunk when it does not fit. An empty prompt is one window of start, end and
    /// padding.
    ///
    /// Kept from A1111: when the comma rule moves an embedding's slots to the next chunk, its
    /// [`EmbeddingSlot`] stays with the chunk it was first placed in (at a position past that
    /// chunk's text), so the vectors land in that chunk's padding and the moved slots keep token 0.
    pub fn chunk(
        &self,
        pieces: &[PromptPiece],
        embeddings: &[TextualInversion],
        options: &ChunkOptions,
    ) -> Result<ChunkedPrompt> {
        let names = self.embedding_names(embeddings)?;
        let mut builder = ChunkBuilder::default();
        for piece in pieces {
            let (text, weight) = match piece {
                PromptPiece::Break => {
                    builder.close_chunk(false);
                    continue;
                }
                PromptPiece::Text { text, weight } => (text, *weight),
            };
            let tokens = self.encode(text);
            let mut position = 0;
            while position < tokens.len() {
                let token = tokens[position];
                if token == COMMA {
                    builder.last_comma = Some(builder.tokens.len());
                } else if let Some(comma) = builder.last_comma {
                    if options.comma_backtrack != 0
                        && builder.tokens.len() == CHUNK_LENGTH
                        && builder.tokens.len() - comma <= options.comma_backtrack
                    {
                        builder.move_after_comma_to_next_chunk(comma + 1);
                    }
                }
                if builder.tokens.len() == CHUNK_LENGTH {
                    builder.close_chunk(false);
                }
                match find_embedding(&names, &tokens, position) {
                    None => {
                        builder.tokens.push(token);
                        builder.multipliers.push(weight);
                        position += 1;
                    }
                    Some(name) => {
                        let vectors = embeddings[name.index].vectors;
                        if builder.tokens.len() + vectors > CHUNK_LENGTH {
                            builder.close_chunk(false);
                        }
                        builder.embeddings.push(EmbeddingSlot {
                            embedding: name.index,
                            position: builder.tokens.len() + 1,
                        });
                        builder.tokens.extend(std::iter::repeat_n(0, vectors));
                        builder
                            .multipliers
                            .extend(std::iter::repeat_n(weight, vectors));
                        position += name.ids.len();
                    }
                }
            }
        }
        if !builder.tokens.is_empty() || builder.chunks.is_empty() {
            builder.close_chunk(true);
        }
        let mut chunks = builder.chunks;
        for chunk in &mut chunks {
            pad(&mut chunk.tokens, options.padding);
        }
        Ok(ChunkedPrompt {
            chunks,
            token_count: builder.token_count,
        })
    }

    /// A1111's `EmbeddingDatabase.ids_lookup`: names by their first token, longest first (ties in
    /// the order given).
    fn embedding_names(
        &self,
        embeddings: &[TextualInversion],
    ) -> Result<HashMap<u32, Vec<EmbeddingName>>> {
        let mut names: HashMap<u32, Vec<EmbeddingName>> = HashMap::new();
        for (index, embedding) in embeddings.iter().enumerate() {
            if embedding.vectors > CHUNK_LENGTH {
                return Err(Error::Invalid(format!(
                    "embedding '{}' has {} vectors; a prompt chunk holds {CHUNK_LENGTH}",
                    embedding.name, embedding.vectors
                )));
            }
            let ids = self.encode(&embedding.name);
            let Some(&first) = ids.first() else {
                return Err(Error::Invalid(format!(
                    "embedding name '{}' has no tokens, so no prompt can name it",
                    embedding.name
                )));
            };
            names
                .entry(first)
                .or_default()
                .push(EmbeddingName { ids, index });
        }
        for candidates in names.values_mut() {
            candidates.sort_by_key(|name| std::cmp::Reverse(name.ids.len()));
        }
        Ok(names)
    }
}

/// `find_embedding_at_position`: the longest registered name whose ids start at `position`.
fn find_embedding<'a>(
    names: &'a HashMap<u32, Vec<EmbeddingName>>,
    tokens: &[u32],
    position: usize,
) -> Option<&'a EmbeddingName> {
    names
        .get(&tokens[position])?
        .iter()
        .find(|name| tokens[position..].starts_with(&name.ids))
}

/// `process_tokens`: with a pad token other than the end token, everything after the first end
/// token becomes padding.
fn pad(tokens: &mut [u32], padding: ClipPadding) {
    if padding == ClipPadding::Zero {
        if let Some(end) = tokens.iter().position(|&t| t == END_OF_TEXT) {
            tokens[end + 1..].fill(0);
        }
    }
}

/// The chunk being filled and the finished ones (`tokenize_line`'s local state).
#[derive(Default)]
struct ChunkBuilder {
    chunks: Vec<PromptChunk>,
    tokens: Vec<u32>,
    multipliers: Vec<f64>,
    embeddings: Vec<EmbeddingSlot>,
    last_comma: Option<usize>,
    token_count: usize,
}

impl ChunkBuilder {
    /// `next_chunk`: pad the text to 75 with end tokens, wrap in start/end tokens. The last chunk
    /// counts its own tokens, the others 75.
    fn close_chunk(&mut self, is_last: bool) {
        self.token_count += if is_last {
            self.tokens.len()
        } else {
            CHUNK_LENGTH
        };
        let fill = CHUNK_LENGTH.saturating_sub(self.tokens.len());
        let mut tokens = Vec::with_capacity(WINDOW_LENGTH);
        tokens.push(START_OF_TEXT);
        tokens.append(&mut self.tokens);
        tokens.extend(std::iter::repeat_n(END_OF_TEXT, fill + 1));
        let mut multipliers = Vec::with_capacity(WINDOW_LENGTH);
        multipliers.push(1.0);
        multipliers.append(&mut self.multipliers);
        multipliers.extend(std::iter::repeat_n(1.0, fill + 1));
        self.chunks.push(PromptChunk {
            tokens,
            multipliers,
            embeddings: std::mem::take(&mut self.embeddings),
        });
        self.last_comma = None;
    }

    /// The comma rule: close the chunk after the comma, carry the rest into the new one.
    fn move_after_comma_to_next_chunk(&mut self, break_at: usize) {
        let moved_tokens = self.tokens.split_off(break_at);
        let moved_multipliers = self.multipliers.split_off(break_at);
        self.close_chunk(false);
        self.tokens = moved_tokens;
        self.multipliers = moved_multipliers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ClipTokenizer {
        ClipTokenizer::new().unwrap()
    }

    #[test]
    fn vocabulary_layout_matches_clip() {
        let t = tokenizer();
        // '!' is the first byte symbol, 'a' 64th; merge 0 is "i n" → id 512.
        assert_eq!(t.byte_ids[b'!' as usize], 0);
        assert_eq!(t.byte_ids[b'a' as usize], 64);
        assert_eq!(t.merge_ranks.len(), MERGES);
        assert_eq!(t.encode("a photo of a cat"), [320, 1125, 539, 320, 2368]);
    }

    #[test]
    fn cleaning_follows_ftfy_and_lowercases() {
        assert_eq!(
            clean_text("  ＬＯＵＤ\u{3000}ﬁne \u{201c}x\u{201d}  "),
            "loud fine \"x\""
        );
        assert_eq!(clean_text("E\u{301}\r\nb\u{93}"), "é b\"");
        assert_eq!(clean_text("\u{1b}[31mred\u{1b}[0m"), "red");
    }

    #[test]
    fn empty_prompt_is_one_padded_window() {
        let t = tokenizer();
        let options = ChunkOptions::a1111(ClipPadding::Zero);
        let chunked = t.chunk(&[], &[], &options).unwrap();
        assert_eq!(chunked.chunks.len(), 1);
        let tokens = &chunked.chunks[0].tokens;
        assert_eq!(tokens.len(), WINDOW_LENGTH);
        assert_eq!(&tokens[..3], &[START_OF_TEXT, END_OF_TEXT, 0]);
        assert_eq!(chunked.token_count, 0);
    }

    #[test]
    fn embeddings_longer_than_a_chunk_are_refused() {
        let t = tokenizer();
        let too_long = TextualInversion {
            name: "huge".into(),
            vectors: 76,
        };
        let options = ChunkOptions::a1111(ClipPadding::EndOfText);
        let err = t.chunk(&[], &[too_long], &options).unwrap_err();
        assert_eq!(
            err.to_string(),
            "embedding 'huge' has 76 vectors; a prompt chunk holds 75"
        );
    }
}
