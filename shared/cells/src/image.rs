//! Image decoding and preprocessing, one implementation for the trainer and the appliance.
//!
//! Every image comes from outside (camera, USB stick, upload) and is untrusted: the encoded size
//! and the decoded dimensions are bounded before any pixel buffer is allocated.

use crate::cellnorm::{Normalise, NormalisedCell};
use image::{DynamicImage, ImageReader, Limits, RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::path::Path;
pub use wbc_protocol::preprocess::Preprocess;

/// Bounds applied to every decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeLimits {
    /// Largest encoded file accepted, in bytes.
    pub max_bytes: u64,
    /// Largest width or height accepted, in pixels.
    pub max_side: u32,
    /// Largest decoder allocation, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // A 12-megapixel microscope camera frame as PNG stays well under these.
        DecodeLimits {
            max_bytes: 64 << 20,
            max_side: 8192,
            max_alloc: 512 << 20,
        }
    }
}

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The encoded input is larger than allowed.
    #[error("image is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// Input size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// The format could not be recognised.
    #[error("not a recognised image format")]
    UnknownFormat,
    /// Decoding failed (corrupt, truncated, over the limits).
    #[error("cannot decode image: {0}")]
    Decode(#[from] image::ImageError),
    /// The file ends before the image does (a JPEG without its end marker): a copy that was
    /// cut short, whose missing part a decoder would fill with grey.
    #[error("image is truncated: the file ends before the image does")]
    Truncated,
    /// Decoded, and converted to 8-bit RGB, it would hold more memory than allowed (a 16-bit
    /// or alpha image near the limit).
    #[error("the image would need {needed} bytes of memory to convert, over the limit of {limit}")]
    TooMuchMemory {
        /// Bytes the decoded image and its conversion need together.
        needed: u64,
        /// Limit.
        limit: u64,
    },
    /// The image has no pixels.
    #[error("image is empty ({width}x{height})")]
    Empty {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
}

/// Whether a JPEG file has its end-of-image marker (`FF D9`), allowing the few bytes of padding
/// some cameras append.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes an encoded image (any format `image` knows: JPEG, PNG, BMP, TIFF, GIF, WebP) into RGB8.
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(ImageError::TooLarge {
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| ImageError::UnknownFormat)?;
    match reader.format() {
        None => return Err(ImageError::UnknownFormat),
        Some(image::ImageFormat::Jpeg) if !jpeg_has_end(bytes) => return Err(ImageError::Truncated),
        Some(_) => {}
    }
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l);
    let img: DynamicImage = reader.decode()?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::Empty {
            width: img.width(),
            height: img.height(),
        });
    }
    // The conversion is part of the decoding's memory: both buffers live at once.
    if !matches!(img, DynamicImage::ImageRgb8(_)) {
        let needed = img.as_bytes().len() as u64 + u64::from(img.width()) * u64::from(img.height()) * 3;
        if needed > limits.max_alloc {
            return Err(ImageError::TooMuchMemory {
                needed,
                limit: limits.max_alloc,
            });
        }
    }
    Ok(img.into_rgb8())
}

/// Reads and decodes an image file, checking its size before reading it whole.
pub fn load_rgb(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let io = |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limits.max_bytes {
        return Err(ImageError::TooLarge {
            size: len,
            limit: limits.max_bytes,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    decode_rgb(&bytes, limits)
}

/// How a [`Preprocess`] runs on pixels (the data lives in `wbc_protocol`, which carries no
/// image code; bring this trait into scope to call these methods).
pub trait Prepare {
    /// The model's view of a cell image: normalised when the preprocessing has a cell step
    /// (`hint`: where the cell should be, input pixels; the centre when `None`;
    /// `microns_per_pixel`: the image's pixel size, for a physical scale), otherwise
    /// centre-cropped and resized. Returns the measurements where normalisation ran.
    fn prepare(
        &self,
        img: &RgbImage,
        hint: Option<[f32; 2]>,
        microns_per_pixel: Option<f32>,
    ) -> (RgbImage, Option<NormalisedCell>);

    /// Centre-crops to a square and resizes to the input size (Catmull-Rom, as close to
    /// torchvision's bicubic as `image` offers). A square image of the right size is untouched.
    fn to_square(&self, img: &RgbImage) -> RgbImage;

    /// Normalises an `input_size`² RGB image into CHW floats `(x/255 - mean) / std`.
    ///
    /// # Panics
    /// If the image is not `input_size` square: call [`Prepare::to_square`] first.
    fn normalise_into(&self, img: &RgbImage, out: &mut Vec<f32>);

    /// Prepare ([`Prepare::prepare`]) and normalise: the model input for one cell image, CHW.
    fn tensor_data(&self, img: &RgbImage) -> Vec<f32>;
}

impl Prepare for Preprocess {
    fn prepare(
        &self,
        img: &RgbImage,
        hint: Option<[f32; 2]>,
        microns_per_pixel: Option<f32>,
    ) -> (RgbImage, Option<NormalisedCell>) {
        match &self.cell {
            Some(norm) => {
                let mut n = norm.apply(img, hint, microns_per_pixel);
                let view = if n.image.width() == self.input_size {
                    std::mem::take(&mut n.image)
                } else {
                    self.to_square(&n.image)
                };
                (view, Some(n))
            }
            None => (self.to_square(img), None),
        }
    }

    fn to_square(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let side = w.min(h);
        let s = self.input_size;
        let square = if w == h {
            img.clone()
        } else {
            image::imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image()
        };
        if side == s {
            square
        } else {
            image::imageops::resize(&square, s, s, FilterType::CatmullRom)
        }
    }

    fn normalise_into(&self, img: &RgbImage, out: &mut Vec<f32>) {
        let s = self.input_size as usize;
        assert_eq!(
            (img.width() as usize, img.height() as usize),
            (s, s),
            "image must be {s}x{s}"
        );
        let plane = s * s;
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let dst = &mut out[start..];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                dst[c * plane + i] = (p.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
    }

    fn tensor_data(&self, img: &RgbImage) -> Vec<f32> {
        let mut out = Vec::with_capacity(3 * (self.input_size as usize).pow(2));
        self.normalise_into(&self.prepare(img, None, None).0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        buf
    }

    #[test]
    fn decodes_png_and_normalises_channels_in_chw_order() {
        let img = decode_rgb(&png_bytes(4, 4), &DecodeLimits::default()).unwrap();
        let p = Preprocess {
            input_size: 4,
            mean: [0.0, 0.0, 0.5],
            std: [1.0, 1.0, 0.5],
            cell: None,
        };
        let t = p.tensor_data(&img);
        assert_eq!(t.len(), 48);
        assert_eq!(t[1], 1.0 / 255.0); // R at (x=1, y=0)
        assert_eq!(t[16 + 4], 1.0 / 255.0); // G at (x=0, y=1)
        assert!((t[32] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
    }

    #[test]
    fn rejects_truncated_garbage_oversized_and_huge_dimension_images() {
        let limits = DecodeLimits::default();
        let good = png_bytes(32, 32);
        assert!(matches!(
            decode_rgb(&good[..good.len() / 2], &limits),
            Err(ImageError::Decode(_))
        ));
        assert!(matches!(
            decode_rgb(b"definitely not an image", &limits),
            Err(ImageError::UnknownFormat)
        ));
        assert!(matches!(decode_rgb(&[], &limits), Err(ImageError::UnknownFormat)));
        let small = DecodeLimits {
            max_bytes: 100,
            ..limits
        };
        assert!(matches!(decode_rgb(&good, &small), Err(ImageError::TooLarge { .. })));
        let narrow = DecodeLimits { max_side: 16, ..limits };
        assert!(matches!(decode_rgb(&good, &narrow), Err(ImageError::Decode(_))));
    }

    #[test]
    fn the_conversion_to_8_bit_rgb_counts_within_the_memory_limit() {
        // 256 × 256 16-bit RGBA: 512 KiB decoded, and 192 KiB more as 8-bit RGB.
        let img = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::from_pixel(
            256,
            256,
            image::Rgba([1000, 2000, 3000, 65535]),
        );
        let mut png = Vec::new();
        image::DynamicImage::ImageRgba16(img)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let limits = |max_alloc| DecodeLimits {
            max_alloc,
            ..DecodeLimits::default()
        };
        let e = decode_rgb(&png, &limits(600 << 10)).unwrap_err();
        assert!(matches!(e, ImageError::TooMuchMemory { needed: 720896, .. }), "{e}");
        let rgb = decode_rgb(&png, &limits(1 << 20)).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [4, 8, 12]);
    }

    #[test]
    fn a_jpeg_cut_short_is_refused_rather_than_filled_with_grey() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let mut jpg = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
            .unwrap();
        let limits = DecodeLimits::default();
        assert_eq!(decode_rgb(&jpg, &limits).unwrap().dimensions(), (64, 48));
        // Padding after the end marker is fine.
        let mut padded = jpg.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(decode_rgb(&padded, &limits).is_ok());
        for cut in [jpg.len() - 2, jpg.len() * 2 / 3] {
            assert!(
                matches!(decode_rgb(&jpg[..cut], &limits), Err(ImageError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn non_square_input_is_centre_cropped_then_resized() {
        let img = RgbImage::from_fn(300, 200, |x, _| {
            image::Rgb([if (50..250).contains(&x) { 0 } else { 255 }, 0, 0])
        });
        let p = Preprocess::imagenet(100);
        let sq = p.to_square(&img);
        assert_eq!(sq.dimensions(), (100, 100));
        // The red margins were cropped away.
        assert!(sq.pixels().all(|px| px.0[0] < 8));
    }
}
