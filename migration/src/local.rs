//! Local migration: to a process on the same host, guest memory goes across as file
//! descriptors (`SCM_RIGHTS` on the unix socket) instead of as pages, and only vCPU and device
//! state is copied. The source's memory must be a shared file (a memfd, or a hugetlbfs memfd):
//! private anonymous memory belongs to one process and cannot be handed over.
//!
//! The stream (`FORMAT.md` §7): `Config`, then `LocalMemory` in place of `MemoryLayout` with
//! one descriptor per region attached, `Ready` with the `LOCAL` flag, then straight to the
//! device state, `End` and the commit step. Who may run the guest is decided by `Go` exactly as
//! in a copying migration, and here it decides more: both processes map the same pages.
//!
//! - Before `Go` the source's guest runs and writes the memory; the destination maps it but
//!   never writes it (no pristine proof, no reset, no RAM pass; its vCPUs do not run). A
//!   failure before `Go` makes the destination unmap it again
//!   ([`MigrationTarget::release_memory`](crate::vm::MigrationTarget::release_memory)).
//! - From `Go` on the source never resumes its guest (the rule of every migration) and its
//!   paused vCPUs are the only writers it has, so it touches the memory no more.
//!
//! This module holds what both sides share: [`create_memfd`] (how shareable memory is made),
//! [`describe`] (the source's record and descriptors) and [`adopt`] (the destination's checks
//! of what arrived: every region shared, one regular, sealed, large enough file per region).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::memory::RamRegion;
use crate::records::{LayoutRegion, LocalRegion};
use crate::wire::PAGE_SIZE_U64;

/// How shareable guest memory is made (a sealed memfd); it lives with the mappings.
pub use crate::memory::create_memfd;

/// `statfs.f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Why the destination refuses what a local migration offers.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "Region {region} at guest address {guest_addr:#x} is private anonymous memory of the \
         source process, which no other process can map: a local migration needs guest memory \
         in a shared file (minivmm: `run --mem-shared` or `--mem-hugepages`)"
    )]
    NotShareable { region: usize, guest_addr: u64 },
    #[error("Local migration needs a unix socket: descriptors cannot pass over this connection")]
    NoFdPassing,
    #[error("{expected} memory descriptors expected with LocalMemory, {got} arrived")]
    FdCount { expected: usize, got: usize },
    #[error("Memory descriptor of region {region}: {what}")]
    BadFile { region: usize, what: String },
    #[error("Memory descriptor of region {region}: {what} failed")]
    Syscall {
        region: usize,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One region of the source's guest memory, handed over: the file and where the region is
/// in it. The destination maps `file` at `file_offset` (`size` bytes, shared) as guest memory
/// at `guest_addr`.
#[derive(Debug)]
pub struct SharedRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
    pub file: File,
    /// The file is on hugetlbfs (huge pages): map it without `MAP_NORESERVE` games, at an
    /// address aligned to `page_size`.
    pub hugetlbfs: bool,
    /// The file's page size (4 KiB, or the huge page size).
    pub page_size: u64,
}

impl SharedRegion {
    pub fn layout(&self) -> LayoutRegion {
        LayoutRegion {
            guest_addr: self.guest_addr,
            size: self.size,
        }
    }
}

/// The source's side: the `LocalMemory` entries of `regions` and the descriptors to attach
/// (one per shared region, in order). A region that is not a shared file is described as
/// such, for the destination to refuse with the reason.
pub fn describe(regions: &[RamRegion]) -> (Vec<LocalRegion>, Vec<BorrowedFd<'_>>) {
    let mut fds = Vec::new();
    let entries = regions
        .iter()
        .map(|r| {
            let file = r.file();
            if let Some((f, _)) = file {
                fds.push(f.as_fd());
            }
            LocalRegion {
                guest_addr: r.guest_addr(),
                size: r.len() as u64,
                file_offset: file.map_or(0, |(_, o)| o),
                shared: file.is_some(),
            }
        })
        .collect();
    (entries, fds)
}

/// The destination's side: pairs the entries of a `LocalMemory` record with the descriptors
/// that came with it, after checking that every region is shared and that each file is one
/// this process may map as guest memory without risk: a regular file opened read-write,
/// sealed against shrinking (nothing can cut it short under the mapping), long enough, and
/// aligned to its page size.
pub fn adopt(entries: &[LocalRegion], fds: Vec<OwnedFd>) -> Result<Vec<SharedRegion>, LocalError> {
    if let Some((region, e)) = entries.iter().enumerate().find(|(_, e)| !e.shared) {
        return Err(LocalError::NotShareable {
            region,
            guest_addr: e.guest_addr,
        });
    }
    if fds.len() != entries.len() {
        return Err(LocalError::FdCount {
            expected: entries.len(),
            got: fds.len(),
        });
    }
    entries
        .iter()
        .zip(fds)
        .enumerate()
        .map(|(i, (e, fd))| check_file(i, e, File::from(fd)))
        .collect()
}

fn check_file(region: usize, e: &LocalRegion, file: File) -> Result<SharedRegion, LocalError> {
    let bad = |what: String| LocalError::BadFile { region, what };
    let sys = |what: &'static str| LocalError::Syscall {
        region,
        what,
        source: io::Error::last_os_error(),
    };
    let fd = file.as_raw_fd();
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`, which outlives the call; the descriptor is ours.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(sys("fstat"));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad(format!(
            "not a regular file (mode {:#o})",
            st.st_mode & libc::S_IFMT
        )));
    }
    // SAFETY: a flag query on our own descriptor; no memory is involved.
    let access = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if access < 0 {
        return Err(sys("F_GETFL"));
    }
    if access & libc::O_ACCMODE != libc::O_RDWR {
        return Err(bad("not opened for reading and writing".into()));
    }
    // SAFETY: a seal query on our own descriptor; no memory is involved.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(bad(
            "not a memfd sealed against shrinking (F_SEAL_SHRINK): its owner could cut it \
             short under this process's mapping"
                .into(),
        ));
    }
    let end = e.file_offset.saturating_add(e.size);
    if (st.st_size as u64) < end {
        return Err(bad(format!(
            "{} bytes long, the region needs {end} (offset {:#x} + {:#x})",
            st.st_size, e.file_offset, e.size
        )));
    }
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes only into `fs`, which outlives the call; the descriptor is ours.
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return Err(sys("fstatfs"));
    }
    let hugetlbfs = fs.f_type as i64 == HUGETLBFS_MAGIC;
    let page_size = if hugetlbfs {
        st.st_blksize as u64
    } else {
        PAGE_SIZE_U64
    };
    if page_size == 0
        || !e.file_offset.is_multiple_of(page_size)
        || !e.size.is_multiple_of(page_size)
        || !e.guest_addr.is_multiple_of(page_size)
    {
        return Err(bad(format!(
            "region ({:#x} bytes at file offset {:#x}, guest {:#x}) not aligned to the \
             file's {page_size}-byte pages",
            e.size, e.file_offset, e.guest_addr
        )));
    }
    Ok(SharedRegion {
        guest_addr: e.guest_addr,
        size: e.size,
        file_offset: e.file_offset,
        file,
        hugetlbfs,
        page_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::memory::AnonMapping;

    fn entry(size: u64) -> LocalRegion {
        LocalRegion {
            guest_addr: 0,
            size,
            file_offset: 0,
            shared: true,
        }
    }

    fn refusal(e: &LocalRegion, file: File) -> String {
        adopt(std::slice::from_ref(e), vec![OwnedFd::from(file)])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_sealed_memfd_is_adopted_and_describes_itself() {
        let map = Arc::new(AnonMapping::new_shared(64 << 10).unwrap());
        let regions = [RamRegion::from_anon(0x10000, map.clone()).unwrap()];
        let (entries, fds) = describe(&regions);
        assert_eq!(
            entries,
            [LocalRegion {
                guest_addr: 0x10000,
                ..entry(64 << 10)
            }]
        );
        let fds: Vec<OwnedFd> = fds
            .iter()
            .map(|f| f.try_clone_to_owned().unwrap())
            .collect();
        let shared = adopt(&entries, fds).unwrap();
        assert_eq!(shared.len(), 1);
        assert!(!shared[0].hugetlbfs);
        // Both mappings are the same memory.
        let other = AnonMapping::map_file(
            Arc::new(shared.into_iter().next().unwrap().file),
            0,
            64 << 10,
        )
        .unwrap();
        map.write(4096, b"same pages");
        let mut got = [0u8; 10];
        other.read(4096, &mut got);
        assert_eq!(&got, b"same pages");
    }

    #[test]
    fn private_memory_is_refused_with_the_reason() {
        let map = Arc::new(AnonMapping::new(64 << 10).unwrap());
        let regions = [RamRegion::from_anon(0, map).unwrap()];
        let (entries, fds) = describe(&regions);
        assert!(fds.is_empty() && !entries[0].shared);
        let e = adopt(&entries, Vec::new()).unwrap_err().to_string();
        assert!(
            e.contains("private anonymous") && e.contains("--mem-shared"),
            "{e}"
        );
    }

    #[test]
    fn files_that_could_fail_the_mapping_are_refused() {
        // Not sealed: its owner could truncate it.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(8192).unwrap();
        assert!(refusal(&entry(8192), plain).contains("sealed"));
        // Too short.
        let short = create_memfd("t", 4096, false).unwrap();
        assert!(refusal(&entry(8192), short).contains("4096 bytes long"));
        // Read-only.
        let memfd = create_memfd("t", 8192, false).unwrap();
        let ro = File::open(format!("/proc/self/fd/{}", memfd.as_raw_fd())).unwrap();
        assert!(refusal(&entry(8192), ro).contains("reading and writing"));
        // Not a regular file.
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let sock = File::from(OwnedFd::from(sock));
        assert!(refusal(&entry(8192), sock).contains("regular file"));
        // One descriptor short.
        let e = adopt(
            &[
                entry(4096),
                LocalRegion {
                    guest_addr: 4096,
                    ..entry(4096)
                },
            ],
            Vec::new(),
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("2 memory descriptors expected"));
    }
}
