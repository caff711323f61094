//! The few file operations the log needs, as a trait: [`FsDir`] does them on a real
//! directory; the tests' model file system (`sim`) does them in memory and can crash,
//! losing what was not synced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A file being appended to.
pub trait LogFile {
    /// Writes all of `bytes` at the end (one `write`: a crash keeps a prefix of them).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes, durably.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// A directory of log files.
pub trait Dir: Clone {
    type File: LogFile;
    type Reader: io::Read;
    /// The names of the files in it.
    fn list(&self) -> io::Result<Vec<String>>;
    /// A new empty file (an existing one is emptied), open for appending.
    fn create(&self, name: &str) -> io::Result<Self::File>;
    /// An existing file, open for appending at its end.
    fn open_append(&self, name: &str) -> io::Result<Self::File>;
    fn open_read(&self, name: &str) -> io::Result<Self::Reader>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// The length of `name` in bytes.
    fn len(&self, name: &str) -> io::Result<u64>;
    /// Makes the creations and removals so far durable (`fsync` of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// Writes `bytes` at `offset` of `name` (created if missing); `sync`: durably.
    fn write_at(&self, name: &str, offset: u64, bytes: &[u8], sync: bool) -> io::Result<()>;
}

/// A real directory.
#[derive(Debug, Clone)]
pub struct FsDir {
    path: PathBuf,
}

impl FsDir {
    /// The directory at `path`, created (with its parents) if missing.
    pub fn open(path: &Path) -> io::Result<Self> {
        fs::create_dir_all(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The directory at `path` as it is, for reading only: nothing is created.
    pub fn existing(path: &Path) -> io::Result<Self> {
        if !fs::metadata(path)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

/// A segment open for appending.
#[derive(Debug)]
pub struct FsFile(File);

impl LogFile for FsFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)?;
        self.0.sync_all()
    }
}

impl Dir for FsDir {
    type File = FsFile;
    type Reader = BufReader<File>;

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<FsFile> {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.path.join(name))?;
        Ok(FsFile(f))
    }

    fn open_append(&self, name: &str) -> io::Result<FsFile> {
        let f = OpenOptions::new().append(true).open(self.path.join(name))?;
        Ok(FsFile(f))
    }

    fn open_read(&self, name: &str) -> io::Result<BufReader<File>> {
        Ok(BufReader::with_capacity(
            64 * 1024,
            File::open(self.path.join(name))?,
        ))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path.join(name))
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.path.join(name))?.len())
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn write_at(&self, name: &str, offset: u64, bytes: &[u8], sync: bool) -> io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.join(name))?;
        f.write_all_at(bytes, offset)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }
}
