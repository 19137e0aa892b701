// A fixed pool of compute threads for data-parallel loops (one pool per backend, never global).
// The caller takes part in every loop; workers spin briefly before sleeping so that the many
// small loops of a decode step do not each pay a wake-up.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moeflux {

class ThreadPool {
 public:
  // n_threads counts the caller; 0 means every hardware thread.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Calls fn(task) for task in [0, n_tasks), spread over the pool; returns when all are done.
  // Tasks must not call parallel_for on the same pool.
  void parallel_for(int64_t n_tasks, const std::function<void(int64_t task)>& fn);

  // Splits [0, n) into contiguous chunks of at least min_chunk and calls fn(begin, end) per chunk.
  void parallel_range(int64_t n, int64_t min_chunk, const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  void worker_loop();
  void run_tasks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_task_{0};
  std::atomic<int> active_{0};
  int64_t n_tasks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  bool stop_ = false;
};

}  // namespace moeflux
