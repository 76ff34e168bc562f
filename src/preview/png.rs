//! Preview images as PNG files with A1111's `parameters` text chunk.
//!
//! Pixels follow A1111's rule for a decoded image in [-1, 1]: `clamp((x + 1) / 2, 0, 1) · 255`,
//! truncated to u8 in float32 (numpy's `astype(uint8)`, not rounding). The infotext goes in a
//! `tEXt` chunk when it is Latin-1 and in an uncompressed `iTXt` chunk otherwise, which is what
//! Pillow's `PngInfo.add_text` (A1111's writer) does, before the image data as Pillow puts it.
//! Compression settings are fixed so that the same image gives the same bytes. Files are written
//! through [`OutputFile`] (atomic, an existing output refused without `--force`).
//!
//! The reader returns the `parameters` text as Pillow's `Image.open(p).info["parameters"]` (what
//! A1111's PNG Info reads): from `tEXt`, `zTXt` or `iTXt` chunks before the image data, the last
//! one winning.

use crate::tensors::{OutputFile, WriteOptions};
use crate::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

/// The text chunk keyword A1111 stores its infotext under.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// An 8-bit RGB image, rows top to bottom, each pixel `[r, g, b]` (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

/// How the channels of a decoded float image are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelLayout {
    /// `[3, H, W]`, as a VAE decoder returns it.
    Chw,
    /// `[H, W, 3]`.
    Hwc,
}

impl RgbImage {
    /// An image from `width·height·3` bytes in HWC order.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self> {
        let expected = pixel_count(width, height)? * 3;
        if pixels.len() != expected {
            return Err(Error::Invalid(format!(
                "a {width}x{height} RGB image has {expected} bytes, not {}",
                pixels.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }

    /// An image of one colour.
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> Result<Self> {
        let n = pixel_count(width, height)?;
        Self::new(width, height, rgb.repeat(n))
    }

    /// The 8-bit image of a decoded float image in [-1, 1], by A1111's pixel rule
    /// ([`decoded_to_pixel`]). NaN is refused, as A1111 refuses a decode with NaNs.
    pub fn from_decoded(
        values: &[f32],
        width: u32,
        height: u32,
        layout: ChannelLayout,
    ) -> Result<Self> {
        let n = pixel_count(width, height)?;
        if values.len() != n * 3 {
            return Err(Error::Invalid(format!(
                "a decoded {width}x{height} image has {} values, not {}",
                n * 3,
                values.len()
            )));
        }
        if values.iter().any(|v| v.is_nan()) {
            return Err(Error::Invalid(
                "the decoded image has NaN values (the VAE produced NaNs)".into(),
            ));
        }
        let pixels = match layout {
            ChannelLayout::Hwc => values.iter().map(|&v| decoded_to_pixel(v)).collect(),
            ChannelLayout::Chw => (0..n * 3)
                .map(|i| decoded_to_pixel(values[(i % 3) * n + i / 3]))
                .collect(),
        };
        Self::new(width, height, pixels)
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The bytes, HWC.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]])
    }

    /// Sets one pixel; outside the image nothing happens (text may run past an edge).
    pub(crate) fn set_pixel(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&rgb);
    }

    /// Copies `other` in with its top left corner at (`x`, `y`); it must fit.
    pub(crate) fn paste(&mut self, other: &RgbImage, x: u32, y: u32) {
        debug_assert!(x + other.width <= self.width && y + other.height <= self.height);
        let row = other.width as usize * 3;
        for r in 0..other.height as usize {
            let to = ((y as usize + r) * self.width as usize + x as usize) * 3;
            self.pixels[to..to + row].copy_from_slice(&other.pixels[r * row..(r + 1) * row]);
        }
    }
}

fn pixel_count(width: u32, height: u32) -> Result<usize> {
    if width == 0 || height == 0 {
        return Err(Error::Invalid(format!(
            "an image of {width}x{height} pixels has no pixels"
        )));
    }
    (width as usize)
        .checked_mul(height as usize)
        .filter(|n| n.checked_mul(3).is_some())
        .ok_or_else(|| Error::Invalid(format!("a {width}x{height} image is too large")))
}

/// A1111's pixel from a decoded value: `(255 · clamp((x + 1) / 2, 0, 1)) as u8`, every step in
/// float32 and the last one truncating (rounding would move the mean pixel by ≈ 0.47/255).
pub fn decoded_to_pixel(x: f32) -> u8 {
    let unit = ((x + 1.0) / 2.0).clamp(0.0, 1.0);
    (255.0f32 * unit) as u8
}

/// The PNG bytes of `image` with `parameters` as its infotext chunk.
pub fn encode_png(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Pinned, not left to the crate's defaults: the same image must give the same bytes.
    encoder.set_deflate_compression(png::DeflateCompression::Level(6));
    encoder.set_filter(png::Filter::Adaptive);
    let (keyword, text) = (PARAMETERS_KEYWORD.to_string(), parameters.to_string());
    let chunk = if is_latin1(parameters) {
        encoder.add_text_chunk(keyword, text)
    } else {
        encoder.add_itxt_chunk(keyword, text)
    };
    let encoded = chunk
        .and_then(|()| encoder.write_header())
        .and_then(|mut writer| {
            writer.write_image_data(&image.pixels)?;
            writer.finish()
        });
    encoded.map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
    Ok(bytes)
}

/// Writes `image` with its infotext to `path`, atomically: nothing appears at `path` unless the
/// whole file was written and synced, and an existing file is refused unless `opts.force`.
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    parameters: &str,
    opts: &WriteOptions,
) -> Result<()> {
    let bytes = encode_png(image, parameters)?;
    let mut out = OutputFile::create(path, opts)?;
    out.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    out.commit()
}

fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| (c as u32) <= 0xFF)
}

/// Which kind of PNG text chunk a text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextChunkKind {
    /// `tEXt`: Latin-1.
    Text,
    /// `zTXt`: Latin-1, deflated.
    CompressedText,
    /// `iTXt`: UTF-8, maybe deflated.
    InternationalText,
}

/// The `parameters` text of a PNG file and the chunk it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParametersText {
    pub kind: TextChunkKind,
    pub text: String,
}

/// Pillow's limit on a decompressed text chunk (`PngImagePlugin.MAX_TEXT_CHUNK`).
const MAX_TEXT_CHUNK: u64 = 1 << 20;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// The `parameters` text of the PNG at `path` as Pillow reads it on open, or `None` when it has
/// none. Chunks are read up to the image data, each one's CRC checked (Pillow refuses a broken
/// one too).
pub fn read_parameters(path: &Path) -> Result<Option<ParametersText>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut signature = [0u8; 8];
    match reader.read_exact(&mut signature) {
        Ok(()) if signature == PNG_SIGNATURE => {}
        Ok(()) => return Err(Error::bad_file(path, "not a PNG file")),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Error::bad_file(path, "not a PNG file"))
        }
        Err(e) => return Err(Error::io(path, e)),
    }
    let truncated = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::bad_file(path, "truncated PNG file"),
        _ => Error::io(path, e),
    };
    let mut found = None;
    loop {
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).map_err(truncated)?;
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let kind: [u8; 4] = [header[4], header[5], header[6], header[7]];
        if length > i32::MAX as u32 || !kind.iter().all(u8::is_ascii_alphabetic) {
            return Err(Error::bad_file(
                path,
                format!("broken PNG file (chunk {})", String::from_utf8_lossy(&kind)),
            ));
        }
        if &kind == b"IDAT" || &kind == b"IEND" {
            return Ok(found);
        }
        let mut data = Vec::new();
        (&mut reader)
            .take(length as u64)
            .read_to_end(&mut data)
            .map_err(|e| Error::io(path, e))?;
        if data.len() != length as usize {
            return Err(Error::bad_file(path, "truncated PNG file"));
        }
        let mut crc = [0u8; 4];
        reader.read_exact(&mut crc).map_err(truncated)?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&kind);
        hasher.update(&data);
        if hasher.finalize() != u32::from_be_bytes(crc) {
            return Err(Error::bad_file(
                path,
                format!(
                    "broken PNG file (bad checksum in {})",
                    String::from_utf8_lossy(&kind)
                ),
            ));
        }
        let text = match &kind {
            b"tEXt" => text_chunk(&data),
            b"zTXt" => compressed_text_chunk(&data).map_err(|m| Error::bad_file(path, m))?,
            b"iTXt" => international_text_chunk(&data).map_err(|m| Error::bad_file(path, m))?,
            _ => None,
        };
        if let Some((keyword, text)) = text {
            if keyword == PARAMETERS_KEYWORD.as_bytes() {
                found = Some(text);
            }
        }
    }
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// Splits at the first NUL; a chunk without one is all keyword (Pillow's reading).
fn split_keyword(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fn text_chunk(data: &[u8]) -> Option<(&[u8], ParametersText)> {
    let (keyword, text) = split_keyword(data);
    Some((
        keyword,
        ParametersText {
            kind: TextChunkKind::Text,
            text: latin1(text),
        },
    ))
}

/// A zTXt chunk; Pillow refuses an unknown compression method, reads a corrupt stream as empty
/// text, and refuses text that inflates past its limit.
fn compressed_text_chunk(data: &[u8]) -> Result<Option<(&[u8], ParametersText)>, String> {
    let (keyword, rest) = split_keyword(data);
    let method = rest.first().copied().unwrap_or(0);
    if method != 0 {
        return Err(format!(
            "unknown compression method {method} in a zTXt chunk"
        ));
    }
    let text = match inflate(rest.get(1..).unwrap_or(&[]))? {
        Some(bytes) => latin1(&bytes),
        None => String::new(),
    };
    Ok(Some((
        keyword,
        ParametersText {
            kind: TextChunkKind::CompressedText,
            text,
        },
    )))
}

/// An iTXt chunk: keyword, compression flag and method, language tag, translated keyword, text.
/// Pillow skips one it cannot read (malformed, unknown method, corrupt stream, bad UTF-8).
fn international_text_chunk(data: &[u8]) -> Result<Option<(&[u8], ParametersText)>, String> {
    let Some(nul) = data.iter().position(|&b| b == 0) else {
        return Ok(None);
    };
    let (keyword, rest) = (&data[..nul], &data[nul + 1..]);
    if rest.len() < 2 {
        return Ok(None);
    }
    let (compressed, method, rest) = (rest[0] != 0, rest[1], &rest[2..]);
    let mut parts = rest.splitn(3, |&b| b == 0);
    let (Some(language), Some(translated), Some(text)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    let text = match (compressed, method) {
        (false, _) => text.to_vec(),
        (true, 0) => match inflate(text)? {
            Some(bytes) => bytes,
            None => return Ok(None),
        },
        (true, _) => return Ok(None),
    };
    if std::str::from_utf8(language).is_err() || std::str::from_utf8(translated).is_err() {
        return Ok(None);
    }
    Ok(String::from_utf8(text).ok().map(|text| {
        (
            keyword,
            ParametersText {
                kind: TextChunkKind::InternationalText,
                text,
            },
        )
    }))
}

/// zlib-inflates a text chunk: `None` for a corrupt stream, an error past Pillow's limit.
fn inflate(compressed: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    let decoder = flate2::read::ZlibDecoder::new(compressed);
    match decoder.take(MAX_TEXT_CHUNK + 1).read_to_end(&mut out) {
        Ok(_) if out.len() as u64 > MAX_TEXT_CHUNK => Err(format!(
            "a text chunk inflates to more than {MAX_TEXT_CHUNK} bytes"
        )),
        Ok(_) => Ok(Some(out)),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_truncate_in_float32() {
        assert_eq!(decoded_to_pixel(-1.0), 0);
        assert_eq!(decoded_to_pixel(1.0), 255);
        assert_eq!(decoded_to_pixel(-7.0), 0);
        assert_eq!(decoded_to_pixel(f32::INFINITY), 255);
        assert_eq!(decoded_to_pixel(f32::NEG_INFINITY), 0);
        // 255 · 0.999 = 254.745: rounding would give 255.
        assert_eq!(decoded_to_pixel(0.998), 254);
        assert_eq!(decoded_to_pixel(0.0), 127);
    }

    #[test]
    fn chw_and_hwc_give_the_same_image() {
        let chw: Vec<f32> = (0..12).map(|i| i as f32 / 6.0 - 1.0).collect();
        let chw_ref = &chw;
        let hwc: Vec<f32> = (0..4)
            .flat_map(|p| (0..3).map(move |c| chw_ref[c * 4 + p]))
            .collect();
        let a = RgbImage::from_decoded(&chw, 2, 2, ChannelLayout::Chw).unwrap();
        let b = RgbImage::from_decoded(&hwc, 2, 2, ChannelLayout::Hwc).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.pixel(1, 0),
            Some([
                decoded_to_pixel(chw[1]),
                decoded_to_pixel(chw[5]),
                decoded_to_pixel(chw[9])
            ])
        );
        let nan = RgbImage::from_decoded(&[f32::NAN; 12], 2, 2, ChannelLayout::Chw);
        assert!(nan.unwrap_err().to_string().contains("NaN"));
        assert!(RgbImage::from_decoded(&chw, 3, 2, ChannelLayout::Chw).is_err());
        assert!(RgbImage::filled(0, 2, [0; 3]).is_err());
    }

    #[test]
    fn itxt_chunks_of_other_tools_are_read() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all("naïve ✓".as_bytes()).unwrap();
        let compressed = z.finish().unwrap();
        let mut chunk = b"parameters\0\x01\x00en\0Parameter\0".to_vec();
        chunk.extend_from_slice(&compressed);
        let (keyword, text) = international_text_chunk(&chunk).unwrap().unwrap();
        assert_eq!(keyword, b"parameters");
        assert_eq!(text.text, "naïve ✓");
        assert_eq!(
            international_text_chunk(b"parameters\0\x01\x07\0\0x"),
            Ok(None)
        );
        assert_eq!(
            international_text_chunk(b"parameters\0\0\0\0\0\xff"),
            Ok(None)
        );
        let (_, latin) = text_chunk(b"parameters\0caf\xe9").unwrap();
        assert_eq!(latin.text, "café");
    }
}
