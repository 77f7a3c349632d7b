//! Reading files a user names (plugin components, models, config files): only regular files,
//! and at most a size limit, so that a FIFO does not hang a command and `/dev/zero` does not
//! fill the memory.
use std::io::{self, Read};
use std::path::Path;

/// Largest component file read.
pub const MAX_COMPONENT_BYTES: u64 = nereid_registry::MAX_COMPONENT_BYTES;
/// Largest ONNX model read (protobuf's own limit).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;
/// Largest TOML file read (jobs, node configs, pipelines).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn refuse(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// The bytes of `path`, if it is a regular file of at most `max` bytes.
pub fn read_limited(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    // stat first: opening a FIFO for reading would block until a writer came.
    let meta = std::fs::metadata(path)?;
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        if meta.len() > max {
            return Err(refuse(format!("{} bytes, more than the {max} bytes allowed", meta.len())));
        }
        Ok(())
    };
    check(&meta)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Swapped for a FIFO since the stat: the open must not block either.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    check(&file.metadata()?)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(refuse(format!("more than the {max} bytes allowed")));
    }
    Ok(bytes)
}

/// As [`read_limited`], as UTF-8 text.
pub fn read_text_limited(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_limited(path, max)?).map_err(|_| refuse("not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_large_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_limited(&fifo, 10).expect_err("fifo");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read_limited(Path::new("/dev/zero"), 10).expect_err("device");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; 11]).expect("write");
        let e = read_limited(&big, 10).expect_err("big");
        assert!(e.to_string().contains("11 bytes, more than the 10"), "{e}");
        assert_eq!(read_limited(&big, 11).expect("fits").len(), 11);
        assert!(read_limited(dir.path(), 10).is_err(), "a directory");
    }
}
