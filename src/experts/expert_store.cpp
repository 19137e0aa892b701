// The host expert store: reader threads doing one aligned pread per expert, a free list of 4 KiB
// aligned blob buffers, and a byte-budgeted cache under a CachePolicy, all behind one mutex.
// Owns: layer file descriptors, buffers, cache entries, telemetry. Does not own the pack (only paths).
#include <fcntl.h>
#include <unistd.h>

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <xxhash.h>

#include "core/aligned_buffer.hpp"
#include "core/timer.hpp"
#include "experts/expert_store.hpp"

namespace moeflux {
namespace {

// O_DIRECT wants buffer, offset and length aligned to the device's logical block; 4096 covers every
// block size in use, and the pack's stride is a multiple of it.
constexpr uint64_t io_alignment = 4096;

// See max_acquire() in the header.
constexpr int max_experts_per_acquire = 256;

// Spare buffers kept on the free list for reuse. A decode step holds K ≤ 16 experts of one layer and
// prefetches as many for the next; 32 covers both so steady state never allocates. A prefill working
// set beyond this returns its extra buffers to the allocator at release.
constexpr size_t max_spare_buffers = 32;

std::string errno_text(int err) { return std::strerror(err); }

class HostExpertStore final : public ExpertStore {
 public:
  HostExpertStore(ExpertSource source, ExpertStoreOptions options, std::unique_ptr<CachePolicy> policy)
      : source_(std::move(source)), options_(std::move(options)), policy_(std::move(policy)) {
    read_bytes_ = align_up(source_.expert_bytes, io_alignment);
    direct_active_ = options_.io_mode == IoMode::direct;
  }

  ~HostExpertStore() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      jobs_.clear();
    }
    jobs_ready_.notify_all();
    for (auto& t : readers_) t.join();
    for (auto& [key, entry] : entries_) {
      MF_CHECK_MSG(entry->pins == 0, "expert store destroyed while layer {} expert {} is acquired", entry->layer,
                   entry->expert);
      free_buffer(entry->buffer);
    }
    for (uint8_t* b : free_buffers_) free_buffer(b);
    for (auto& f : files_) {
      if (f.fd_direct >= 0) ::close(f.fd_direct);
      if (f.fd_buffered >= 0) ::close(f.fd_buffered);
    }
  }

  Status open_files() {
    int max_layer = -1;
    for (const auto& l : source_.layers) max_layer = std::max(max_layer, l.layer);
    file_of_layer_.assign(size_t(max_layer + 1), -1);
    // The last blob need not be padded to the stride: the file must reach its meaningful bytes.
    const uint64_t min_file_bytes = uint64_t(source_.n_expert - 1) * source_.expert_stride + source_.expert_bytes;
    for (const auto& l : source_.layers) {
      if (l.layer < 0) return make_error(ErrorCode::invalid_argument, "expert layer file {}: layer {} is negative", l.path, l.layer);
      if (file_of_layer_[size_t(l.layer)] >= 0)
        return make_error(ErrorCode::format, "expert layer {}: listed twice ({} and {})", l.layer,
                          files_[size_t(file_of_layer_[size_t(l.layer)])].path, l.path);
      if (options_.verify_hashes && int64_t(l.hashes.size()) != source_.n_expert)
        return make_error(ErrorCode::format, "expert layer {} ({}): {} hashes, expected {} (one per expert)", l.layer,
                          l.path, l.hashes.size(), source_.n_expert);
      LayerFile f;
      f.layer = l.layer;
      f.path = l.path;
      f.hashes = l.hashes;
      f.fd_buffered = ::open(l.path.c_str(), O_RDONLY | O_CLOEXEC);
      if (f.fd_buffered < 0) {
        return make_error(ErrorCode::io, "expert layer {}: cannot open {}: {}", l.layer, l.path, errno_text(errno));
      }
      files_.push_back(f);  // owned from here on, so the destructor closes it on any later error
      file_of_layer_[size_t(l.layer)] = int(files_.size() - 1);
      LayerFile& owned = files_.back();
      struct stat st {};
      if (::fstat(owned.fd_buffered, &st) != 0)
        return make_error(ErrorCode::io, "expert layer {}: cannot stat {}: {}", l.layer, l.path, errno_text(errno));
      if (uint64_t(st.st_size) < min_file_bytes)
        return make_error(ErrorCode::format,
                          "expert layer {} file {}: {} bytes, expected at least {} ({} experts at stride {}, {} bytes each)",
                          l.layer, l.path, uint64_t(st.st_size), min_file_bytes, source_.n_expert,
                          source_.expert_stride, source_.expert_bytes);
      // Every read is one whole expert at a random place: read-ahead past it would be wasted bandwidth.
      ::posix_fadvise(owned.fd_buffered, 0, 0, POSIX_FADV_RANDOM);
      if (direct_active_) {
        owned.fd_direct = ::open(l.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (owned.fd_direct < 0) {
          if (errno != EINVAL)
            return make_error(ErrorCode::io, "expert layer {}: cannot open {} with O_DIRECT: {}", l.layer, l.path,
                              errno_text(errno));
          fall_back_to_page_cache(l.path);
        }
      }
    }
    return Status::ok();
  }

  void start_readers() {
    for (int i = 0; i < options_.n_readers; ++i) readers_.emplace_back([this] { reader_loop(); });
  }

  Status acquire(int layer, const int32_t* experts, int n, const void** blobs) override {
    if (n < 0 || n > max_experts_per_acquire)
      return make_error(ErrorCode::invalid_argument, "acquire of {} experts of layer {}: expected 0 to {}", n, layer,
                        max_experts_per_acquire);
    MF_TRY(validate(layer, experts, n));
    std::vector<std::shared_ptr<Entry>> held;  // [n], pinned
    held.reserve(size_t(n));
    std::unique_lock lock(mutex_);
    // Issue every missing read before waiting on any, so the reads of one layer run in parallel.
    Status status;
    for (int i = 0; i < n; ++i) {
      const uint64_t key = expert_key(layer, experts[i]);
      auto it = entries_.find(key);
      if (it != entries_.end()) {
        Entry& e = *it->second;
        ++e.pins;
        ++stats_.hits;
        policy_->on_hit(key);
        held.push_back(it->second);
        continue;
      }
      make_room_locked(1);
      auto entry = start_read_locked(layer, experts[i]);
      if (!entry) {
        status = make_error(ErrorCode::out_of_memory, "layer {} expert {}: cannot allocate a {}-byte blob buffer",
                            layer, experts[i], read_bytes_);
        break;
      }
      entry->pins = 1;
      ++stats_.misses;
      held.push_back(std::move(entry));
    }
    jobs_ready_.notify_all();
    if (status.is_ok()) {
      const auto all_done = [&] {
        return std::all_of(held.begin(), held.end(), [](const auto& e) { return e->state != Entry::State::loading; });
      };
      if (!all_done()) {
        const Timer waited;
        done_.wait(lock, all_done);
        stats_.wait_seconds += waited.seconds();
      }
      for (const auto& e : held) {
        if (e->state == Entry::State::failed) {
          status = e->error;
          break;
        }
      }
    }
    if (!status.is_ok()) {
      for (const auto& e : held) unpin_locked(*e);
      evict_to_budget_locked();
      return status;
    }
    for (int i = 0; i < n; ++i) blobs[i] = held[size_t(i)]->buffer;
    return Status::ok();
  }

  void release(int layer, const int32_t* experts, int n) override {
    std::lock_guard lock(mutex_);
    for (int i = 0; i < n; ++i) {
      const auto it = entries_.find(expert_key(layer, experts[i]));
      MF_CHECK_MSG(it != entries_.end() && it->second->pins > 0, "release of layer {} expert {} that is not acquired",
                   layer, experts[i]);
      unpin_locked(*it->second);
    }
    evict_to_budget_locked();
  }

  void prefetch(int layer, const int32_t* experts, int n) override {
    if (n <= 0 || !validate(layer, experts, n).is_ok()) return;  // acquire reports bad ids
    std::lock_guard lock(mutex_);
    bool started = false;
    for (int i = 0; i < n; ++i) {
      if (entries_.contains(expert_key(layer, experts[i]))) continue;
      if (!make_room_locked(1)) break;  // the budget is full of experts in use or being read
      if (!start_read_locked(layer, experts[i])) break;
      ++stats_.prefetches;
      started = true;
    }
    if (started) jobs_ready_.notify_all();
  }

  int max_acquire() const override { return max_experts_per_acquire; }

  ExpertStoreStats stats() const override {
    std::lock_guard lock(mutex_);
    return stats_;
  }

  void reset_stats() override {
    std::lock_guard lock(mutex_);
    ExpertStoreStats fresh;
    fresh.cached_experts = stats_.cached_experts;
    fresh.cached_bytes = stats_.cached_bytes;
    fresh.buffer_bytes = stats_.buffer_bytes;
    stats_ = fresh;
  }

  const ExpertStoreOptions& options() const override { return options_; }

 private:
  struct LayerFile {
    int layer = 0;
    std::string path;
    std::vector<uint64_t> hashes;  // [n_expert] or empty
    int fd_direct = -1;            // O_DIRECT descriptor, -1 when not in direct mode
    int fd_buffered = -1;
  };

  // One expert of one layer: being read, ready, or failed (then already out of entries_ and kept alive
  // only by the acquires waiting on it, which report its error).
  struct Entry {
    enum class State : uint8_t { loading, ready, failed };
    int layer = 0;
    int32_t expert = 0;
    State state = State::loading;
    uint8_t* buffer = nullptr;  // [read_bytes_] 4 KiB aligned; blob in the first expert_bytes
    int pins = 0;               // acquires not yet released
    Status error;               // when failed
  };

  Status validate(int layer, const int32_t* experts, int n) const {
    if (layer < 0 || size_t(layer) >= file_of_layer_.size() || file_of_layer_[size_t(layer)] < 0)
      return make_error(ErrorCode::invalid_argument, "expert layer {}: not an expert layer of this model", layer);
    for (int i = 0; i < n; ++i) {
      if (experts[i] < 0 || experts[i] >= source_.n_expert)
        return make_error(ErrorCode::invalid_argument, "layer {}: expert id {} out of range [0, {})", layer, experts[i],
                          source_.n_expert);
    }
    return Status::ok();
  }

  // Creates a loading entry, counts it in the cache and queues its read. Null when no buffer can be had.
  std::shared_ptr<Entry> start_read_locked(int layer, int32_t expert) {
    uint8_t* buffer = take_buffer_locked();
    if (!buffer) return nullptr;
    auto entry = std::make_shared<Entry>();
    entry->layer = layer;
    entry->expert = expert;
    entry->buffer = buffer;
    const uint64_t key = expert_key(layer, expert);
    entries_.emplace(key, entry);
    policy_->on_insert(key);
    ++stats_.cached_experts;
    stats_.cached_bytes += source_.expert_stride;
    jobs_.push_back(entry);
    return entry;
  }

  void unpin_locked(Entry& e) {
    MF_CHECK(e.pins > 0);
    --e.pins;
  }

  bool evictable_locked(uint64_t key) const {
    const auto it = entries_.find(key);
    MF_CHECK(it != entries_.end());
    return it->second->pins == 0 && it->second->state == Entry::State::ready;
  }

  // Evicts unpinned ready entries until `extra` more experts fit in the budget; false when they do not.
  bool make_room_locked(uint64_t extra) {
    const uint64_t need = extra * source_.expert_stride;
    while (stats_.cached_bytes + need > options_.cache_bytes) {
      if (!evict_one_locked()) return false;
    }
    return true;
  }

  void evict_to_budget_locked() {
    while (stats_.cached_bytes > options_.cache_bytes) {
      if (!evict_one_locked()) return;
    }
  }

  bool evict_one_locked() {
    uint64_t key = 0;
    if (!policy_->choose_victim([this](uint64_t k) { return evictable_locked(k); }, &key)) return false;
    ++stats_.evictions;
    erase_locked(key);
    return true;
  }

  void erase_locked(uint64_t key) {
    const auto it = entries_.find(key);
    MF_CHECK(it != entries_.end());
    policy_->on_erase(key);
    --stats_.cached_experts;
    stats_.cached_bytes -= source_.expert_stride;
    give_back_buffer_locked(it->second->buffer);
    it->second->buffer = nullptr;
    entries_.erase(it);
  }

  uint8_t* take_buffer_locked() {
    if (!free_buffers_.empty()) {
      uint8_t* b = free_buffers_.back();
      free_buffers_.pop_back();
      return b;
    }
    void* p = nullptr;
    if (options_.allocator) {
      p = options_.allocator->allocate(read_bytes_);
      if (!p) return nullptr;
    } else if (posix_memalign(&p, io_alignment, read_bytes_) != 0) {
      return nullptr;
    }
    stats_.buffer_bytes += read_bytes_;
    return static_cast<uint8_t*>(p);
  }

  void give_back_buffer_locked(uint8_t* b) {
    if (free_buffers_.size() < max_spare_buffers) {
      free_buffers_.push_back(b);
      return;
    }
    stats_.buffer_bytes -= read_bytes_;
    free_buffer(b);
  }

  void free_buffer(uint8_t* b) {
    if (options_.allocator) options_.allocator->deallocate(b);
    else std::free(b);
  }

  void fall_back_to_page_cache(const std::string& path) {
    bool expected = true;
    if (direct_active_.compare_exchange_strong(expected, false))
      std::fprintf(stderr, "moeflux: expert store: %s refuses O_DIRECT (EINVAL); reading experts through the page cache\n",
                   path.c_str());
  }

  void reader_loop() {
    std::unique_lock lock(mutex_);
    for (;;) {
      jobs_ready_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) return;
      std::shared_ptr<Entry> entry = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      uint64_t bytes_done = 0;
      Status status = read_blob(*entry, &bytes_done);
      lock.lock();
      ++stats_.reads;
      stats_.bytes_read += bytes_done;
      if (status.is_ok()) {
        entry->state = Entry::State::ready;
      } else {
        entry->state = Entry::State::failed;
        entry->error = std::move(status);
        // Out of the cache now, so a later acquire retries the read rather than inheriting this error.
        erase_locked(expert_key(entry->layer, entry->expert));
      }
      // A prefetch nobody acquired may have pushed an over-budget cache (acquires elsewhere shrank room).
      evict_to_budget_locked();
      done_.notify_all();
    }
  }

  // Reads one blob into entry.buffer; touches no shared state except the one-way direct→buffered switch.
  Status read_blob(const Entry& entry, uint64_t* bytes_done) {
    const LayerFile& f = files_[size_t(file_of_layer_[size_t(entry.layer)])];
    const uint64_t offset = uint64_t(entry.expert) * source_.expert_stride;
    bool direct = f.fd_direct >= 0 && direct_active_.load(std::memory_order_relaxed);
    uint64_t done = 0;
    while (done < read_bytes_) {
      const ssize_t r = ::pread(direct ? f.fd_direct : f.fd_buffered, entry.buffer + done, read_bytes_ - done,
                                off_t(offset + done));
      if (r < 0) {
        const int err = errno;
        if (err == EINTR) continue;
        if (err == EINVAL && direct && done == 0) {
          fall_back_to_page_cache(f.path);
          direct = false;
          continue;
        }
        *bytes_done = done;
        return make_error(ErrorCode::io, "{}: layer {} expert {}: read at offset {} failed after {} of {} bytes: {}",
                          f.path, entry.layer, entry.expert, offset, done, read_bytes_, errno_text(err));
      }
      if (r == 0) break;  // end of file: the last blob may stop at expert_bytes
      done += uint64_t(r);
      // An O_DIRECT read that stops off the block size has hit the end of the file; reading on from an
      // unaligned offset would fail with EINVAL.
      if (direct && done % io_alignment != 0) break;
    }
    *bytes_done = done;
    if (done < source_.expert_bytes)
      return make_error(ErrorCode::io, "{}: layer {} expert {}: short read at offset {}: expected {} bytes, got {} (file truncated?)",
                        f.path, entry.layer, entry.expert, offset, source_.expert_bytes, done);
    if (options_.verify_hashes) {
      const uint64_t expected = f.hashes[size_t(entry.expert)];
      const uint64_t actual = XXH3_64bits(entry.buffer, source_.expert_bytes);
      if (actual != expected)
        return make_error(ErrorCode::format, "{}: layer {} expert {}: XXH3 {:016x}, expected {:016x} (corrupt blob)",
                          f.path, entry.layer, entry.expert, actual, expected);
    }
    return Status::ok();
  }

  const ExpertSource source_;
  const ExpertStoreOptions options_;
  const std::unique_ptr<CachePolicy> policy_;
  uint64_t read_bytes_ = 0;              // expert_bytes rounded up to io_alignment; one read's length
  std::atomic<bool> direct_active_{false};  // O_DIRECT in use; cleared once if the file system refuses
  std::vector<LayerFile> files_;
  std::vector<int> file_of_layer_;       // [max layer + 1] index into files_, -1 for a dense layer

  mutable std::mutex mutex_;  // guards everything below
  std::unordered_map<uint64_t, std::shared_ptr<Entry>> entries_;  // expert_key → cached or loading
  std::deque<std::shared_ptr<Entry>> jobs_;                       // reads not yet taken by a reader
  std::vector<uint8_t*> free_buffers_;                            // spare [read_bytes_] buffers
  ExpertStoreStats stats_;
  bool stopping_ = false;
  std::condition_variable jobs_ready_;  // readers wait here for jobs
  std::condition_variable done_;        // acquires wait here for reads to finish
  std::vector<std::thread> readers_;
};

}  // namespace

Result<std::unique_ptr<ExpertStore>> ExpertStore::open(const ExpertSource& source, const ExpertStoreOptions& options) {
  if (source.n_expert <= 0 || source.n_expert > INT32_MAX)
    return make_error(ErrorCode::format, "expert layout: n_expert {}, expected 1 to {}", source.n_expert, INT32_MAX);
  if (source.expert_bytes == 0)
    return make_error(ErrorCode::format, "expert layout: expert_bytes is 0");
  if (source.expert_stride % io_alignment != 0 || source.expert_stride < source.expert_bytes)
    return make_error(ErrorCode::format, "expert layout: stride {}, expected a multiple of {} of at least expert_bytes {}",
                      source.expert_stride, io_alignment, source.expert_bytes);
  if (options.n_readers < 1)
    return make_error(ErrorCode::invalid_argument, "expert store: n_readers {}, expected at least 1", options.n_readers);
  MF_ASSIGN_OR_RETURN(auto policy, make_cache_policy(options.policy));
  auto store = std::make_unique<HostExpertStore>(source, options, std::move(policy));
  MF_TRY(store->open_files());
  store->start_readers();
  return std::unique_ptr<ExpertStore>(std::move(store));
}

}  // namespace moeflux
