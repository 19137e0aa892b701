#include "core/thread_pool.hpp"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#define MF_PAUSE() _mm_pause()
#else
#define MF_PAUSE() std::this_thread::yield()
#endif

namespace moeflux {
namespace {

constexpr auto spin_time = std::chrono::microseconds(50);

// Spins until ready() or spin_time has passed; returns ready().
template <typename Ready>
bool spin_until(Ready&& ready) {
  const auto deadline = std::chrono::steady_clock::now() + spin_time;
  for (int i = 1;; ++i) {
    if (ready()) return true;
    MF_PAUSE();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) return ready();
  }
}

uint32_t generation_of(uint64_t state) { return uint32_t(state >> 32); }

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_tasks(uint32_t gen) {
  for (;;) {
    uint64_t st = state_.load(std::memory_order_acquire);
    if (generation_of(st) != gen) return;
    const uint64_t task = st & closed;
    if (task == closed) {  // the caller is still writing this loop's fn_ and n_tasks_
      MF_PAUSE();
      continue;
    }
    // Read before the claim: if they belong to a later loop, state_ has moved on and the CAS fails.
    const int64_t n_tasks = n_tasks_.load(std::memory_order_acquire);
    const auto* fn = fn_.load(std::memory_order_acquire);
    if (int64_t(task) >= n_tasks) return;
    if (!state_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) continue;
    (*fn)(int64_t(task));
    if (done_.fetch_add(1) + 1 == n_tasks && caller_sleeping_.load()) {
      std::lock_guard<std::mutex> lock(mutex_);
      finished_.notify_one();
    }
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  // seq_cst loads: paired with the caller's store of state_ and load of sleeping_workers_.
  auto next = [&] { return stop_.load() || generation_of(state_.load()) != seen; };
  for (;;) {
    if (!spin_until(next)) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping_workers_.fetch_add(1);
      wake_.wait(lock, next);
      sleeping_workers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = generation_of(state_.load(std::memory_order_acquire));
    run_tasks(seen);
  }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  if (workers_.empty() || n_tasks == 1 || n_tasks >= int64_t(closed)) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  // Every task of the previous loop is done, so no claim can succeed until state_ opens below.
  const uint32_t gen = generation_of(state_.load(std::memory_order_relaxed)) + 1;
  state_.store(uint64_t(gen) << 32 | closed);
  fn_.store(&fn, std::memory_order_release);
  n_tasks_.store(n_tasks, std::memory_order_release);
  done_.store(0);
  state_.store(uint64_t(gen) << 32);
  if (sleeping_workers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  run_tasks(gen);
  auto all_done = [&] { return done_.load() == n_tasks; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(mutex_);
    caller_sleeping_.store(true);
    finished_.wait(lock, all_done);
    caller_sleeping_.store(false);
  }
}

void ThreadPool::parallel_range(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  // A few chunks per thread balance uneven progress without many tiny tasks.
  int64_t n_chunks = std::min<int64_t>((n + min_chunk - 1) / min_chunk, int64_t(size()) * 4);
  n_chunks = std::max<int64_t>(1, n_chunks);
  const int64_t chunk = (n + n_chunks - 1) / n_chunks;
  parallel_for((n + chunk - 1) / chunk, [&](int64_t c) {
    const int64_t begin = c * chunk;
    fn(begin, std::min(n, begin + chunk));
  });
}

}  // namespace moeflux
