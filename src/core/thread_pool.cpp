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

constexpr uint64_t max_tasks = 0xffffffffu;

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
  slots_ = std::vector<Line>(size_t(n_threads));
  done_ = std::vector<Line>(size_t(n_threads));
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_tasks(int self) {
  const int n = size();
  uint64_t finished = done_[size_t(self)].value.load(std::memory_order_relaxed);
  for (int k = 0; k < n; ++k) {
    std::atomic<uint64_t>& slot = slots_[size_t((self + k) % n)].value;
    uint64_t range = slot.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = range & max_tasks;
      if (next >= range >> 32) break;
      if (!slot.compare_exchange_weak(range, range + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // The loop of this task is not finished until we report it, so fn_ is still its function.
      (*fn_.load(std::memory_order_acquire))(int64_t(next));
      // seq_cst store, then load: paired with the caller's store of caller_sleeping_ and load of done_.
      done_[size_t(self)].value.store(++finished);
      if (caller_sleeping_.load()) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_one();
      }
      range = slot.load(std::memory_order_acquire);
    }
  }
}

void ThreadPool::worker_loop(int self) {
  uint64_t seen = 0;
  // seq_cst loads: paired with the caller's store of generation_ and load of sleeping_workers_.
  auto next = [&] { return stop_.load() || generation_.load() != seen; };
  for (;;) {
    if (!spin_until(next)) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping_workers_.fetch_add(1);
      wake_.wait(lock, next);
      sleeping_workers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    run_tasks(self);
  }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  if (workers_.empty() || n_tasks == 1 || uint64_t(n_tasks) >= max_tasks) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  // Every slot is empty (the previous loop's tasks were all claimed), so no claim can succeed until a
  // slot is dealt below, and its release store publishes fn_.
  fn_.store(&fn, std::memory_order_relaxed);
  const uint64_t n = uint64_t(n_tasks), p = uint64_t(size());
  const uint64_t base = n / p, extra = n % p;  // the first `extra` participants get one task more
  for (uint64_t i = 0; i < p; ++i) {
    const uint64_t begin = i * base + std::min(i, extra);
    const uint64_t end = begin + base + (i < extra ? 1 : 0);
    slots_[size_t(i)].value.store(end << 32 | begin, std::memory_order_release);
  }
  target_ += n;
  generation_.fetch_add(1);
  if (sleeping_workers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  run_tasks(0);
  auto all_done = [&] {
    uint64_t sum = 0;
    for (const Line& d : done_) sum += d.value.load();
    return sum == target_;
  };
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
