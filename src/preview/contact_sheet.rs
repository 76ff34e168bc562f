//! The contact sheet of `loratool preview --grid`, in the look of A1111's X/Y plot
//! (`images.draw_grid_annotations`): the images edge to edge in a grid on white, each column's
//! label centred in a band above it, each row's label centred in a band to the left (three
//! quarters of an image wide, as A1111 makes it, or as wide as the longest word), black text
//! wrapped at word boundaries to its band. Text is drawn with [`super::label_font`] at a whole-number scale that grows with the
//! image size, as A1111's font size does (`(width + height) / 25` pixels).

use super::label_font::{self, ADVANCE, GLYPH_ROWS, GLYPH_WIDTH, LINE_HEIGHT};
use super::png::RgbImage;
use crate::{Error, Result};

const BACKGROUND: [u8; 3] = [255, 255, 255];
const TEXT: [u8; 3] = [0, 0, 0];

/// The labels of a sheet: one per column (or none), one per row (or none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GridLabels {
    pub columns: Vec<String>,
    pub rows: Vec<String>,
}

/// Lays `cells` (row by row, all the same size) out `columns` to a row under their labels.
pub fn contact_sheet(cells: &[RgbImage], columns: usize, labels: &GridLabels) -> Result<RgbImage> {
    let first = cells
        .first()
        .ok_or_else(|| Error::Invalid("a contact sheet needs at least one image".into()))?;
    if columns == 0 || !cells.len().is_multiple_of(columns) {
        return Err(Error::Invalid(format!(
            "{} images do not fill rows of {columns}",
            cells.len()
        )));
    }
    let rows = cells.len() / columns;
    let (w, h) = (first.width(), first.height());
    if let Some(other) = cells.iter().find(|c| (c.width(), c.height()) != (w, h)) {
        return Err(Error::Invalid(format!(
            "the images of a contact sheet must be the same size ({w}x{h}, not {}x{})",
            other.width(),
            other.height()
        )));
    }
    for (what, given, wanted) in [
        ("column", labels.columns.len(), columns),
        ("row", labels.rows.len(), rows),
    ] {
        if given != 0 && given != wanted {
            return Err(Error::Invalid(format!(
                "{given} {what} labels for {wanted} {what}s"
            )));
        }
    }

    let scale = ((w + h) / 250).max(1);
    let pad = 2 * scale;
    let narrowest_band = ADVANCE * scale + 2 * pad;
    // Wider than A1111's band where a word of a row label would not fit (A1111 lets it overflow).
    let longest_word = labels
        .rows
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|word| word.chars().count() as u32)
        .max()
        .unwrap_or(0);
    let left = match labels.rows.is_empty() {
        true => 0,
        false => (w * 3 / 4)
            .max(narrowest_band)
            .max((longest_word * ADVANCE).saturating_sub(1) * scale + 2 * pad),
    };
    let column_lines: Vec<Vec<String>> = labels
        .columns
        .iter()
        .map(|l| wrap(l, chars_fitting(w.max(narrowest_band) - 2 * pad, scale)))
        .collect();
    let row_lines: Vec<Vec<String>> = labels
        .rows
        .iter()
        .map(|l| wrap(l, chars_fitting(left.saturating_sub(2 * pad), scale)))
        .collect();
    let top = match column_lines.iter().map(Vec::len).max() {
        None | Some(0) => 0,
        Some(lines) => text_height(lines, scale) + 2 * pad,
    };

    let sheet_w = checked_side(left, w, columns)?;
    let sheet_h = checked_side(top, h, rows)?;
    let mut sheet = RgbImage::filled(sheet_w, sheet_h, BACKGROUND)?;
    for (i, cell) in cells.iter().enumerate() {
        let (col, row) = ((i % columns) as u32, (i / columns) as u32);
        sheet.paste(cell, left + col * w, top + row * h);
    }
    for (col, lines) in column_lines.iter().enumerate() {
        let x = left + col as u32 * w;
        let y = (top - text_height(lines.len(), scale)) / 2;
        draw_lines(&mut sheet, lines, x, w, y as i64, scale);
    }
    for (row, lines) in row_lines.iter().enumerate() {
        let y = top as i64 + (row as u32 * h) as i64;
        let offset = (h as i64 - text_height(lines.len(), scale) as i64) / 2;
        draw_lines(&mut sheet, lines, 0, left, y + offset.max(0), scale);
    }
    Ok(sheet)
}

fn checked_side(margin: u32, cell: u32, count: usize) -> Result<u32> {
    u32::try_from(count)
        .ok()
        .and_then(|n| cell.checked_mul(n))
        .and_then(|s| s.checked_add(margin))
        .ok_or_else(|| Error::Invalid("the contact sheet would be too large".into()))
}

/// How many characters fit in `width` pixels at `scale` (at least one).
fn chars_fitting(width: u32, scale: u32) -> usize {
    // n characters take (n·ADVANCE − 1)·scale pixels: the last one has no spacing after it.
    (((width / scale) + 1) / ADVANCE).max(1) as usize
}

/// The height of `lines` lines of text: the last one without the gap under it.
fn text_height(lines: usize, scale: u32) -> u32 {
    match lines {
        0 => 0,
        n => ((n as u32 - 1) * LINE_HEIGHT + GLYPH_ROWS) * scale,
    }
}

/// Word wrap at `max_chars` characters a line; a word longer than a line is cut.
fn wrap(text: &str, max_chars: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    let mut line_len = 0;
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        if line_len > 0 && line_len + 1 + word.len() <= max_chars {
            line.push(' ');
            line.extend(word.iter());
            line_len += 1 + word.len();
            continue;
        }
        if line_len > 0 {
            lines.push(std::mem::take(&mut line));
        }
        while word.len() > max_chars {
            lines.push(word.drain(..max_chars).collect());
        }
        line_len = word.len();
        line = word.into_iter().collect();
    }
    if line_len > 0 {
        lines.push(line);
    }
    lines
}

/// Draws `lines` centred in the band from `x` that is `width` wide, the first line's top at `y`.
fn draw_lines(sheet: &mut RgbImage, lines: &[String], x: u32, width: u32, y: i64, scale: u32) {
    for (i, line) in lines.iter().enumerate() {
        let chars = line.chars().count() as u32;
        let line_width = (chars * ADVANCE).saturating_sub(1) * scale;
        let start = x as i64 + (width as i64 - line_width as i64) / 2;
        let top = y + (i as u32 * LINE_HEIGHT * scale) as i64;
        for (k, c) in line.chars().enumerate() {
            draw_glyph(
                sheet,
                c,
                start + (k as u32 * ADVANCE * scale) as i64,
                top,
                scale,
            );
        }
    }
}

fn draw_glyph(sheet: &mut RgbImage, c: char, x: i64, y: i64, scale: u32) {
    let scale = scale as i64;
    for (row, bits) in label_font::glyph(c).iter().enumerate() {
        for col in 0..GLYPH_WIDTH {
            if bits & (1 << (GLYPH_WIDTH - 1 - col)) == 0 {
                continue;
            }
            let (px, py) = (x + col as i64 * scale, y + row as i64 * scale);
            for dy in 0..scale {
                for dx in 0..scale {
                    sheet.set_pixel(px + dx, py + dy, TEXT);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(v: u8) -> RgbImage {
        RgbImage::filled(40, 30, [v, 0, 0]).unwrap()
    }

    #[test]
    fn wrapping_keeps_words_and_cuts_long_ones() {
        assert_eq!(wrap("weight 0.5", 20), ["weight 0.5"]);
        assert_eq!(wrap("weight 0.5", 6), ["weight", "0.5"]);
        assert_eq!(wrap("abcdefgh x", 3), ["abc", "def", "gh", "x"]);
        assert_eq!(wrap("  ", 3), Vec::<String>::new());
        assert_eq!(chars_fitting(29, 1), 5);
        assert_eq!(chars_fitting(28, 1), 4);
    }

    #[test]
    fn cells_sit_under_and_right_of_their_labels() {
        let cells: Vec<RgbImage> = (0..6).map(|i| cell(10 * i + 1)).collect();
        let labels = GridLabels {
            columns: vec!["w 0".into(), "w 0.5".into(), "w 1".into()],
            rows: vec!["seed 1".into(), "seed 2".into()],
        };
        let sheet = contact_sheet(&cells, 3, &labels).unwrap();
        let left = 30; // 3/4 of 40
        let top = text_height(1, 1) + 4;
        assert_eq!(sheet.width(), left + 3 * 40);
        assert_eq!(sheet.height(), top + 2 * 30);
        for (i, c) in cells.iter().enumerate() {
            let (x, y) = (left + (i as u32 % 3) * 40, top + (i as u32 / 3) * 30);
            assert_eq!(sheet.pixel(x, y), c.pixel(0, 0));
            assert_eq!(sheet.pixel(x + 39, y + 29), c.pixel(0, 0));
        }
        let band_has_text = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1).any(|y| (x0..x1).any(|x| sheet.pixel(x, y) == Some(TEXT)))
        };
        assert!(band_has_text(left, left + 40, 0, top));
        assert!(band_has_text(0, left, top, top + 30));
        assert!(!band_has_text(0, left, 0, top), "the corner stays empty");

        let plain = contact_sheet(&cells, 2, &GridLabels::default()).unwrap();
        assert_eq!((plain.width(), plain.height()), (80, 90));
    }

    #[test]
    fn bad_layouts_are_errors() {
        let cells = vec![cell(1), cell(2), cell(3)];
        assert!(contact_sheet(&cells, 2, &GridLabels::default()).is_err());
        assert!(contact_sheet(&[], 1, &GridLabels::default()).is_err());
        let labels = GridLabels {
            columns: vec!["a".into()],
            rows: vec![],
        };
        assert!(contact_sheet(&cells, 3, &labels).is_err());
        let mixed = vec![cell(1), RgbImage::filled(8, 8, [0; 3]).unwrap()];
        assert!(contact_sheet(&mixed, 2, &GridLabels::default()).is_err());
    }
}
