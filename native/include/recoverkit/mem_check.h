// Raw-pointer ranges checked before the engine touches them: a range with an unmapped page
// becomes OsError(EFAULT) instead of a SIGSEGV in a copy or checksum loop.
//
// The check is msync(MS_ASYNC) over the range's pages: the kernel walks the mappings that
// cover the range and fails with ENOMEM at a hole; it touches no memory and writes nothing
// back, and costs one system call (~0.3 us) whatever the length. Ranges whose pages
// overlap or touch share one call. It proves every page is *mapped*; it cannot see the
// protection. What stays the caller's contract (documented in recoverkit/_C.pyi):
//   * pages that are mapped but not readable (PROT_NONE guard pages, address-space
//     reservations such as CUDA's unified-address ranges passed as host pointers), and
//     destinations that are mapped read-only;
//   * memory unmapped or freed by another thread while a call (or a copy) is running.
// Paths that go through the kernel anyway (pwrite from the source, pread into the
// destination) report those as EFAULT too; copies and checksums in user space cannot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace recoverkit {

struct MemRange {
  uintptr_t ptr;
  uint64_t nbytes;
};

// Throws OsError(EFAULT, "", "<what> [0x.., 0x..) is not mapped memory...") when a page of
// [ptr, ptr + nbytes) is not mapped, InvalidArgument when the range wraps the address space.
// nbytes == 0 is always fine.
void check_mapped(uintptr_t ptr, uint64_t nbytes, const char* what);

// The same for many ranges: ranges whose pages overlap or touch are checked with one
// call, so many small buffers in a few pages cost a few system calls. Sorts `ranges`.
void check_mapped(std::vector<MemRange>& ranges, const char* what);

}  // namespace recoverkit
