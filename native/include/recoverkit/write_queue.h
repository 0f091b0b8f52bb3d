// Background pwrites for one file: the producer (segment_io's writer) fills aligned bounce
// buffers or names aligned source memory, and hands each range to a few writer threads,
// so copying and checksumming the next range overlaps the disk write of this one, and a
// device that gains from a deeper queue gets more than one write in flight.
//
// Call order (one producer thread): acquire() a buffer, fill it, submit(... buffer) it;
// submit(... no buffer) ranges that stay valid until drain(); drain() before fsync. The
// first failed write is rethrown (as the OsError pwrite raised) by the next acquire(),
// submit() or drain(); later writes are skipped. The destructor waits for writes in
// flight and joins the threads, so the buffers and sources are free once it returns.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace recoverkit {

class WriteQueue {
 public:
  static constexpr int kNoBuffer = -1;

  // buffers: the bounce buffers (each buffer_bytes, aligned) this queue hands out.
  WriteQueue(int fd, const std::string& path, const std::vector<uint8_t*>& buffers,
             int num_threads);
  ~WriteQueue();
  WriteQueue(const WriteQueue&) = delete;
  WriteQueue& operator=(const WriteQueue&) = delete;

  // Index of a free bounce buffer, waiting while every buffer is being written.
  int acquire();
  uint8_t* buffer(int index) const { return buffers_[static_cast<size_t>(index)]; }
  // Queues pwrite(fd, p, n, off); `buffer` (or kNoBuffer) is freed once it is written.
  void submit(const uint8_t* p, uint64_t n, uint64_t off, int buffer);
  // Waits for every queued write; rethrows the first failure.
  void drain();

 private:
  struct Write {
    const uint8_t* p;
    uint64_t n, off;
    int buffer;
  };
  void worker();
  void rethrow_locked();  // caller holds mu_

  const int fd_;
  const std::string path_;
  const std::vector<uint8_t*> buffers_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Write> queue_;
  std::vector<int> free_;
  size_t in_flight_ = 0;  // queued + being written
  bool stop_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

// pwrite until all n bytes are written, retrying EINTR and short writes; an O_DIRECT write
// the file system refuses (EINVAL) switches the file to buffered writes and goes on.
// Throws OsError(errno, path).
void pwrite_all(int fd, const uint8_t* p, uint64_t n, uint64_t off, const std::string& path);

}  // namespace recoverkit
