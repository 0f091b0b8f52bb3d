// Writer threads behind segment writes (see write_queue.h).

#include "recoverkit/write_queue.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "recoverkit/errors.h"

namespace recoverkit {
namespace {

constexpr size_t kMaxIo = size_t{1} << 30;  // bytes per pwrite call

}  // namespace

void pwrite_all(int fd, const uint8_t* p, uint64_t n, uint64_t off, const std::string& path) {
  bool retried_buffered = false;
  while (n) {
    const ssize_t w = ::pwrite(fd, p, std::min<uint64_t>(n, kMaxIo), static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && !retried_buffered) {
        // The file system refused an O_DIRECT write: finish the file buffered. Another
        // writer thread may have cleared O_DIRECT already, so retry once either way; a
        // buffered write that fails with EINVAL again is a real error.
        retried_buffered = true;
        const int flags = fcntl(fd, F_GETFL);
        if (flags >= 0 && (!(flags & O_DIRECT) || fcntl(fd, F_SETFL, flags & ~O_DIRECT) == 0)) continue;
        errno = EINVAL;
      }
      const int err = errno;
      throw OsError(err, path, "pwrite " + path + ": " + std::strerror(err));
    }
    if (w == 0) throw OsError(EIO, path, "pwrite made no progress on " + path);
    p += w;
    n -= static_cast<uint64_t>(w);
    off += static_cast<uint64_t>(w);
  }
}

WriteQueue::WriteQueue(int fd, const std::string& path, const std::vector<uint8_t*>& buffers,
                       int num_threads)
    : fd_(fd), path_(path), buffers_(buffers) {
  for (size_t i = buffers_.size(); i-- > 0;) free_.push_back(static_cast<int>(i));
  try {
    for (int i = 0; i < std::max(1, num_threads); i++) threads_.emplace_back([this] { worker(); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
    throw;
  }
}

WriteQueue::~WriteQueue() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return in_flight_ == 0; });
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void WriteQueue::rethrow_locked() {
  if (error_) std::rethrow_exception(error_);
}

int WriteQueue::acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return !free_.empty() || error_; });
  rethrow_locked();
  const int b = free_.back();
  free_.pop_back();
  return b;
}

void WriteQueue::submit(const uint8_t* p, uint64_t n, uint64_t off, int buffer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_) {
      if (buffer != kNoBuffer) free_.push_back(buffer);
      rethrow_locked();
    }
    queue_.push_back({p, n, off, buffer});
    in_flight_++;
  }
  work_cv_.notify_one();
}

void WriteQueue::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return in_flight_ == 0; });
  rethrow_locked();
}

void WriteQueue::worker() {
  for (;;) {
    Write w;
    bool skip;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      w = queue_.front();
      queue_.pop_front();
      skip = static_cast<bool>(error_);
    }
    std::exception_ptr err;
    if (!skip) {
      try {
        pwrite_all(fd_, w.p, w.n, w.off, path_);
      } catch (...) {
        err = std::current_exception();
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (err && !error_) error_ = err;
      if (w.buffer != kNoBuffer) free_.push_back(w.buffer);
      in_flight_--;
    }
    done_cv_.notify_all();
  }
}

}  // namespace recoverkit
