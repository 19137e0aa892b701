// Tests of the expert store and its cache policies, on fake layer files written here (random blobs at
// the stride, XXH3 hashes), so nothing depends on the pack reader. Covers bytes returned, cache
// accounting, pinning, prefetch, concurrency, and the errors a user can cause.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "experts/expert_store.hpp"

namespace moeflux {
namespace {

namespace fs = std::filesystem;

// ---- LRU policy alone ----

std::unique_ptr<CachePolicy> lru() {
  auto policy = make_cache_policy("lru");
  EXPECT_TRUE(policy.is_ok()) << policy.status().to_string();
  return std::move(policy).value();
}

const auto any_key = [](uint64_t) { return true; };

TEST(LruPolicy, EvictsLeastRecentlyUsed) {
  auto p = lru();
  EXPECT_STREQ(p->name(), "lru");
  for (uint64_t k : {1, 2, 3}) p->on_insert(k);
  uint64_t victim = 0;
  ASSERT_TRUE(p->choose_victim(any_key, &victim));
  EXPECT_EQ(victim, 1u);
  p->on_hit(1);  // order now (least recent first): 2, 3, 1
  ASSERT_TRUE(p->choose_victim(any_key, &victim));
  EXPECT_EQ(victim, 2u);
  p->on_erase(2);
  ASSERT_TRUE(p->choose_victim(any_key, &victim));
  EXPECT_EQ(victim, 3u);
  p->on_hit(3);
  ASSERT_TRUE(p->choose_victim(any_key, &victim));
  EXPECT_EQ(victim, 1u);
}

TEST(LruPolicy, SkipsKeysThatMayNotGo) {
  auto p = lru();
  for (uint64_t k : {10, 20, 30}) p->on_insert(k);
  uint64_t victim = 0;
  ASSERT_TRUE(p->choose_victim([](uint64_t k) { return k != 10; }, &victim));
  EXPECT_EQ(victim, 20u);
  ASSERT_TRUE(p->choose_victim([](uint64_t k) { return k == 30; }, &victim));
  EXPECT_EQ(victim, 30u);
  EXPECT_FALSE(p->choose_victim([](uint64_t) { return false; }, &victim));
}

TEST(LruPolicy, EraseForgetsTheKey) {
  auto p = lru();
  p->on_insert(7);
  p->on_insert(8);
  p->on_erase(7);
  uint64_t victim = 0;
  ASSERT_TRUE(p->choose_victim(any_key, &victim));
  EXPECT_EQ(victim, 8u);
  p->on_erase(8);
  EXPECT_FALSE(p->choose_victim(any_key, &victim));
  p->on_insert(7);  // a key may come back after erase
  ASSERT_TRUE(p->choose_victim(any_key, &victim));
  EXPECT_EQ(victim, 7u);
}

TEST(CachePolicy, UnknownNameIsInvalidArgumentListingKnownOnes) {
  auto p = make_cache_policy("lfu-magic");
  ASSERT_FALSE(p.is_ok());
  EXPECT_EQ(p.status().code(), ErrorCode::invalid_argument);
  EXPECT_NE(p.status().message().find("lfu-magic"), std::string::npos) << p.status().message();
  EXPECT_NE(p.status().message().find("lru"), std::string::npos) << p.status().message();
}

// ---- the store, on fake layer files ----

constexpr int64_t n_expert = 16;
constexpr uint64_t expert_bytes = 5000;  // not a multiple of 4096: reads round up past it
constexpr uint64_t stride = 8192;
constexpr uint64_t read_bytes = 8192;    // expert_bytes rounded up to 4096: what one read moves
const std::vector<int> expert_layers = {1, 3};  // layers 0 and 2 are dense in this fake model

// Layer files with random blobs at the stride; the last blob is not padded to the stride (the format
// allows it). Removed with their directory at destruction.
class FakeExperts {
 public:
  FakeExperts() {
    static std::atomic<int> counter{0};
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(testing::TempDir()) /
           ("moeflux_store_" + std::to_string(::getpid()) + "_" + info->name() + "_" + std::to_string(counter++));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    source_.n_expert = n_expert;
    source_.expert_bytes = expert_bytes;
    source_.expert_stride = stride;
    std::mt19937_64 rng(1234);
    for (int layer : expert_layers) {
      std::vector<uint8_t> bytes(size_t((n_expert - 1) * stride + expert_bytes));
      for (auto& b : bytes) b = uint8_t(rng());
      ExpertLayerSource l;
      l.layer = layer;
      l.path = (dir_ / ("layer_" + std::to_string(layer) + ".bin")).string();
      for (int64_t e = 0; e < n_expert; ++e) l.hashes.push_back(XXH3_64bits(bytes.data() + e * stride, expert_bytes));
      std::ofstream(l.path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
      source_.layers.push_back(l);
      contents_.push_back(std::move(bytes));
    }
  }
  ~FakeExperts() { fs::remove_all(dir_); }

  const ExpertSource& source() const { return source_; }
  const std::string& path(int layer) const { return source_.layers[index(layer)].path; }
  // The expected blob: expert_bytes long.
  const uint8_t* blob(int layer, int expert) const { return contents_[index(layer)].data() + expert * stride; }

 private:
  static size_t index(int layer) { return layer == 1 ? 0 : 1; }
  fs::path dir_;
  ExpertSource source_;
  std::vector<std::vector<uint8_t>> contents_;
};

std::unique_ptr<ExpertStore> open_store(const FakeExperts& fake, uint64_t cache_experts, IoMode mode = IoMode::page_cache,
                                        int n_readers = 2, bool verify = false) {
  ExpertStoreOptions o;
  o.cache_bytes = cache_experts * stride;
  o.n_readers = n_readers;
  o.io_mode = mode;
  o.verify_hashes = verify;
  auto store = ExpertStore::open(fake.source(), o);
  EXPECT_TRUE(store.is_ok()) << store.status().to_string();
  return store.is_ok() ? std::move(store).value() : nullptr;
}

// Acquires one expert, checks its bytes, releases it.
void use_one(ExpertStore& store, const FakeExperts& fake, int layer, int32_t expert) {
  const void* blob = nullptr;
  const Status s = store.acquire(layer, &expert, 1, &blob);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(std::memcmp(blob, fake.blob(layer, expert), expert_bytes), 0) << "layer " << layer << " expert " << expert;
  store.release(layer, &expert, 1);
}

TEST(ExpertStore, ReturnsTheBytesOfEveryExpertInBothIoModes) {
  FakeExperts fake;
  for (IoMode mode : {IoMode::page_cache, IoMode::direct}) {
    auto store = open_store(fake, 0, mode, 4);
    ASSERT_TRUE(store);
    for (int layer : expert_layers) {
      std::vector<int32_t> all(n_expert);
      for (int e = 0; e < n_expert; ++e) all[size_t(e)] = n_expert - 1 - e;  // any order, the last (unpadded) included
      std::vector<const void*> blobs(n_expert);
      const Status s = store->acquire(layer, all.data(), int(all.size()), blobs.data());
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      for (int i = 0; i < n_expert; ++i) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(blobs[size_t(i)]) % 64, 0u);
        EXPECT_EQ(std::memcmp(blobs[size_t(i)], fake.blob(layer, all[size_t(i)]), expert_bytes), 0)
            << "mode " << int(mode) << " layer " << layer << " expert " << all[size_t(i)];
      }
      store->release(layer, all.data(), int(all.size()));
    }
    EXPECT_EQ(store->stats().misses, uint64_t(2 * n_expert));
  }
}

TEST(ExpertStore, ZeroBudgetReadsOnEveryAcquireAndRecyclesBuffers) {
  FakeExperts fake;
  auto store = open_store(fake, 0);
  ASSERT_TRUE(store);
  const int32_t experts[] = {0, 1};
  const void* blobs[2];
  ASSERT_TRUE(store->acquire(1, experts, 2, blobs).is_ok());
  store->release(1, experts, 2);
  const uint64_t buffer_bytes = store->stats().buffer_bytes;
  EXPECT_EQ(buffer_bytes, 2 * read_bytes);
  for (int round = 0; round < 5; ++round) {
    ASSERT_TRUE(store->acquire(1, experts, 2, blobs).is_ok());
    EXPECT_EQ(std::memcmp(blobs[1], fake.blob(1, 1), expert_bytes), 0);
    store->release(1, experts, 2);
  }
  const ExpertStoreStats s = store->stats();
  EXPECT_EQ(s.hits, 0u);
  EXPECT_EQ(s.misses, 12u);
  EXPECT_EQ(s.reads, 12u);
  EXPECT_EQ(s.bytes_read, 12 * read_bytes);
  EXPECT_EQ(s.cached_experts, 0u);
  EXPECT_EQ(s.cached_bytes, 0u);
  EXPECT_EQ(s.buffer_bytes, buffer_bytes) << "steady state must reuse buffers, not allocate";
}

TEST(ExpertStore, BudgetKeepsRecentExpertsAndEvictsInLruOrder) {
  FakeExperts fake;
  const uint64_t budget_experts = 3;
  auto store = open_store(fake, budget_experts);
  ASSERT_TRUE(store);
  const auto check_budget = [&] {
    const ExpertStoreStats s = store->stats();
    EXPECT_LE(s.cached_bytes, budget_experts * stride);
    EXPECT_EQ(s.cached_bytes, s.cached_experts * stride);
  };
  for (int e : {0, 1, 2}) use_one(*store, fake, 1, e), check_budget();
  EXPECT_EQ(store->stats().misses, 3u);
  use_one(*store, fake, 1, 0);  // hit; recency now 1, 2, 0
  EXPECT_EQ(store->stats().hits, 1u);
  use_one(*store, fake, 1, 3);  // miss; evicts 1
  check_budget();
  EXPECT_EQ(store->stats().evictions, 1u);
  use_one(*store, fake, 1, 2);  // still cached
  use_one(*store, fake, 1, 0);
  EXPECT_EQ(store->stats().hits, 3u);
  EXPECT_EQ(store->stats().reads, 4u);
  use_one(*store, fake, 1, 1);  // was evicted: read again, evicts 3
  EXPECT_EQ(store->stats().reads, 5u);
  EXPECT_EQ(store->stats().evictions, 2u);
  use_one(*store, fake, 1, 3);
  EXPECT_EQ(store->stats().reads, 6u);
  check_budget();
  EXPECT_EQ(store->stats().cached_experts, budget_experts);
}

TEST(ExpertStore, PinnedExpertsSurvivePressure) {
  FakeExperts fake;
  auto store = open_store(fake, 2);
  ASSERT_TRUE(store);
  const int32_t pinned = 7;
  const void* pinned_blob = nullptr;
  ASSERT_TRUE(store->acquire(3, &pinned, 1, &pinned_blob).is_ok());
  for (int e = 0; e < 6; ++e) use_one(*store, fake, 3, e);
  EXPECT_EQ(std::memcmp(pinned_blob, fake.blob(3, pinned), expert_bytes), 0) << "pinned blob was overwritten";
  const uint64_t reads = store->stats().reads;
  const void* again = nullptr;
  ASSERT_TRUE(store->acquire(3, &pinned, 1, &again).is_ok());  // a second pin on the same expert
  EXPECT_EQ(again, pinned_blob);
  EXPECT_EQ(store->stats().reads, reads);
  store->release(3, &pinned, 1);
  store->release(3, &pinned, 1);
  // A working set larger than the budget is allowed while in use, and trimmed at release.
  const int32_t many[] = {8, 9, 10, 11, 12};
  const void* blobs[5];
  ASSERT_TRUE(store->acquire(3, many, 5, blobs).is_ok());
  EXPECT_EQ(store->stats().cached_experts, 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(std::memcmp(blobs[i], fake.blob(3, many[i]), expert_bytes), 0);
  store->release(3, many, 5);
  EXPECT_LE(store->stats().cached_bytes, 2 * stride);
}

TEST(ExpertStore, PrefetchedExpertsAreHitsWithoutASecondRead) {
  FakeExperts fake;
  auto store = open_store(fake, 4);
  ASSERT_TRUE(store);
  const int32_t experts[] = {2, 5};
  store->prefetch(1, experts, 2);
  const void* blobs[2];
  ASSERT_TRUE(store->acquire(1, experts, 2, blobs).is_ok());  // may wait on the prefetch's reads
  for (int i = 0; i < 2; ++i) EXPECT_EQ(std::memcmp(blobs[i], fake.blob(1, experts[i]), expert_bytes), 0);
  store->release(1, experts, 2);
  ExpertStoreStats s = store->stats();
  EXPECT_EQ(s.prefetches, 2u);
  EXPECT_EQ(s.reads, 2u);
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.misses, 0u);
  store->prefetch(1, experts, 2);  // already cached: nothing to do
  EXPECT_EQ(store->stats().prefetches, 2u);

  // With no budget, prefetch has nowhere to keep what it reads and does nothing.
  auto uncached = open_store(fake, 0);
  ASSERT_TRUE(uncached);
  uncached->prefetch(1, experts, 2);
  ASSERT_TRUE(uncached->acquire(1, experts, 2, blobs).is_ok());
  uncached->release(1, experts, 2);
  s = uncached->stats();
  EXPECT_EQ(s.prefetches, 0u);
  EXPECT_EQ(s.misses, 2u);
}

TEST(ExpertStore, ConcurrentAcquiresReturnCorrectBytes) {
  FakeExperts fake;
  auto store = open_store(fake, 6, IoMode::page_cache, 3);
  ASSERT_TRUE(store);
  constexpr int n_threads = 4, n_rounds = 150, k = 4;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < n_threads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng{uint32_t(t)};
      for (int round = 0; round < n_rounds; ++round) {
        const int layer = expert_layers[rng() % 2];
        int32_t experts[k];
        for (auto& e : experts) e = int32_t(rng() % 10);  // overlapping across threads, repeats allowed
        const void* blobs[k];
        if (!store->acquire(layer, experts, k, blobs).is_ok()) {
          ++failures;
          continue;
        }
        for (int i = 0; i < k; ++i)
          if (std::memcmp(blobs[i], fake.blob(layer, experts[i]), expert_bytes) != 0) ++failures;
        if (round % 3 == 0) store->prefetch(layer, experts, k);
        store->release(layer, experts, k);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  const ExpertStoreStats s = store->stats();
  EXPECT_EQ(s.hits + s.misses, uint64_t(n_threads * n_rounds * k));
  EXPECT_EQ(s.reads, s.misses + s.prefetches) << "every read was asked for exactly once";
  EXPECT_LE(s.cached_bytes, 6 * stride);
}

TEST(ExpertStore, TruncatedFileIsAnErrorAtOpen) {
  FakeExperts fake;
  fs::resize_file(fake.path(3), 10 * stride);
  ExpertStoreOptions o;
  auto store = ExpertStore::open(fake.source(), o);
  ASSERT_FALSE(store.is_ok());
  EXPECT_EQ(store.status().code(), ErrorCode::format);
  const std::string& m = store.status().message();
  EXPECT_NE(m.find(fake.path(3)), std::string::npos) << m;
  EXPECT_NE(m.find(std::to_string(10 * stride) + " bytes"), std::string::npos) << m;
}

TEST(ExpertStore, FileTruncatedAfterOpenGivesAnErrorNamingTheExpert) {
  for (IoMode mode : {IoMode::page_cache, IoMode::direct}) {
    FakeExperts fake;
    auto store = open_store(fake, 0, mode);
    ASSERT_TRUE(store);
    fs::resize_file(fake.path(1), 3 * stride + 100);
    const int32_t experts[] = {1, 5};
    const void* blobs[2];
    Status s = store->acquire(1, experts, 2, blobs);
    ASSERT_FALSE(s.is_ok());
    EXPECT_EQ(s.code(), ErrorCode::io);
    EXPECT_NE(s.message().find("layer 1 expert 5"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("offset " + std::to_string(5 * stride)), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("expected 5000 bytes, got 0"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(fake.path(1)), std::string::npos) << s.message();
    // The expert that did read was unpinned again: with no budget nothing stays.
    EXPECT_EQ(store->stats().cached_experts, 0u);
    const int32_t partial = 3;  // 100 of its 5000 bytes remain
    s = store->acquire(1, &partial, 1, blobs);
    ASSERT_FALSE(s.is_ok());
    EXPECT_NE(s.message().find("layer 1 expert 3"), std::string::npos) << s.message();
    // The store keeps working for what is still there, and retries a failed expert rather than caching the error.
    use_one(*store, fake, 1, 2);
    const uint64_t reads = store->stats().reads;
    EXPECT_FALSE(store->acquire(1, &experts[1], 1, blobs).is_ok());
    EXPECT_EQ(store->stats().reads, reads + 1);
  }
}

TEST(ExpertStore, HashMismatchIsAFormatErrorWhenVerifying) {
  FakeExperts fake;
  {
    const int fd = ::open(fake.path(3).c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const uint8_t flipped = uint8_t(~fake.blob(3, 4)[100]);
    ASSERT_EQ(::pwrite(fd, &flipped, 1, off_t(4 * stride + 100)), 1);
    ::close(fd);
  }
  auto verifying = open_store(fake, 4, IoMode::page_cache, 2, /*verify=*/true);
  ASSERT_TRUE(verifying);
  const int32_t corrupt = 4;
  const void* blob = nullptr;
  const Status s = verifying->acquire(3, &corrupt, 1, &blob);
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.code(), ErrorCode::format);
  EXPECT_NE(s.message().find("layer 3 expert 4"), std::string::npos) << s.message();
  EXPECT_EQ(verifying->stats().cached_experts, 0u) << "a corrupt blob must not stay cached";
  use_one(*verifying, fake, 3, 5);  // its neighbour is intact

  // Without verification the same read succeeds (the check is what caught it).
  auto trusting = open_store(fake, 4);
  ASSERT_TRUE(trusting);
  ASSERT_TRUE(trusting->acquire(3, &corrupt, 1, &blob).is_ok());
  trusting->release(3, &corrupt, 1);

  // Verification needs one hash per expert.
  ExpertSource short_hashes = fake.source();
  short_hashes.layers[1].hashes.pop_back();
  ExpertStoreOptions o;
  o.verify_hashes = true;
  auto bad = ExpertStore::open(short_hashes, o);
  ASSERT_FALSE(bad.is_ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::format);
}

TEST(ExpertStore, BadIdsAreInvalidArgument) {
  FakeExperts fake;
  auto store = open_store(fake, 4);
  ASSERT_TRUE(store);
  const void* blobs[300];
  const auto code = [&](int layer, std::vector<int32_t> experts) {
    return store->acquire(layer, experts.data(), int(experts.size()), blobs).code();
  };
  EXPECT_EQ(code(1, {0, int32_t(n_expert)}), ErrorCode::invalid_argument);
  EXPECT_EQ(code(1, {-1}), ErrorCode::invalid_argument);
  EXPECT_EQ(code(0, {0}), ErrorCode::invalid_argument);  // a dense layer
  EXPECT_EQ(code(2, {0}), ErrorCode::invalid_argument);
  EXPECT_EQ(code(99, {0}), ErrorCode::invalid_argument);
  EXPECT_EQ(code(-1, {0}), ErrorCode::invalid_argument);
  EXPECT_EQ(code(1, std::vector<int32_t>(size_t(store->max_acquire() + 1), 0)), ErrorCode::invalid_argument);
  const Status s = store->acquire(1, std::vector<int32_t>{3, 40}.data(), 2, blobs);
  EXPECT_NE(s.message().find("expert id 40"), std::string::npos) << s.message();
  const int32_t bad[] = {-5, 99};
  store->prefetch(1, bad, 2);  // ignored, never fails
  store->prefetch(7, bad, 2);
  const ExpertStoreStats stats = store->stats();
  EXPECT_EQ(stats.reads + stats.hits + stats.misses + stats.prefetches, 0u);
  EXPECT_EQ(store->max_acquire(), 256);
}

TEST(ExpertStore, OpenRefusesBadLayoutsAndOptions) {
  FakeExperts fake;
  ExpertStoreOptions o;
  ExpertSource src = fake.source();
  src.expert_stride = 6000;  // not a multiple of 4096
  EXPECT_EQ(ExpertStore::open(src, o).status().code(), ErrorCode::format);
  src = fake.source();
  src.expert_bytes = stride + 1;  // blob longer than the stride
  EXPECT_EQ(ExpertStore::open(src, o).status().code(), ErrorCode::format);
  src = fake.source();
  src.layers[0].path += ".missing";
  auto missing = ExpertStore::open(src, o);
  EXPECT_EQ(missing.status().code(), ErrorCode::io);
  EXPECT_NE(missing.status().message().find(src.layers[0].path), std::string::npos) << missing.status().message();
  src = fake.source();
  src.layers[1].layer = 1;
  EXPECT_EQ(ExpertStore::open(src, o).status().code(), ErrorCode::format);  // layer listed twice
  ExpertStoreOptions bad_policy;
  bad_policy.policy = "mru";
  EXPECT_EQ(ExpertStore::open(fake.source(), bad_policy).status().code(), ErrorCode::invalid_argument);
  ExpertStoreOptions no_readers;
  no_readers.n_readers = 0;
  EXPECT_EQ(ExpertStore::open(fake.source(), no_readers).status().code(), ErrorCode::invalid_argument);
}

}  // namespace
}  // namespace moeflux
