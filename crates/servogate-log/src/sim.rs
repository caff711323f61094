//! A model file system for the tests: files in memory, each with the length that is
//! durable; [`SimDir::crash`] keeps only what was synced plus any prefix of what was not
//! (a torn last write), and forgets files whose directory entry was never synced.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use crate::dir::{Dir, LogFile};

#[derive(Debug, Clone, Default)]
struct SimFile {
    data: Vec<u8>,
    /// Bytes of `data` that survive a crash.
    synced: usize,
    /// The directory entry survives a crash.
    entry_synced: bool,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<String, SimFile>,
    /// Files removed since the last directory sync: they come back after a crash.
    removed: BTreeMap<String, SimFile>,
    /// Appends and syncs fail while set (a full disk, a dying disk).
    fail_writes: bool,
    fail_syncs: bool,
}

/// The model directory; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimDir(Rc<RefCell<State>>);

impl SimDir {
    /// A power cut: each file keeps its synced bytes and `tear(name, unsynced)` more of
    /// its unsynced ones; unsynced creations vanish, unsynced removals come back.
    pub fn crash(&self, mut tear: impl FnMut(&str, usize) -> usize) {
        let mut st = self.0.borrow_mut();
        let removed = std::mem::take(&mut st.removed);
        for (name, f) in removed {
            st.files.insert(name, f);
        }
        st.files.retain(|_, f| f.entry_synced);
        for (name, f) in st.files.iter_mut() {
            let unsynced = f.data.len() - f.synced;
            let keep = f.synced + tear(name, unsynced).min(unsynced);
            f.data.truncate(keep);
            f.synced = keep;
        }
    }

    pub fn set_fail_writes(&self, fail: bool) {
        self.0.borrow_mut().fail_writes = fail;
    }

    pub fn set_fail_syncs(&self, fail: bool) {
        self.0.borrow_mut().fail_syncs = fail;
    }

    /// The bytes of `name` (for tests that damage a file by hand).
    pub fn edit(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut st = self.0.borrow_mut();
        let file = st.files.get_mut(name).expect("no such file");
        f(&mut file.data);
        file.synced = file.data.len();
    }
}

/// A model file open for appending.
pub struct SimFileHandle {
    dir: SimDir,
    name: String,
}

impl SimFileHandle {
    fn with<T>(&self, f: impl FnOnce(&mut State, &str) -> io::Result<T>) -> io::Result<T> {
        f(&mut self.dir.0.borrow_mut(), &self.name)
    }
}

fn gone(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl LogFile for SimFileHandle {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.with(|st, name| {
            let fail = st.fail_writes;
            let f = st.files.get_mut(name).ok_or_else(|| gone(name))?;
            if fail {
                // A full disk takes part of the write.
                f.data.extend_from_slice(&bytes[..bytes.len() / 2]);
                return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"));
            }
            f.data.extend_from_slice(bytes);
            Ok(())
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.with(|st, name| {
            if st.fail_syncs {
                return Err(io::Error::other("EIO"));
            }
            let f = st.files.get_mut(name).ok_or_else(|| gone(name))?;
            f.synced = f.data.len();
            Ok(())
        })
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.with(|st, name| {
            let f = st.files.get_mut(name).ok_or_else(|| gone(name))?;
            f.data.truncate(len as usize);
            f.synced = f.data.len();
            Ok(())
        })
    }
}

impl Dir for SimDir {
    type File = SimFileHandle;
    type Reader = io::Cursor<Vec<u8>>;

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.0.borrow().files.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<SimFileHandle> {
        let mut st = self.0.borrow_mut();
        let entry_synced = st.files.get(name).is_some_and(|f| f.entry_synced);
        st.removed.remove(name);
        st.files.insert(
            name.to_owned(),
            SimFile {
                entry_synced,
                ..SimFile::default()
            },
        );
        Ok(SimFileHandle {
            dir: self.clone(),
            name: name.to_owned(),
        })
    }

    fn open_append(&self, name: &str) -> io::Result<SimFileHandle> {
        if !self.0.borrow().files.contains_key(name) {
            return Err(gone(name));
        }
        Ok(SimFileHandle {
            dir: self.clone(),
            name: name.to_owned(),
        })
    }

    fn open_read(&self, name: &str) -> io::Result<io::Cursor<Vec<u8>>> {
        let st = self.0.borrow();
        let f = st.files.get(name).ok_or_else(|| gone(name))?;
        Ok(io::Cursor::new(f.data.clone()))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = self.0.borrow_mut();
        let f = st.files.remove(name).ok_or_else(|| gone(name))?;
        if f.entry_synced {
            st.removed.insert(name.to_owned(), f);
        }
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        let st = self.0.borrow();
        Ok(st.files.get(name).ok_or_else(|| gone(name))?.data.len() as u64)
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut st = self.0.borrow_mut();
        if st.fail_syncs {
            return Err(io::Error::other("EIO"));
        }
        st.removed.clear();
        for f in st.files.values_mut() {
            f.entry_synced = true;
        }
        Ok(())
    }

    fn write_at(&self, name: &str, offset: u64, bytes: &[u8], sync: bool) -> io::Result<()> {
        let mut st = self.0.borrow_mut();
        let f = st.files.entry(name.to_owned()).or_default();
        let end = offset as usize + bytes.len();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[offset as usize..end].copy_from_slice(bytes);
        if sync {
            f.synced = f.data.len();
        }
        Ok(())
    }
}
