//! Image decoding and resizing for the model input.
//!
//! Decoding aims at what the Python pipelines do with `Image.open(p).convert("RGB")`, so that
//! latents and hashes are comparable with theirs:
//! - grey, grey+alpha, palette and RGBA become RGB8 with the alpha channel dropped, not composited
//!   onto a background (PIL's `convert("RGB")` drops it too);
//! - 16-bit samples keep their high byte (`v >> 8`), which is what PIL does for 16-bit RGB, RGBA
//!   and grey+alpha PNGs. PIL *clips* 16-bit greyscale (`I;16`) instead, turning nearly every
//!   pixel white; we scale that case too, since clipping destroys the image;
//! - unlike a bare `Image.open`, EXIF orientation is applied, so a phone photo is upright
//!   (PIL needs `ImageOps.exif_transpose` for that);
//! - JPEG goes through `zune-jpeg`, whose IDCT and chroma upsampling may differ from
//!   libjpeg-turbo's by a level or two per pixel.
//!
//! Resizing uses the `image` crate's Lanczos3, a separable convolution whose kernel widens when
//! downscaling, as PIL's `LANCZOS` does; it is computed in f32 rather than PIL's fixed point, so
//! pixels can differ by a few levels.
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};
use crate::hash::sha256_bytes;

/// How an image of any shape becomes the square the model works on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizePolicy {
    /// Lanczos resize to `size x size`, ignoring the aspect ratio (the official Diff-II code).
    #[default]
    Squash,
    /// Lanczos resize of the short side to `size`, then the central square (torchvision's
    /// `Resize(size)` + `CenterCrop(size)`).
    CenterCrop,
}

impl ResizePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ResizePolicy::Squash => "squash",
            ResizePolicy::CenterCrop => "center-crop",
        }
    }
}

impl std::fmt::Display for ResizePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResizePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "squash" => Ok(ResizePolicy::Squash),
            "center-crop" | "centercrop" => Ok(ResizePolicy::CenterCrop),
            _ => Err(format!(
                "unknown resize policy `{s}`: use `squash` or `center-crop`"
            )),
        }
    }
}

/// The largest image accepted, in pixels (100 megapixels, 300 MB as RGB8). The header's size is
/// checked before any pixel is decoded: a few hundred bytes of PNG can declare gigapixels (a
/// decompression bomb), and no photo for a classifier is near this size.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Decodes an image file to RGB8 (see the module docs for the exact conversions).
pub fn load_rgb8(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb8(&bytes, path)
}

/// Decodes image bytes to RGB8; `path` only names the source in errors. The format is detected
/// from the content, not the extension, as PIL does.
pub fn decode_rgb8(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let bad = |msg: String| {
        Error::bad_file(
            path,
            format!("{msg}; re-export it as PNG or JPEG, or remove it from the dataset"),
        )
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(bad(
            "not a recognised image (supported: PNG, JPEG, BMP, WebP, TIFF)".into(),
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(format!("cannot decode image: {}", e.to_string().trim())))?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(bad(format!(
            "image is {w}x{h} pixels, over the limit of {} megapixels (a corrupt header, or far larger than any model input); downscale it",
            MAX_PIXELS / 1_000_000
        )));
    }
    // A broken EXIF block must not make an otherwise good image unusable.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| bad(format!("cannot decode image: {}", e.to_string().trim())))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

/// RGB8 with alpha dropped and 16-bit samples truncated to their high byte.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    fn from16<const C: usize>(w: u32, h: u32, raw: &[u16], grey: bool) -> RgbImage {
        let mut out = Vec::with_capacity(w as usize * h as usize * 3);
        for px in raw.chunks_exact(C) {
            if grey {
                let v = (px[0] >> 8) as u8;
                out.extend_from_slice(&[v, v, v]);
            } else {
                out.extend(px[..3].iter().map(|&v| (v >> 8) as u8));
            }
        }
        RgbImage::from_raw(w, h, out).expect("buffer sized from the image dimensions")
    }
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma16(i) => from16::<1>(w, h, i.as_raw(), true),
        DynamicImage::ImageLumaA16(i) => from16::<2>(w, h, i.as_raw(), true),
        DynamicImage::ImageRgb16(i) => from16::<3>(w, h, i.as_raw(), false),
        DynamicImage::ImageRgba16(i) => from16::<4>(w, h, i.as_raw(), false),
        // 8-bit grey / alpha variants: channel replication and alpha drop, exactly PIL's.
        // Float images (TIFF) go through the crate's clamp-and-round.
        other => other.to_rgb8(),
    }
}

/// Resizes `img` to `size x size` by `policy`; returns a copy when it is already that size.
pub fn prepare(img: &RgbImage, size: usize, policy: ResizePolicy) -> RgbImage {
    let s = size as u32;
    let (w, h) = img.dimensions();
    if (w, h) == (s, s) || size == 0 {
        return img.clone();
    }
    match policy {
        ResizePolicy::Squash => image::imageops::resize(img, s, s, FilterType::Lanczos3),
        ResizePolicy::CenterCrop => {
            // torchvision: the long side is int(size * long / short).
            let (nw, nh) = if w <= h {
                (s, ((s as u64 * h as u64) / w as u64).max(1) as u32)
            } else {
                (((s as u64 * w as u64) / h as u64).max(1) as u32, s)
            };
            let resized = if (nw, nh) == (w, h) {
                img.clone()
            } else {
                image::imageops::resize(img, nw, nh, FilterType::Lanczos3)
            };
            let left = crop_offset(nw, s);
            let top = crop_offset(nh, s);
            image::imageops::crop_imm(&resized, left, top, s, s).to_image()
        }
    }
}

/// torchvision's `int(round((len - size) / 2))`; Python rounds halves to even.
fn crop_offset(len: u32, size: u32) -> u32 {
    let d = len.saturating_sub(size);
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Reads one image for the model: HWC RGB8 pixels of `size x size`, and the SHA-256 of the file
/// as read (the bytes are read once, so the hash is of exactly what was decoded).
pub fn load_for_model(
    path: impl AsRef<Path>,
    size: usize,
    policy: ResizePolicy,
) -> Result<(Vec<u8>, String)> {
    let path = path.as_ref();
    if size == 0 {
        return Err(Error::invalid("image size must be positive"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let hash = sha256_bytes(&bytes);
    let img = decode_rgb8(&bytes, path)?;
    Ok((prepare(&img, size, policy).into_raw(), hash))
}
