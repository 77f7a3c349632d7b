//! An adapter for inference requests with an image as the body (`image/png`, `image/jpeg`): the
//! model's one float input of rank 4 gets the image, converted to RGB (3 channels) or grey (1),
//! resized to the input's height and width (bilinear) unless they are open, scaled to [0, 1] and
//! normalised per channel, `(x / 255 - mean) / std`, in NCHW or NHWC order, batch 1.
use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits};
use nereid_sdk::prelude::*;
use nereid_sdk::{InputSpec, TensorData};

struct ImageAdapter {
    layout: Order,
    mean: [f32; 3],
    std: [f32; 3],
    resize: bool,
    /// The largest image decoded, in pixels: a few hundred bytes of JPEG or PNG can declare
    /// (and make the decoder fill) tens of millions.
    max_pixels: u64,
}

/// 8,388,608 pixels: 4K UHD (3840x2160) fits.
const DEFAULT_MAX_PIXELS: i64 = 1 << 23;
/// Past this an image's decoded pixels do not fit the plugin's memory anyway.
const MAX_MAX_PIXELS: i64 = 1 << 26;

impl Default for ImageAdapter {
    fn default() -> Self {
        ImageAdapter {
            layout: Order::Nchw,
            mean: [0.0; 3],
            std: [1.0; 3],
            resize: true,
            max_pixels: DEFAULT_MAX_PIXELS as u64,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Order {
    Nchw,
    Nhwc,
}

fn three(config: &Config, key: &str) -> Result<[f32; 3], PluginError> {
    let text = config.text(key)?;
    let values: Vec<f32> = text
        .split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| PluginError::invalid_config(key, format!("`{text}` is not three numbers like 0.5,0.5,0.5")))?;
    match values.as_slice() {
        [v] => Ok([*v; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err(PluginError::invalid_config(key, format!("`{text}`: give one number or three (R,G,B)"))),
    }
}

impl Plugin for ImageAdapter {
    fn info() -> Info {
        Info::new("image-adapter", "0.1.0", "A PNG or JPEG image as a model's float input")
            .text("layout", Some("nchw"), "nchw | nhwc: the order of the model's input")
            .text("mean", Some("0"), "per channel (R,G,B or one for all), subtracted after scaling to [0, 1]")
            .text("std", Some("1"), "per channel (R,G,B or one for all), divided by after the mean")
            .boolean("resize", Some(true), "resize to the input's height and width (else a size mismatch is refused)")
            .integer(
                "max_pixels",
                Some(DEFAULT_MAX_PIXELS),
                "the largest image decoded (width x height), read from its header first; larger ones are refused",
            )
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.layout = match config.text("layout")? {
            "nchw" => Order::Nchw,
            "nhwc" => Order::Nhwc,
            other => return Err(PluginError::invalid_config("layout", format!("`{other}` is not nchw or nhwc"))),
        };
        self.mean = three(config, "mean")?;
        self.std = three(config, "std")?;
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
            return Err(PluginError::invalid_config("std", format!("{s} cannot divide")));
        }
        self.resize = config.bool("resize")?;
        let max_pixels = config.i64("max_pixels")?;
        if !(1..=MAX_MAX_PIXELS).contains(&max_pixels) {
            return Err(PluginError::invalid_config(
                "max_pixels",
                format!("must be 1 to {MAX_MAX_PIXELS}, got {max_pixels}"),
            ));
        }
        self.max_pixels = max_pixels as u64;
        Ok(())
    }
}

impl Adapter for ImageAdapter {
    fn decode(
        &mut self,
        content_type: &str,
        payload: &[u8],
        inputs: &[InputSpec],
    ) -> Result<Vec<TensorData>, PluginError> {
        let format = match content_type {
            "image/png" => image::ImageFormat::Png,
            "image/jpeg" => image::ImageFormat::Jpeg,
            other => {
                return Err(PluginError::Rejected(format!(
                    "content type `{other}`: this adapter takes image/png and image/jpeg"
                )))
            }
        };
        let [input] = inputs else {
            return Err(PluginError::Rejected(format!("the model has {} inputs; an image fills one", inputs.len())));
        };
        if input.dtype != DType::F32 || input.shape.len() != 4 {
            return Err(PluginError::Rejected(format!(
                "input `{}` is not a float tensor of rank 4 (an image batch)",
                input.name
            )));
        }
        let (c_at, h_at, w_at) = match self.layout {
            Order::Nchw => (1, 2, 3),
            Order::Nhwc => (3, 1, 2),
        };
        let channels = input.shape[c_at].unwrap_or(3);
        if channels != 1 && channels != 3 {
            return Err(PluginError::Rejected(format!(
                "input `{}` has {channels} channels; an image gives 1 (grey) or 3 (RGB) (is `layout` right?)",
                input.name
            )));
        }
        let unreadable = |e: image::ImageError| PluginError::Rejected(format!("not a readable {content_type}: {e}"));
        // The size from the header, before anything is decoded.
        let (w, h) = ImageReader::with_format(Cursor::new(payload), format).into_dimensions().map_err(unreadable)?;
        let pixels = u64::from(w) * u64::from(h);
        if pixels > self.max_pixels {
            return Err(PluginError::Rejected(format!(
                "the image is {w}x{h} = {pixels} pixels; this adapter decodes at most {} (`max_pixels`)",
                self.max_pixels
            )));
        }
        let mut reader = ImageReader::with_format(Cursor::new(payload), format);
        // The decoder's own bound as well: 4 bytes a pixel (RGBA) and its working buffers.
        let mut limits = Limits::default();
        limits.max_alloc = Some(self.max_pixels * 8 + (16 << 20));
        reader.limits(limits);
        let picture = reader.decode().map_err(unreadable)?;
        let width = input.shape[w_at].map_or(Ok(picture.width()), u32::try_from).unwrap_or(u32::MAX);
        let height = input.shape[h_at].map_or(Ok(picture.height()), u32::try_from).unwrap_or(u32::MAX);
        let picture = if (picture.width(), picture.height()) == (width, height) {
            picture
        } else if self.resize {
            picture.resize_exact(width, height, FilterType::Triangle)
        } else {
            return Err(PluginError::Rejected(format!(
                "the image is {}x{}, the model takes {width}x{height} (resize = false)",
                picture.width(),
                picture.height()
            )));
        };
        let pixels: Vec<u8> = match channels {
            1 => DynamicImage::ImageLuma8(picture.to_luma8()).into_bytes(),
            _ => DynamicImage::ImageRgb8(picture.to_rgb8()).into_bytes(),
        };
        let (c, h, w) = (channels as usize, height as usize, width as usize);
        let mut values = vec![0f32; c * h * w];
        for (i, &p) in pixels.iter().enumerate() {
            let (pixel, ch) = (i / c, i % c);
            let v = (p as f32 / 255.0 - self.mean[ch]) / self.std[ch];
            // The decoder gives HWC; NCHW moves each channel to its own plane.
            let at = match self.layout {
                Order::Nhwc => i,
                Order::Nchw => ch * h * w + pixel,
            };
            values[at] = v;
        }
        let shape = match self.layout {
            Order::Nchw => vec![1, c as u64, h as u64, w as u64],
            Order::Nhwc => vec![1, h as u64, w as u64, c as u64],
        };
        Ok(vec![TensorData::f32(&input.name, shape, &values)])
    }
}

nereid_sdk::export_adapter!(ImageAdapter);
