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
#include <stdexcept>

#include "recoverkit/crc32c.h"
#include "recoverkit/errors.h"
#include "recoverkit/mem_check.h"
#include "recoverkit/write_queue.h"

namespace recoverkit {
namespace {

constexpr uint64_t kBlock = 4096;           // O_DIRECT alignment of buffer, offset and length
constexpr size_t kBounceBytes = 8 << 20;    // O_DIRECT bounce window, and bytes per queued write
constexpr size_t kBounceCount = 3;          // one being filled while two are written
constexpr int kWriters = 2;                 // writes in flight (the disk's queue depth)
constexpr size_t kPiece = 1 << 20;          // checksum then write/read while still in cache
constexpr uint64_t kMaxOff = INT64_MAX;     // the largest off_t

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

// Reusable aligned bounce buffers per calling thread (no allocation per segment).
const std::vector<uint8_t*>& bounce_buffers() {
  struct Buffers {
    std::vector<uint8_t*> v;
    ~Buffers() {
      for (auto* p : v) std::free(p);
    }
  };
  thread_local Buffers bufs;
  while (bufs.v.size() < kBounceCount) {
    void* p = nullptr;
    if (posix_memalign(&p, kBlock, kBounceBytes) != 0) throw std::bad_alloc();
    bufs.v.push_back(static_cast<uint8_t*>(p));
  }
  return bufs.v;
}

// Streams items (sorted by offset, non-overlapping) to an O_DIRECT file through the write
// queue: aligned sources go straight from memory, everything else through a window
// [start_, start_ + len_) of the file held in a bounce buffer; partial blocks are
// zero-padded. While a buffer is on its way to the disk the next one is filled (and
// checksummed on the fly when a CRC is wanted).
class DirectWriter {
 public:
  explicit DirectWriter(WriteQueue& q) : q_(q) {}

  // Writes [src, src + n) at file offset off, extending *crc over it unless crc is null.
  void write(uint64_t off, const uint8_t* src, uint64_t n, uint32_t* crc) {
    if (active_ && off >= align_up(start_ + len_)) flush_tail();
    if (active_) {  // the item starts in the window's last block (so the window has a buffer)
      std::memset(buf_ + len_, 0, off - (start_ + len_));
      len_ = off - start_;
    } else {
      if (off % kBlock == 0 && reinterpret_cast<uintptr_t>(src) % kBlock == 0 && n >= kBlock) {
        const uint64_t direct = align_down(n);
        for (uint64_t done = 0; done < direct; done += kBounceBytes) {
          const uint64_t take = std::min<uint64_t>(kBounceBytes, direct - done);
          q_.submit(src + done, take, off + done, WriteQueue::kNoBuffer);
          if (crc) *crc = crc32c_extend(*crc, src + done, take);  // overlaps the write
        }
        end_ = std::max(end_, off + direct);
        off += direct, src += direct, n -= direct;
        if (n == 0) return;
      }
      start_ = align_down(off);
      len_ = off - start_;
      take_buffer();
      std::memset(buf_, 0, len_);
      active_ = true;
    }
    while (n) {
      if (buf_ == nullptr) take_buffer();
      const size_t take = std::min<uint64_t>(n, kBounceBytes - len_);
      if (crc) {
        *crc = crc32c_copy(*crc, buf_ + len_, src, take);
      } else {
        std::memcpy(buf_ + len_, src, take);
      }
      len_ += take, src += take, n -= take;
      if (len_ == kBounceBytes) {
        give_buffer(kBounceBytes);
        start_ += kBounceBytes;
        len_ = 0;
      }
    }
  }

  void flush_tail() {
    if (active_ && len_) {
      const uint64_t padded = align_up(len_);
      std::memset(buf_ + len_, 0, padded - len_);
      give_buffer(padded);
    }
    active_ = false;
    len_ = 0;
  }

  uint64_t end() const { return end_; }  // bytes of the file written so far (padded)

 private:
  void take_buffer() {
    cur_ = q_.acquire();
    buf_ = q_.buffer(cur_);
  }
  void give_buffer(uint64_t n) {
    const int b = cur_;
    cur_ = WriteQueue::kNoBuffer;
    buf_ = nullptr;
    q_.submit(q_.buffer(b), n, start_, b);
    end_ = std::max(end_, start_ + n);
  }

  WriteQueue& q_;
  int cur_ = WriteQueue::kNoBuffer;
  uint8_t* buf_ = nullptr;
  bool active_ = false;
  uint64_t start_ = 0, len_ = 0, end_ = 0;
};

const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "a special file";
}

constexpr const char* kLinkReason = "is a symbolic link (recoverkit never opens a file through a link)";
constexpr const char* kSpecialReason = "is a FIFO, socket or device, not a regular file";

// Opens (creating, mode 0644) a regular file to rewrite, never through a symlink, never
// blocking on a FIFO, never truncating anything but a regular file with no other name:
// the checks run on the open descriptor, then it is emptied.
int open_for_write(const std::string& path, bool direct, bool& is_direct) {
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY;
  is_direct = false;
  Fd fd;
  if (direct) {
    fd.fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
    if (fd.fd >= 0) {
      is_direct = true;
    } else if (errno != EINVAL) {
      const int err = errno;
      if (err != ELOOP && err != ENXIO) throw_os(err, path, "open");
    }
  }
  if (fd.fd < 0) fd.fd = ::open(path.c_str(), flags, 0644);
  if (fd.fd < 0) {
    const int err = errno;
    if (err == ELOOP) throw OsError(err, path, "open " + path + ": " + kLinkReason, kLinkReason);
    if (err == ENXIO) throw OsError(err, path, "open " + path + ": " + kSpecialReason, kSpecialReason);
    throw_os(err, path, "open");
  }
  struct stat st;
  if (::fstat(fd.fd, &st) != 0) throw_os(errno, path, "fstat");
  if (!S_ISREG(st.st_mode)) {
    const std::string why = std::string("is ") + file_kind(st.st_mode) + ", not a regular file";
    throw OsError(EINVAL, path, "open " + path + ": " + why, why);
  }
  if (st.st_nlink > 1) {
    const std::string why = "has " + std::to_string(st.st_nlink) +
                            " hard links; refusing to rewrite a file that other names share";
    throw OsError(EMLINK, path, "open " + path + ": " + why, why);
  }
  const int fl = ::fcntl(fd.fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd.fd, F_SETFL, fl & ~O_NONBLOCK) != 0) throw_os(errno, path, "fcntl");
  if (st.st_size != 0) {
    int rc;
    do rc = ::ftruncate(fd.fd, 0);
    while (rc != 0 && errno == EINTR);
    if (rc != 0) throw_os(errno, path, "ftruncate");
  }
  const int out = fd.fd;
  fd.fd = -1;
  return out;
}

// Opens a segment file to read: a symlink, a FIFO, a device or anything else that is not a
// regular file is a damaged checkpoint (IntegrityFailure), and nothing blocks.
int open_for_read(const std::string& path, uint64_t& size) {
  Fd fd;
  fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
  if (fd.fd < 0) {
    const int err = errno;
    if (err == ELOOP) throw IntegrityFailure(path, path + " " + kLinkReason);
    if (err == ENXIO) throw IntegrityFailure(path, path + " " + kSpecialReason);
    throw_os(err, path, "open");
  }
  struct stat st;
  if (::fstat(fd.fd, &st) != 0) throw_os(errno, path, "fstat");
  if (!S_ISREG(st.st_mode))
    throw IntegrityFailure(path, path + " is " + file_kind(st.st_mode) + ", not a regular file");
  size = static_cast<uint64_t>(st.st_size);
  const int out = fd.fd;
  fd.fd = -1;
  return out;
}

}  // namespace

std::vector<uint32_t> write_segment(const std::string& path, const std::vector<WriteItem>& items,
                                    bool direct, bool fsync_file, bool want_crc) {
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); i++) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return items[a].file_offset < items[b].file_offset;
  });
  uint64_t size = 0, prev_end = 0;
  std::vector<MemRange> sources;
  sources.reserve(items.size());
  for (size_t i : order) {
    const auto& it = items[i];
    if (it.file_offset > kMaxOff || it.nbytes > kMaxOff - it.file_offset)
      throw std::overflow_error("segment item [" + std::to_string(it.file_offset) + ", +" +
                                std::to_string(it.nbytes) + ") ends past the largest file offset");
    if (it.nbytes && it.src == nullptr) throw InvalidArgument("segment item with a null src_ptr");
    if (it.nbytes && it.file_offset < prev_end)
      throw InvalidArgument("segment items overlap at file offset " + std::to_string(it.file_offset));
    if (it.nbytes) {
      prev_end = it.file_offset + it.nbytes;
      sources.push_back({reinterpret_cast<uintptr_t>(it.src), it.nbytes});
    }
    size = std::max<uint64_t>(size, it.file_offset + it.nbytes);
  }
  check_mapped(sources, ("write_segment " + path + ": src_ptr").c_str());

  std::vector<uint32_t> crcs(want_crc ? items.size() : 0, 0);
  bool is_direct = false;
  Fd fd;
  fd.fd = open_for_write(path, direct, is_direct);
  uint64_t written_end = 0;
  if (is_direct) {
    WriteQueue queue(fd.fd, path, bounce_buffers(), kWriters);  // joined before fd closes
    DirectWriter w(queue);
    for (size_t i : order) {
      const auto& it = items[i];
      if (it.nbytes)
        w.write(it.file_offset, static_cast<const uint8_t*>(it.src), it.nbytes,
                want_crc ? &crcs[i] : nullptr);
    }
    w.flush_tail();
    queue.drain();
    written_end = w.end();
  } else {
    for (size_t i = 0; i < items.size(); i++) {  // in the caller's order: sequential for sorted layouts
      const auto& it = items[i];
      if (!it.nbytes) continue;
      const auto* src = static_cast<const uint8_t*>(it.src);
      if (!want_crc) {
        pwrite_all(fd.fd, src, it.nbytes, it.file_offset, path);
      } else {
        for (uint64_t done = 0; done < it.nbytes; done += kPiece) {
          const uint64_t take = std::min<uint64_t>(kPiece, it.nbytes - done);
          // The kernel reads the piece first (EFAULT, not a signal, for an unreadable
          // source); the checksum then reads it from the cache.
          pwrite_all(fd.fd, src + done, take, it.file_offset + done, path);
          crcs[i] = crc32c_extend(crcs[i], src + done, take);
        }
      }
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
  return crcs;
}

std::vector<uint32_t> read_segment(const std::string& path, const std::vector<ReadItem>& items) {
  std::vector<MemRange> dsts;
  dsts.reserve(items.size());
  for (const auto& it : items) {
    if (it.file_offset > kMaxOff || it.nbytes > kMaxOff)
      throw std::overflow_error("segment item [" + std::to_string(it.file_offset) + ", +" +
                                std::to_string(it.nbytes) + ") is past the largest file offset");
    if (it.nbytes && it.dst == nullptr) throw InvalidArgument("segment item with a null dst_ptr");
    if (it.nbytes) dsts.push_back({reinterpret_cast<uintptr_t>(it.dst), it.nbytes});
  }
  Fd fd;
  uint64_t size = 0;
  fd.fd = open_for_read(path, size);
  auto truncated = [&](const ReadItem& it, uint64_t have) {
    return IntegrityFailure(path, "truncated: " + path + " has " + std::to_string(have) +
                                      " bytes, item needs [" + std::to_string(it.file_offset) +
                                      ", " + std::to_string(it.file_offset + it.nbytes) + ")");
  };
  for (const auto& it : items) {  // every region inside the file before any byte is read
    if (it.nbytes > size || it.file_offset > size - it.nbytes) throw truncated(it, size);
  }
  check_mapped(dsts, ("read_segment " + path + ": dst_ptr").c_str());
  ::posix_fadvise(fd.fd, 0, 0, POSIX_FADV_SEQUENTIAL);

  std::vector<uint32_t> crcs;
  crcs.reserve(items.size());
  for (const auto& it : items) {
    auto* dst = static_cast<uint8_t*>(it.dst);
    uint32_t crc = 0;
    uint64_t done = 0;
    while (done < it.nbytes) {
      const size_t want = std::min<uint64_t>(kPiece, it.nbytes - done);
      const ssize_t r = ::pread(fd.fd, dst + done, want, static_cast<off_t>(it.file_offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw_os(errno, path, "pread");
      }
      if (r == 0) throw truncated(it, it.file_offset + done);  // shrank while reading
      crc = crc32c_extend(crc, dst + done, static_cast<size_t>(r));
      done += static_cast<uint64_t>(r);
    }
    if (crc != it.expected_crc) {
      char msg[160];
      std::snprintf(msg, sizeof msg, " at offset %" PRIu64 " (%" PRIu64 " bytes): expected 0x%08x, found 0x%08x",
                    it.file_offset, it.nbytes, it.expected_crc, crc);
      throw IntegrityFailure(path, "crc32c mismatch in " + path + msg);
    }
    crcs.push_back(crc);
  }
  fd.close_checked(path);
  return crcs;
}

}  // namespace recoverkit
