// Segment files: many host buffers written to one file at given offsets with pwrite (or
// O_DIRECT through aligned bounce buffers and writer threads), fsync'ed, every return code checked; and read
// back with each item's CRC-32C verified. These calls block; the bindings release the GIL
// around them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace recoverkit {

struct WriteItem {
  uint64_t file_offset;
  const void* src;
  uint64_t nbytes;
};

struct ReadItem {
  uint64_t file_offset;
  void* dst;
  uint64_t nbytes;
  uint32_t expected_crc;  // every item is checked: there is no "unchecked" value
};

// Creates/rewrites `path` (mode 0644), writes every item at its offset, sizes the file to
// max(offset + nbytes) (gaps read as zeros), fsyncs when asked. Items must not overlap
// (InvalidArgument) nor end past the largest off_t (std::overflow_error); every source
// range must be mapped (OsError(EFAULT), see mem_check.h), all checked before the file is
// opened. The file is opened with O_NOFOLLOW and O_NONBLOCK and must be a regular file with
// one link, checked before it is emptied: a symlink (ELOOP), a FIFO, socket or device
// (ENXIO/EINVAL) or a hard-linked file (EMLINK) is refused and left untouched.
// direct: O_DIRECT where the file system supports it, else buffered;
// O_DIRECT writes go through a few writer threads, so copying into the next bounce buffer
// overlaps the disk. want_crc: returns the CRC-32C of each item (in `items` order),
// computed in the same pass as the copy or the write; otherwise an empty vector.
// Throws OsError(errno, path) on any failed system call.
std::vector<uint32_t> write_segment(const std::string& path, const std::vector<WriteItem>& items,
                                    bool direct, bool fsync_file, bool want_crc = false);

// Reads every item into its destination and returns the CRC-32C of each. Before any byte
// is read, in this order: the file is opened without following a symlink and without
// blocking, it is a regular file, every item's region lies inside it, and every
// destination range is mapped (OsError(EFAULT)). Throws IntegrityFailure for a symlink, a file that is not regular, a
// region past the end of the file or a checksum mismatch; OsError for failed system calls.
std::vector<uint32_t> read_segment(const std::string& path, const std::vector<ReadItem>& items);

}  // namespace recoverkit
