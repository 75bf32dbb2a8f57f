//! Cameras: one interface, [`FrameSource`], for the microscope camera (V4L2, built with the
//! `camera` feature so that machines without one build without it) and for recorded frames
//! replayed from a folder (tests, demonstrations, a session recorded elsewhere).
//!
//! The technician frames a field and asks for a capture (the web UI's button); the appliance
//! grabs one frame and processes it like any other image.

use anyhow::{Context, Result, bail};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// One frame: an encoded image (JPEG from a camera's MJPEG stream, or a recorded file).
#[derive(Debug, Clone)]
pub struct Frame {
    /// Encoded image bytes.
    pub bytes: Vec<u8>,
    /// A name for it (a recorded file's name, or `camera-<n>.jpg`).
    pub name: String,
}

/// A source of frames.
pub trait FrameSource: Send {
    /// The next frame; `None` when the source has no more (a recording that ended).
    fn grab(&mut self) -> Result<Option<Frame>>;
    /// What it is, in words (shown in the UI).
    fn describe(&self) -> String;
}

pub use wbc_config::CameraConfig;

/// Opens the configured camera.
pub fn open(config: &CameraConfig) -> Result<Box<dyn FrameSource>> {
    match config {
        CameraConfig::Replay { folder } => Ok(Box::new(ReplaySource::open(folder)?)),
        #[cfg(feature = "camera")]
        CameraConfig::V4l2 { device, width, height } => Ok(Box::new(v4l2::V4l2Source::open(device, *width, *height)?)),
        #[cfg(not(feature = "camera"))]
        CameraConfig::V4l2 { device, .. } => bail!(
            "camera {} is configured but this build has no V4L2 support (build with `--features camera`)",
            device.display()
        ),
    }
}

/// Recorded frames, replayed in name order.
#[derive(Debug)]
pub struct ReplaySource {
    folder: PathBuf,
    frames: VecDeque<PathBuf>,
}

impl ReplaySource {
    /// The image files of a folder.
    pub fn open(folder: &Path) -> Result<Self> {
        let mut frames: Vec<PathBuf> = std::fs::read_dir(folder)
            .with_context(|| format!("reading recorded frames in {}", folder.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        frames.sort();
        if frames.is_empty() {
            bail!("{} holds no recorded frames", folder.display());
        }
        Ok(ReplaySource {
            folder: folder.to_path_buf(),
            frames: frames.into(),
        })
    }
}

impl FrameSource for ReplaySource {
    fn grab(&mut self) -> Result<Option<Frame>> {
        let Some(p) = self.frames.pop_front() else {
            return Ok(None);
        };
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Some(Frame { bytes, name }))
    }

    fn describe(&self) -> String {
        format!(
            "recorded frames from {} ({} left)",
            self.folder.display(),
            self.frames.len()
        )
    }
}

#[cfg(feature = "camera")]
mod v4l2 {
    use super::{Frame, FrameSource};
    use anyhow::{Context, Result, bail};
    use std::path::{Path, PathBuf};
    use v4l::buffer::Type;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    /// A V4L2 camera streaming MJPEG.
    pub struct V4l2Source {
        path: PathBuf,
        stream: Stream<'static>,
        count: u64,
    }

    impl V4l2Source {
        pub fn open(path: &Path, width: u32, height: u32) -> Result<Self> {
            let dev = Device::with_path(path).with_context(|| format!("opening camera {}", path.display()))?;
            let mut fmt = dev.format()?;
            fmt.width = width;
            fmt.height = height;
            fmt.fourcc = FourCC::new(b"MJPG");
            let fmt = dev.set_format(&fmt)?;
            if fmt.fourcc != FourCC::new(b"MJPG") {
                bail!(
                    "camera {} cannot stream MJPEG (it offers {})",
                    path.display(),
                    fmt.fourcc
                );
            }
            // The stream borrows the device for its lifetime: the device lives as long as the
            // process.
            let dev: &'static Device = Box::leak(Box::new(dev));
            let stream = Stream::with_buffers(dev, Type::VideoCapture, 4)?;
            Ok(V4l2Source {
                path: path.to_path_buf(),
                stream,
                count: 0,
            })
        }
    }

    impl FrameSource for V4l2Source {
        fn grab(&mut self) -> Result<Option<Frame>> {
            let (buf, meta) = self.stream.next()?;
            let bytes = buf[..meta.bytesused as usize].to_vec();
            self.count += 1;
            Ok(Some(Frame {
                bytes,
                name: format!("camera-{}.jpg", self.count),
            }))
        }

        fn describe(&self) -> String {
            format!("V4L2 camera {}", self.path.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_replays_in_order_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("2.jpg"), b"second").unwrap();
        std::fs::write(dir.path().join("1.jpg"), b"first").unwrap();
        let mut s = open(&CameraConfig::Replay {
            folder: dir.path().to_path_buf(),
        })
        .unwrap();
        assert!(s.describe().contains("2 left"));
        assert_eq!(s.grab().unwrap().unwrap().bytes, b"first");
        assert_eq!(s.grab().unwrap().unwrap().name, "2.jpg");
        assert!(s.grab().unwrap().is_none());
        let empty = tempfile::tempdir().unwrap();
        assert!(ReplaySource::open(empty.path()).is_err());
    }

    #[cfg(not(feature = "camera"))]
    #[test]
    fn a_v4l2_camera_without_the_feature_is_a_clear_error() {
        let err = open(&CameraConfig::V4l2 {
            device: "/dev/video0".into(),
            width: 640,
            height: 480,
        })
        .err()
        .unwrap();
        assert!(format!("{err}").contains("--features camera"));
    }
}
