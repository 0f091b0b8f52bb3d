// Checks that raw-pointer ranges are mapped (see mem_check.h).

#include "recoverkit/mem_check.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "recoverkit/errors.h"

namespace recoverkit {
namespace {

uintptr_t page_bytes() {
  static const uintptr_t p = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  return p;
}

[[noreturn]] void not_mapped(uintptr_t ptr, uint64_t nbytes, const char* what) {
  char msg[256];
  std::snprintf(msg, sizeof msg,
                "%s [0x%" PRIxPTR ", 0x%" PRIxPTR ") (%" PRIu64
                " bytes) is not mapped memory (a freed buffer or a bad pointer)",
                what, ptr, static_cast<uintptr_t>(ptr + nbytes), nbytes);
  throw OsError(EFAULT, "", msg);
}

// Whether every page of [first, last] (page addresses, inclusive) is mapped. msync with
// MS_ASYNC only walks the mappings of the range (it writes nothing back since Linux
// 2.6.19): ENOMEM when part of it is not mapped, in constant time whatever its length.
bool pages_mapped(uintptr_t first, uintptr_t last) {
  const size_t len = last - first + page_bytes();
  for (;;) {
    if (::msync(reinterpret_cast<void*>(first), len, MS_ASYNC) == 0) return true;
    if (errno == EINTR || errno == EAGAIN) continue;
    if (errno == ENOMEM) return false;
    const int err = errno;
    throw OsError(err, "", std::string("msync: ") + std::strerror(err));
  }
}

// The inclusive page range of a non-empty [ptr, ptr + nbytes); throws if it wraps.
void page_span(uintptr_t ptr, uint64_t nbytes, const char* what, uintptr_t& first,
               uintptr_t& last) {
  if (nbytes - 1 > UINTPTR_MAX - ptr) {
    throw InvalidArgument(std::string(what) + " range wraps around the address space (ptr " +
                          std::to_string(ptr) + ", nbytes " + std::to_string(nbytes) + ")");
  }
  const uintptr_t page = page_bytes();
  first = ptr & ~(page - 1);
  last = (ptr + (nbytes - 1)) & ~(page - 1);
}

}  // namespace

void check_mapped(uintptr_t ptr, uint64_t nbytes, const char* what) {
  if (nbytes == 0) return;
  uintptr_t first, last;
  page_span(ptr, nbytes, what, first, last);
  if (!pages_mapped(first, last)) not_mapped(ptr, nbytes, what);
}

void check_mapped(std::vector<MemRange>& ranges, const char* what) {
  if (ranges.size() == 1) return check_mapped(ranges[0].ptr, ranges[0].nbytes, what);
  for (const auto& r : ranges) {
    uintptr_t first, last;
    if (r.nbytes) page_span(r.ptr, r.nbytes, what, first, last);
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const MemRange& a, const MemRange& b) { return a.ptr < b.ptr; });
  const uintptr_t page = page_bytes();
  size_t run_start = 0;  // the first range of the current run of touching pages
  uintptr_t first = 0, last = 0;
  bool open = false;
  auto flush = [&](size_t end) {
    if (!open || pages_mapped(first, last)) return;
    for (size_t i = run_start; i < end; i++) {  // name the first range that is not mapped
      if (ranges[i].nbytes) check_mapped(ranges[i].ptr, ranges[i].nbytes, what);
    }
    not_mapped(first, last - first + page, what);  // unreachable unless unmapped meanwhile
  };
  for (size_t i = 0; i < ranges.size(); i++) {
    const auto& r = ranges[i];
    if (r.nbytes == 0) continue;
    const uintptr_t f = r.ptr & ~(page - 1), l = (r.ptr + (r.nbytes - 1)) & ~(page - 1);
    if (open && (f <= last || f - last <= page)) {  // overlaps or touches the run: extend it
      last = std::max(last, l);
      continue;
    }
    flush(i);
    run_start = i, first = f, last = l, open = true;
  }
  flush(ranges.size());
}

}  // namespace recoverkit
