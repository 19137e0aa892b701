// A fixed pool of compute threads for data-parallel loops (one pool per backend, never global).
// The caller takes part in every loop and may run every task itself: each participant (the caller and
// every worker) is dealt a contiguous share of the tasks and claims them one by one from its own slot,
// then takes what is left in the others' slots, so a worker that the OS has descheduled delays a loop
// only by the task it is running. Each participant's slot and finished-task count sit on cache lines of
// their own, so a loop costs a handful of line transfers per thread, not a contended counter per task.
// Waiting (workers for the next loop, the caller for the last running task) spins for ~50 µs, so the
// many small loops of a decode step do not each pay a wake-up, then sleeps on a condition variable, so
// a busy machine's cores go to whoever can use them; a loop notifies only when someone sleeps.
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
  // 128 bytes: a cache line and the neighbour the adjacent-line prefetcher pulls with it.
  struct alignas(128) Line {
    std::atomic<uint64_t> value{0};
  };

  void worker_loop(int self);
  // Claims and runs tasks, from slot `self` first, then from the others, until every slot is empty.
  void run_tasks(int self);

  std::vector<std::thread> workers_;
  // slots_[p] = (end << 32) | next: participant p's unclaimed tasks [next, end) of the current loop
  // (p = 0 the caller, p = i + 1 worker i). A claim is a CAS of next + 1, so a claim always takes a task
  // of the loop whose range the slot holds; a stale claimer's CAS fails. Between loops every slot is
  // empty (each task was claimed), so nothing can be claimed while the caller writes the next loop.
  std::vector<Line> slots_;
  // done_[p]: tasks participant p has finished, over all loops (written by p only).
  std::vector<Line> done_;
  uint64_t target_ = 0;  // Σ done_ once the current loop is finished (the caller's)
  alignas(128) std::atomic<uint64_t> generation_{0};  // loops started; workers wait for it to move
  std::atomic<bool> stop_{false};
  alignas(128) std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  // Sleeping: workers wait on wake_ for a new generation, the caller on finished_ for Σ done_ == target_.
  alignas(128) std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::atomic<int> sleeping_workers_{0};
  std::atomic<bool> caller_sleeping_{false};
};

}  // namespace moeflux
