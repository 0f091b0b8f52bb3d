// Segment file writes (pwrite or O_DIRECT) and verified reads (see segment_io.h).

#include "recoverkit/segment_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "recoverkit/crc32c.h"
#include "recoverkit/errors.h"

namespace recoverkit {
namespace {

constexpr uint64_t kBlock = 4096;           // O_DIRECT alignment of buffer, offset and length
constexpr size_t kBounceBytes = 8 << 20;    // O_DIRECT bounce window
constexpr size_t kMaxIo = size_t{1} << 30;  // bytes per pwrite/pread call
constexpr size_t kReadPiece = 1 << 20;      // read then checksum while still in cache

[[noreturn]] void throw_os(int err, const std::string& path, const char* what) {
  throw OsError(err, path, std::string(what) + " " + path + ": " + std::strerror(err));
}

uint64_t align_down(uint64_t v) { return v / kBlock * kBlock; }
uint64_t align_up(uint64_t v) { return (v + kBlock - 1) / kBlock * kBlock; }

// Closes on scope exit unless released; the success path closes explicitly and checks.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  void close_checked(const std::string& path) {
    const int f = fd;
    fd = -1;
    if (::close(f) != 0) throw_os(errno, path, "close");
  }
};

void pwrite_all(int fd, const uint8_t* p, uint64_t n, uint64_t off, const std::string& path) {
  while (n) {
    const ssize_t w = ::pwrite(fd, p, std::min<uint64_t>(n, kMaxIo), static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && (fcntl(fd, F_GETFL) & O_DIRECT)) {
        // The file system refused this O_DIRECT write: finish the file buffered.
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_DIRECT) == 0) continue;
        errno = EINVAL;
      }
      throw_os(errno, path, "pwrite");
    }
    if (w == 0) throw_os(EIO, path, "pwrite made no progress on");
    p += w;
    n -= static_cast<uint64_t>(w);
    off += static_cast<uint64_t>(w);
  }
}

// One reusable aligned bounce buffer per thread (no allocation per segment).
uint8_t* bounce_buffer() {
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<uint8_t, Free> buf;
  if (!buf) {
    void* p = nullptr;
    if (posix_memalign(&p, kBlock, kBounceBytes) != 0) throw std::bad_alloc();
    buf.reset(static_cast<uint8_t*>(p));
  }
  return buf.get();
}

// Streams items (sorted by offset, non-overlapping) to an O_DIRECT file: aligned sources
// go straight from memory, everything else through a window [start_, start_ + len_) of
// the file held in the bounce buffer; partial blocks are zero-padded.
class DirectWriter {
 public:
  DirectWriter(int fd, const std::string& path) : fd_(fd), path_(path), buf_(bounce_buffer()) {}

  void write(uint64_t off, const uint8_t* src, uint64_t n) {
    if (active_ && off >= align_up(start_ + len_)) flush_tail();
    if (active_) {  // the item starts in the window's last block
      std::memset(buf_ + len_, 0, off - (start_ + len_));
      len_ = off - start_;
    } else {
      if (off % kBlock == 0 && reinterpret_cast<uintptr_t>(src) % kBlock == 0 && n >= kBlock) {
        const uint64_t direct = align_down(n);
        pwrite_all(fd_, src, direct, off, path_);
        end_ = std::max(end_, off + direct);
        off += direct, src += direct, n -= direct;
        if (n == 0) return;
      }
      start_ = align_down(off);
      len_ = off - start_;
      std::memset(buf_, 0, len_);
      active_ = true;
    }
    while (n) {
      const size_t take = std::min<uint64_t>(n, kBounceBytes - len_);
      std::memcpy(buf_ + len_, src, take);
      len_ += take, src += take, n -= take;
      if (len_ == kBounceBytes) {
        pwrite_all(fd_, buf_, kBounceBytes, start_, path_);
        end_ = std::max<uint64_t>(end_, start_ + kBounceBytes);
        start_ += kBounceBytes;
        len_ = 0;
      }
    }
  }

  void flush_tail() {
    if (active_ && len_) {
      const uint64_t padded = align_up(len_);
      std::memset(buf_ + len_, 0, padded - len_);
      pwrite_all(fd_, buf_, padded, start_, path_);
      end_ = std::max(end_, start_ + padded);
    }
    active_ = false;
    len_ = 0;
  }

  uint64_t end() const { return end_; }  // bytes of the file written so far (padded)

 private:
  int fd_;
  const std::string& path_;
  uint8_t* buf_;
  bool active_ = false;
  uint64_t start_ = 0, len_ = 0, end_ = 0;
};

int open_for_write(const std::string& path, bool direct, bool& is_direct) {
  const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
  is_direct = false;
  if (direct) {
    const int fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
    if (fd >= 0) {
      is_direct = true;
      return fd;
    }
    if (errno != EINVAL) throw_os(errno, path, "open");
  }
  const int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) throw_os(errno, path, "open");
  return fd;
}

}  // namespace

void write_segment(const std::string& path, const std::vector<WriteItem>& items, bool direct,
                   bool fsync_file) {
  std::vector<WriteItem> sorted(items);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const WriteItem& a, const WriteItem& b) { return a.file_offset < b.file_offset; });
  uint64_t size = 0, prev_end = 0;
  for (const auto& it : sorted) {
    if (it.nbytes && it.src == nullptr) throw InvalidArgument("segment item with a null src_ptr");
    if (it.nbytes && it.file_offset < prev_end)
      throw InvalidArgument("segment items overlap at file offset " + std::to_string(it.file_offset));
    if (it.nbytes) prev_end = it.file_offset + it.nbytes;
    size = std::max<uint64_t>(size, it.file_offset + it.nbytes);
  }

  bool is_direct = false;
  Fd fd;
  fd.fd = open_for_write(path, direct, is_direct);
  uint64_t written_end = 0;
  if (is_direct) {
    DirectWriter w(fd.fd, path);
    for (const auto& it : sorted) {
      if (it.nbytes) w.write(it.file_offset, static_cast<const uint8_t*>(it.src), it.nbytes);
    }
    w.flush_tail();
    written_end = w.end();
  } else {
    for (const auto& it : items) {  // in the caller's order: sequential for sorted layouts
      if (!it.nbytes) continue;
      pwrite_all(fd.fd, static_cast<const uint8_t*>(it.src), it.nbytes, it.file_offset, path);
      written_end = std::max<uint64_t>(written_end, it.file_offset + it.nbytes);
    }
  }
  if (written_end != size) {
    int rc;
    do rc = ::ftruncate(fd.fd, static_cast<off_t>(size));
    while (rc != 0 && errno == EINTR);
    if (rc != 0) throw_os(errno, path, "ftruncate");
  }
  if (fsync_file && ::fsync(fd.fd) != 0) throw_os(errno, path, "fsync");
  fd.close_checked(path);
}

std::vector<uint32_t> read_segment(const std::string& path, const std::vector<ReadItem>& items) {
  for (const auto& it : items) {
    if (it.nbytes && it.dst == nullptr) throw InvalidArgument("segment item with a null dst_ptr");
    if (it.expected_crc < -1 || it.expected_crc > 0xFFFFFFFFll)
      throw InvalidArgument("expected_crc must be -1 or a 32-bit value");
  }
  Fd fd;
  fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd.fd < 0) throw_os(errno, path, "open");
  struct stat st;
  if (::fstat(fd.fd, &st) != 0) throw_os(errno, path, "fstat");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto truncated = [&](const ReadItem& it, uint64_t have) {
    return IntegrityFailure(path, "truncated: " + path + " has " + std::to_string(have) +
                                      " bytes, item needs [" + std::to_string(it.file_offset) +
                                      ", " + std::to_string(it.file_offset + it.nbytes) + ")");
  };
  for (const auto& it : items) {
    if (it.file_offset + it.nbytes > size) throw truncated(it, size);
  }
  ::posix_fadvise(fd.fd, 0, 0, POSIX_FADV_SEQUENTIAL);

  std::vector<uint32_t> crcs;
  crcs.reserve(items.size());
  for (const auto& it : items) {
    auto* dst = static_cast<uint8_t*>(it.dst);
    uint32_t crc = 0;
    uint64_t done = 0;
    while (done < it.nbytes) {
      const size_t want = std::min<uint64_t>(kReadPiece, it.nbytes - done);
      const ssize_t r = ::pread(fd.fd, dst + done, want, static_cast<off_t>(it.file_offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw_os(errno, path, "pread");
      }
      if (r == 0) throw truncated(it, it.file_offset + done);  // shrank while reading
      crc = crc32c_extend(crc, dst + done, static_cast<size_t>(r));
      done += static_cast<uint64_t>(r);
    }
    if (it.expected_crc >= 0 && crc != static_cast<uint32_t>(it.expected_crc)) {
      char msg[160];
      std::snprintf(msg, sizeof msg, " at offset %" PRIu64 " (%" PRIu64 " bytes): expected 0x%08x, found 0x%08x",
                    it.file_offset, it.nbytes, static_cast<uint32_t>(it.expected_crc), crc);
      throw IntegrityFailure(path, "crc32c mismatch in " + path + msg);
    }
    crcs.push_back(crc);
  }
  fd.close_checked(path);
  return crcs;
}

}  // namespace recoverkit
