// The expert store on the host: brings routed experts from the pack's experts/layer_NNN.bin files into
// memory on demand, keeps a byte-budgeted cache of them under a replaceable policy, and counts what it
// did. Owns: reader threads, aligned blob buffers, the cache and its policy, telemetry. Does not know
// what is inside a blob (Pack::expert_view does) nor which experts a token needs (the model does).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.hpp"

namespace moeflux {

class Pack;

enum class IoMode : uint8_t {
  direct,      // O_DIRECT reads into aligned buffers, bypassing the page cache (falls back to
               // page_cache for a file system that refuses O_DIRECT, and says so once)
  page_cache,  // ordinary buffered reads
};

// Memory for the store's blob buffers. The default (no allocator) is posix_memalign/free; a GPU expert
// tier passes pinned host memory, so its copies to the device run at the bus's full rate.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // At least `bytes`, 4096-aligned, or null.
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p) = 0;
};

struct ExpertStoreOptions {
  uint64_t cache_bytes = 0;   // experts kept after use; 0 keeps none (every use reads storage)
  int n_readers = 8;          // reader threads issuing reads in parallel
  IoMode io_mode = IoMode::direct;
  bool verify_hashes = false;  // check every blob read from storage against the manifest's XXH3
  std::string policy = "lru";  // cache policy name (see make_cache_policy)
  std::shared_ptr<HostAllocator> allocator;  // blob buffers' memory; null: posix_memalign
};

// One tier's counters. For the host tier "read" means from storage; for a device tier (e.g. the GPU
// cache) it means copied from the tier below it.
struct ExpertStoreStats {
  uint64_t hits = 0;           // experts acquired that were cached or already being read (prefetch)
  uint64_t misses = 0;         // experts acquired whose read this acquire had to issue
  uint64_t bytes_read = 0;     // from storage (host tier) or from the tier below (device tier)
  uint64_t reads = 0;          // storage reads or copies issued
  double wait_seconds = 0;     // time acquire() spent waiting for reads (a device tier: the tier below and its copies)
  uint64_t prefetches = 0;     // reads started by prefetch()
  uint64_t evictions = 0;
  uint64_t cached_experts = 0; // now in the cache
  uint64_t cached_bytes = 0;   // now in the cache (blob stride each), experts in use included
  uint64_t buffer_bytes = 0;   // host memory held in blob buffers: cached, in use, being read, and spare
};

// Where the experts live, without a Pack: what the store needs from the manifest, with absolute paths.
// Pack-based opening builds one of these; tests and tools can build one directly.
struct ExpertLayerSource {
  int layer = 0;
  std::string path;              // layer file; expert e's blob at e × expert_stride
  std::vector<uint64_t> hashes;  // XXH3-64 of each blob's expert_bytes, by expert id (may be empty
                                 // when verify_hashes is off)
};

struct ExpertSource {
  int64_t n_expert = 0;
  uint64_t expert_bytes = 0;   // meaningful bytes of one blob
  uint64_t expert_stride = 0;  // distance between blobs; multiple of 4096, at least expert_bytes
  std::vector<ExpertLayerSource> layers;
};

// Replacement policy over keys (layer << 32 | expert). The store calls these under its lock; a policy
// knows nothing about memory or I/O, so policies are tested alone.
class CachePolicy {
 public:
  virtual ~CachePolicy() = default;
  virtual const char* name() const = 0;
  virtual void on_insert(uint64_t key) = 0;
  virtual void on_hit(uint64_t key) = 0;
  virtual void on_erase(uint64_t key) = 0;
  // The key to evict among those inserted and not erased; `evictable(key)` says whether it may go now
  // (an expert in use may not). Returns false when none may go.
  virtual bool choose_victim(const std::function<bool(uint64_t)>& evictable, uint64_t* key) = 0;
};

// "lru" → least recently used. Unknown names: invalid_argument.
Result<std::unique_ptr<CachePolicy>> make_cache_policy(const std::string& name);

inline uint64_t expert_key(int layer, int64_t expert) { return (uint64_t(uint32_t(layer)) << 32) | uint32_t(expert); }

class ExpertStore {
 public:
  // Reads the expert layout from the pack's manifest (defined in expert_store_pack.cpp).
  static Result<std::unique_ptr<ExpertStore>> open(const Pack& pack, const ExpertStoreOptions& options);
  // Opens every layer file and starts the reader threads. Errors: a layout that cannot be read
  // (stride not a multiple of 4096 or below expert_bytes, duplicate layer, hashes of the wrong count
  // with verify_hashes), a missing or too-short layer file, a bad option (n_readers < 1, unknown policy).
  static Result<std::unique_ptr<ExpertStore>> open(const ExpertSource& source, const ExpertStoreOptions& options);
  virtual ~ExpertStore() = default;

  // Makes experts[0..n) of `layer` available in host memory and sets blobs[i] to expert i's blob
  // (Manifest::expert_bytes long, 64-byte aligned), valid until the matching release(). Missing experts
  // are read in parallel by the reader threads. Errors: a bad id, a short or failed read, a hash
  // mismatch, n above max_acquire(). Experts in use beyond cache_bytes are allowed (the working set),
  // and the budget bounds what stays cached after release.
  virtual Status acquire(int layer, const int32_t* experts, int n, const void** blobs) = 0;
  virtual void release(int layer, const int32_t* experts, int n) = 0;

  // Starts reading these experts into the cache if they are not there; never blocks, never fails
  // (errors surface at acquire). Does nothing when the cache budget cannot hold them.
  virtual void prefetch(int layer, const int32_t* experts, int n) = 0;

  // Most experts one acquire() may ask for: 256, enough for prefill to hold every expert of a layer
  // touched by a batch of tokens (models have up to 256 routed experts per layer, e.g. DeepSeek-V3).
  virtual int max_acquire() const = 0;
  virtual ExpertStoreStats stats() const = 0;
  virtual void reset_stats() = 0;
  virtual const ExpertStoreOptions& options() const = 0;

  // Kernels that choose experts on the device (Backend::moe_decode) read blobs through a table: [n_expert]
  // addresses of `layer`'s experts in the backend's memory, null where an expert is not held. The table
  // is current after acquire() (the experts acquired are in it) and, while holds_layer(layer), always.
  // Null for a store that keeps no such table (the host store: its blobs are found by acquire alone).
  virtual const void* const* expert_table(int layer) { return nullptr; }
  // Whether every expert of `layer` is held now, so a device-routed token needs no acquire (and no host
  // round trip to learn its ids); record_held_uses then counts its n uses as hits.
  virtual bool holds_layer(int layer) { return false; }
  // holds_layer for every layer with experts: a one-token step needs nothing from the host.
  virtual bool holds_everything() { return false; }
  // Brings every expert into this tier now (reading what the tiers below lack), so decoding never waits
  // for one. An error when they do not all fit in this tier's budget (nothing is evicted to try).
  virtual Status preload() { return make_error(ErrorCode::unsupported, "the {} expert store does not preload", tier_name()); }
  virtual void record_held_uses(int layer, int n) {}

  // Tiers: a store may sit on another and fetch its misses from it (the GPU cache on the host store).
  // tier_name() names this one ("host", "gpu"); lower_tier() is the one below, or null.
  virtual const char* tier_name() const { return "host"; }
  virtual ExpertStore* lower_tier() { return nullptr; }
};

}  // namespace moeflux
