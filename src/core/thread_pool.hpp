// A fixed pool of compute threads for data-parallel loops (one pool per backend, never global).
// The caller takes part in every loop and may run every task itself: a task is claimed by whoever gets
// to it first, so a worker that the OS has descheduled delays a loop only by the task it is running.
// Waiting (workers for the next loop, the caller for the last running task) spins for ~50 µs, so the
// many small loops of a decode step do not each pay a wake-up, then sleeps on a condition variable, so
// a busy machine's cores go to whoever can use them.
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
  // Claims and runs tasks of loop `gen` until none is left or another loop has started.
  void run_tasks(uint32_t gen);

  std::vector<std::thread> workers_;
  // state_ = (loop generation << 32) | next unclaimed task; the low half is `closed` while the caller
  // writes the next loop's fn_ and n_tasks_, so a claim (a CAS on state_) never pairs one loop's task
  // index with another loop's function.
  static constexpr uint64_t closed = 0xffffffffu;
  std::atomic<uint64_t> state_{closed};
  std::atomic<int64_t> n_tasks_{0};
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> done_{0};  // tasks of the current loop finished
  std::atomic<bool> stop_{false};
  // Sleeping: workers wait on wake_ for a new generation, the caller on finished_ for done_ == n_tasks_.
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::atomic<int> sleeping_workers_{0};
  std::atomic<bool> caller_sleeping_{false};
};

}  // namespace moeflux
