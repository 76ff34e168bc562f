//! A1111's prompt syntax, parsed the way A1111 parses it, so that a prompt copied from an A1111
//! infotext asks the preview for the same LoRAs and the same token weights.
//!
//! Two passes, in A1111's order:
//! 1. [`parse_extra_networks`]: `<kind:arg:arg…>` tags (`modules/extra_networks.py`) are cut out of
//!    the text; `<lora:…>`/`<lyco:…>` become [`LoraTag`]s with the multipliers the built-in Lora
//!    extension derives (`extensions-builtin/Lora/extra_networks_lora.py`), other kinds are
//!    returned as they were written.
//! 2. [`parse_emphasis`] on what is left (`modules/prompt_parser.py` `parse_prompt_attention`):
//!    `(text)` ×1.1, `[text]` ÷1.1, `(text:1.3)`, escapes, `BREAK`; the result is a list of
//!    weighted pieces with equal neighbours merged.
//!
//! Where A1111 is lenient in an odd way (an unclosed bracket, a BREAK inside brackets, a weight
//! written with Unicode digits) the same thing happens here; fixtures/prompts records A1111's own
//! outputs for such cases. Prompt scheduling (`[a:b:0.5]`, `[a|b]`), `AND` and `#` comments are
//! not interpreted: their characters are parsed as emphasis and text, as `parse_prompt_attention`
//! alone would.

use crate::family::block_weight::BlockWeightSpec;
use crate::{Error, Result};
use regex::Regex;
use std::sync::OnceLock;

/// One `<lora:NAME:…>` (or `<lyco:…>`, A1111's alias) tag.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The first positional argument, as written (A1111 looks it up by file name or alias).
    pub name: String,
    /// Text-encoder multiplier: the second positional argument or `te=`, else 1.
    pub te_weight: f64,
    /// UNet multiplier: the third positional argument or `unet=`, else the text-encoder weight.
    pub unet_weight: f64,
    /// `dyn=` or the fourth positional argument: use only the first N ranks of the LoRA.
    pub dyn_dim: Option<usize>,
    /// `lbw=` of the LoRA Block Weight extension, when present.
    pub block_weights: Option<BlockWeightSpec>,
    /// Arguments A1111's Lora extension does not read (a fifth positional argument, other named
    /// ones such as the LBW extension's `start=`), so a caller can say they were ignored.
    pub ignored_args: Vec<String>,
    /// The tag as written, `<lora:name:0.8>`, for the infotext.
    pub tag: String,
}

/// An extra-network tag of another kind (`<hypernet:name:0.5>`): removed from the text, as A1111
/// removes every tag whatever its kind, and reported unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraNetworkTag {
    pub kind: String,
    /// The text between the first `:` and `>`, split on `:`.
    pub args: Vec<String>,
    pub tag: String,
}

/// A prompt with its extra-network tags taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraNetworks {
    /// The prompt without the tags (nothing else changes: the spaces and commas around a tag stay,
    /// as in A1111).
    pub text: String,
    pub loras: Vec<LoraTag>,
    pub others: Vec<ExtraNetworkTag>,
}

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPiece {
    /// Text and its emphasis multiplier.
    Text { text: String, weight: f64 },
    /// `BREAK`: the text after it starts a new 75-token chunk.
    Break,
}

/// Python's `str.isspace()`, which `\s` of Python's `re` follows: Unicode White_Space plus the
/// four information separators U+001C–U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

struct Classes {
    /// `\w` of Python's `re` on text: letters, numbers, underscore.
    word: Regex,
    /// `\d` of Python's `re` on text: decimal digits of every script (category Nd).
    decimal: Regex,
    /// `<(\w+):([^>]+)>` of `extra_networks.py`.
    extra_network: Regex,
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| Classes {
        word: Regex::new(r"^[\p{L}\p{N}_]$").expect("static pattern"),
        decimal: Regex::new(r"^\p{Nd}$").expect("static pattern"),
        extra_network: Regex::new(r"<([\p{L}\p{N}_]+):([^>]+)>").expect("static pattern"),
    })
}

fn matches_char(class: &Regex, c: char) -> bool {
    let mut buf = [0u8; 4];
    class.is_match(c.encode_utf8(&mut buf))
}

fn is_python_word(c: char) -> bool {
    matches_char(&classes().word, c)
}

/// The value of a decimal digit of any script (Python's `float()` and `int()` accept them all).
/// Unicode encodes every script's digits as contiguous runs 0–9, so the value is the distance
/// from the start of the run of Nd characters, modulo 10.
fn decimal_value(c: char) -> Option<u32> {
    if c.is_ascii_digit() {
        return c.to_digit(10);
    }
    let decimal = &classes().decimal;
    if !matches_char(decimal, c) {
        return None;
    }
    let mut start = c as u32;
    while let Some(previous) = start.checked_sub(1).and_then(char::from_u32) {
        if !matches_char(decimal, previous) {
            break;
        }
        start -= 1;
    }
    Some((c as u32 - start) % 10)
}

/// The text Python's number parsers see: digits of any script as ASCII, any whitespace as a space,
/// then trimmed; `_` only between two digits (then dropped). None when an underscore is misplaced.
fn python_number_text(text: &str) -> Option<String> {
    let mapped: Vec<char> = text
        .chars()
        .map(|c| match decimal_value(c) {
            Some(d) => char::from_digit(d, 10).unwrap_or(c),
            None if is_python_space(c) => ' ',
            None => c,
        })
        .collect();
    let mapped: String = mapped.into_iter().collect();
    let trimmed: Vec<char> = mapped.trim_matches(' ').chars().collect();
    let mut out = String::with_capacity(trimmed.len());
    for (i, &c) in trimmed.iter().enumerate() {
        if c == '_' {
            let digit_before = i > 0 && trimmed[i - 1].is_ascii_digit();
            let digit_after = trimmed.get(i + 1).is_some_and(|n| n.is_ascii_digit());
            if !(digit_before && digit_after) {
                return None;
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Python's `float(text)` for finite values (`inf`/`nan` parse in Python but are refused here:
/// no image comes out of a LoRA at an infinite weight).
fn python_float(text: &str) -> Option<f64> {
    let cleaned = python_number_text(text)?;
    // Rust's parser agrees with Python's on sign, digits, '.', exponent; both refuse the rest.
    let value: f64 = cleaned.parse().ok()?;
    value.is_finite().then_some(value)
}

/// Python's `int(text)` for values ≥ 0.
fn python_unsigned(text: &str) -> Option<usize> {
    let cleaned = python_number_text(text)?;
    let digits = cleaned.strip_prefix('+').unwrap_or(&cleaned);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Cuts the extra-network tags out of a prompt, as A1111 does before anything else reads it.
/// A `<lora:…>` whose weight is not a number, or which has no name, is an error naming the tag.
pub fn parse_extra_networks(prompt: &str) -> Result<ExtraNetworks> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut others = Vec::new();
    let mut last = 0;
    for found in classes().extra_network.captures_iter(prompt) {
        let whole = found.get(0).expect("group 0 always matches");
        text.push_str(&prompt[last..whole.start()]);
        last = whole.end();
        let kind = &found[1];
        let args: Vec<String> = found[2].split(':').map(str::to_string).collect();
        let tag = whole.as_str().to_string();
        // The Lora extension registers itself as 'lora' and the alias 'lyco'.
        if kind == "lora" || kind == "lyco" {
            loras.push(lora_tag(args, tag)?);
        } else {
            others.push(ExtraNetworkTag {
                kind: kind.to_string(),
                args,
                tag,
            });
        }
    }
    text.push_str(&prompt[last..]);
    Ok(ExtraNetworks {
        text,
        loras,
        others,
    })
}

/// `ExtraNetworkParams` (an item with exactly one `=` is named, `a=b=c` is positional) and the
/// multiplier rules of the Lora extension's `activate`.
fn lora_tag(items: Vec<String>, tag: String) -> Result<LoraTag> {
    let mut positional: Vec<&str> = Vec::new();
    let mut named: Vec<(&str, &str)> = Vec::new();
    for item in &items {
        match item.split('=').collect::<Vec<_>>()[..] {
            [key, value] => {
                // A dict in A1111: the last value of a repeated key wins.
                named.retain(|(k, _)| *k != key);
                named.push((key, value));
            }
            _ => positional.push(item),
        }
    }
    let named_value = |key: &str| named.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let bad = |why: String| Error::Invalid(format!("{tag}: {why}"));
    let weight = |text: &str, what: &str| {
        python_float(text).ok_or_else(|| bad(format!("{what} '{text}' is not a finite number")))
    };

    let Some(name) = positional.first() else {
        return Err(bad("no LoRA name (the first argument without '=')".into()));
    };
    let mut te_weight = match positional.get(1) {
        Some(text) => weight(text, "text-encoder weight")?,
        None => 1.0,
    };
    if let Some(text) = named_value("te") {
        te_weight = weight(text, "te=")?;
    }
    let mut unet_weight = match positional.get(2) {
        Some(text) => weight(text, "UNet weight")?,
        None => te_weight,
    };
    if let Some(text) = named_value("unet") {
        unet_weight = weight(text, "unet=")?;
    }
    let rank = |text: &str| {
        python_unsigned(text).ok_or_else(|| bad(format!("dyn '{text}' is not a whole number ≥ 0")))
    };
    // Both are read when both are written, as in A1111: a bad fourth argument fails even under dyn=.
    let mut dyn_dim = positional.get(3).map(|text| rank(text)).transpose()?;
    if let Some(text) = named_value("dyn") {
        dyn_dim = Some(rank(text)?);
    }
    let block_weights = match named_value("lbw") {
        Some(text) => Some(BlockWeightSpec::parse(text).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let mut ignored_args: Vec<String> = positional.iter().skip(4).map(|s| s.to_string()).collect();
    ignored_args.extend(
        named
            .iter()
            .filter(|(k, _)| !["te", "unet", "dyn", "lbw"].contains(k))
            .map(|(k, v)| format!("{k}={v}")),
    );
    Ok(LoraTag {
        name: name.to_string(),
        te_weight,
        unet_weight,
        dyn_dim,
        block_weights,
        ignored_args,
        tag,
    })
}

/// One match of `re_attention` in `prompt_parser.py`, in its alternation order.
#[derive(Debug, PartialEq)]
enum AttentionToken<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\`, or a lone `\` (then the text is empty: the backslash goes).
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:1.2)`: the number as written.
    Weight(&'a str),
    CloseRound,
    CloseSquare,
    /// A run without `\()[]:`, or a lone `:`.
    Plain(&'a str),
}

/// The next token at the start of `text` (never empty) and its length in bytes.
fn next_attention_token(text: &str) -> (AttentionToken<'_>, usize) {
    let mut chars = text.char_indices();
    let (_, first) = chars.next().expect("caller passes non-empty text");
    let len = first.len_utf8();
    match first {
        '\\' => match text[len..].chars().next() {
            Some(next @ ('(' | ')' | '[' | ']' | '\\')) => {
                let end = len + next.len_utf8();
                (AttentionToken::Escaped(&text[len..end]), end)
            }
            _ => (AttentionToken::Escaped(""), len),
        },
        '(' => (AttentionToken::OpenRound, len),
        '[' => (AttentionToken::OpenSquare, len),
        ':' => match weight_token(text) {
            Some((number, end)) => (AttentionToken::Weight(number), end),
            None => (AttentionToken::Plain(&text[..len]), len),
        },
        ')' => (AttentionToken::CloseRound, len),
        ']' => (AttentionToken::CloseSquare, len),
        _ => {
            let end = text
                .char_indices()
                .find(|(_, c)| matches!(c, '\\' | '(' | ')' | '[' | ']' | ':'))
                .map_or(text.len(), |(i, _)| i);
            (AttentionToken::Plain(&text[..end]), end)
        }
    }
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `text`: the number and the match length.
fn weight_token(text: &str) -> Option<(&str, usize)> {
    let mut i = 1; // past ':'
    let skip_spaces = |mut i: usize| {
        while let Some(c) = text[i..].chars().next().filter(|&c| is_python_space(c)) {
            i += c.len_utf8();
        }
        i
    };
    i = skip_spaces(i);
    let number_start = i;
    if let Some(sign @ ('+' | '-')) = text[i..].chars().next() {
        i += sign.len_utf8();
    }
    let digits_start = i;
    while let Some(c) = text[i..]
        .chars()
        .next()
        .filter(|&c| c == '.' || decimal_value(c).is_some())
    {
        i += c.len_utf8();
    }
    if i == digits_start {
        return None;
    }
    let number_end = i;
    i = skip_spaces(i);
    text[i..]
        .starts_with(')')
        .then(|| (&text[number_start..number_end], i + 1))
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`: the parts between the BREAK keywords (uppercase, a whole
/// word by Python's definition), surrounding whitespace going with the keyword.
fn split_on_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if before.is_some_and(is_python_word) || after.is_some_and(is_python_word) {
            search = at + 1;
            continue;
        }
        // The match starts where the whitespace before the keyword starts, but not before the
        // end of the previous match.
        let mut start = at;
        while let Some(c) = text[part_start..start].chars().next_back() {
            if !is_python_space(c) {
                break;
            }
            start -= c.len_utf8();
        }
        let mut stop = end;
        while let Some(c) = text[stop..].chars().next().filter(|&c| is_python_space(c)) {
            stop += c.len_utf8();
        }
        parts.push(&text[part_start..start]);
        part_start = stop;
        search = stop;
    }
    parts.push(&text[part_start..]);
    parts
}

/// `parse_prompt_attention`: the text as (piece, multiplier) with A1111's rules, including its
/// quirks: an unclosed `(` or `[` applies to the rest of the prompt; a `)` or `]` without an
/// opening one is text; a BREAK is A1111's marker piece ("BREAK", −1), which brackets around it
/// multiply, after which it is read as the word "BREAK" (a [`PromptPiece::Break`] is a marker whose
/// weight is still exactly −1). A weight that is not a number (`(a:1.2.3)`) is an error, where
/// A1111 fails the generation.
pub fn parse_emphasis(text: &str) -> Result<Vec<PromptPiece>> {
    let mut pieces: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let round_multiplier = 1.1;
    let square_multiplier = 1.0 / 1.1;
    fn multiply(pieces: &mut [(String, f64)], from: usize, by: f64) {
        for piece in &mut pieces[from..] {
            piece.1 *= by;
        }
    }

    let mut rest = text;
    while !rest.is_empty() {
        let (token, len) = next_attention_token(rest);
        let whole = &rest[..len];
        rest = &rest[len..];
        match token {
            AttentionToken::Escaped(literal) => pieces.push((literal.to_string(), 1.0)),
            AttentionToken::OpenRound => round.push(pieces.len()),
            AttentionToken::OpenSquare => square.push(pieces.len()),
            AttentionToken::Weight(number) if !round.is_empty() => {
                let weight = python_number_text(number)
                    .and_then(|t| t.parse::<f64>().ok())
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "emphasis weight '{number}' in '{text}' is not a number"
                        ))
                    })?;
                let from = round.pop().expect("checked non-empty");
                multiply(&mut pieces, from, weight);
            }
            AttentionToken::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut pieces, from, round_multiplier);
            }
            AttentionToken::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                multiply(&mut pieces, from, square_multiplier);
            }
            _ => {
                for (i, part) in split_on_break(whole).into_iter().enumerate() {
                    if i > 0 {
                        pieces.push(("BREAK".to_string(), -1.0));
                    }
                    pieces.push((part.to_string(), 1.0));
                }
            }
        }
    }
    for &from in &round {
        multiply(&mut pieces, from, round_multiplier);
    }
    for &from in &square {
        multiply(&mut pieces, from, square_multiplier);
    }
    if pieces.is_empty() {
        pieces.push((String::new(), 1.0));
    }
    // Merge runs of equal weights (by value: 0.0 and −0.0 merge, as in Python).
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(pieces.len());
    for (text, weight) in pieces {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(text, weight)| {
            // tokenize_line's test for a BREAK marker.
            if text == "BREAK" && weight == -1.0 {
                PromptPiece::Break
            } else {
                PromptPiece::Text { text, weight }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: &str, weight: f64) -> PromptPiece {
        PromptPiece::Text {
            text: text.into(),
            weight,
        }
    }

    #[test]
    fn nested_brackets_multiply_in_a1111_order() {
        let pieces = parse_emphasis("a ((b)) [c] (d:1.5)").unwrap();
        assert_eq!(
            pieces,
            [
                text("a ", 1.0),
                text("b", 1.1 * 1.1),
                text(" ", 1.0),
                text("c", 1.0 / 1.1),
                text(" ", 1.0),
                text("d", 1.5),
            ]
        );
    }

    #[test]
    fn break_splits_only_on_the_uppercase_word() {
        let pieces = parse_emphasis("a BREAK b BREAKfast break").unwrap();
        assert_eq!(
            pieces,
            [
                text("a", 1.0),
                PromptPiece::Break,
                text("b BREAKfast break", 1.0)
            ]
        );
    }

    #[test]
    fn weights_may_use_any_scripts_digits_and_underscores_only_between_digits() {
        assert_eq!(python_float("\u{ff11}.\u{ff15}"), Some(1.5));
        assert_eq!(python_float(" 1_0 "), Some(10.0));
        assert_eq!(python_float("1__0"), None);
        assert_eq!(python_float("_1"), None);
        assert_eq!(python_float("inf"), None);
        assert_eq!(python_unsigned("+0_8"), Some(8));
        assert_eq!(python_unsigned("-1"), None);
    }

    #[test]
    fn tags_leave_the_text_around_them() {
        let parsed = parse_extra_networks("a, <lora:x:0.5>, b <hypernet:h:1>").unwrap();
        assert_eq!(parsed.text, "a, , b ");
        assert_eq!(parsed.loras.len(), 1);
        assert_eq!(parsed.loras[0].te_weight, 0.5);
        assert_eq!(parsed.loras[0].unet_weight, 0.5);
        assert_eq!(parsed.others[0].kind, "hypernet");
    }

    #[test]
    fn lbw_is_kept_as_a_block_weight_spec() {
        let parsed = parse_extra_networks("<lora:x:1:lbw=OUTALL:start=3>").unwrap();
        let lora = &parsed.loras[0];
        assert_eq!(
            lora.block_weights,
            Some(BlockWeightSpec::Preset("OUTALL".into()))
        );
        assert_eq!(lora.ignored_args, ["start=3"]);
    }
}
