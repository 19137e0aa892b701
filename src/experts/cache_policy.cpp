// Cache replacement policies behind the CachePolicy interface, and make_cache_policy by name.
// Owns: the policies' bookkeeping of keys only; what a key's memory is, and whether it may go now,
// is the store's business (it passes `evictable`).
#include <list>
#include <unordered_map>

#include "experts/expert_store.hpp"

namespace moeflux {
namespace {

// Least recently used: a recency list (front = most recent) and an index into it, so insert, hit and
// erase are O(1). choose_victim walks from the least recent end past keys that may not go now (experts
// in use); at most the pinned working set is skipped.
class LruPolicy final : public CachePolicy {
 public:
  const char* name() const override { return "lru"; }

  void on_insert(uint64_t key) override {
    MF_CHECK_MSG(!where_.contains(key), "lru: key {:#x} inserted twice", key);
    order_.push_front(key);
    where_.emplace(key, order_.begin());
  }

  void on_hit(uint64_t key) override {
    const auto it = where_.find(key);
    MF_CHECK_MSG(it != where_.end(), "lru: hit on absent key {:#x}", key);
    order_.splice(order_.begin(), order_, it->second);
  }

  void on_erase(uint64_t key) override {
    const auto it = where_.find(key);
    MF_CHECK_MSG(it != where_.end(), "lru: erase of absent key {:#x}", key);
    order_.erase(it->second);
    where_.erase(it);
  }

  bool choose_victim(const std::function<bool(uint64_t)>& evictable, uint64_t* key) override {
    for (auto it = order_.rbegin(); it != order_.rend(); ++it) {
      if (evictable(*it)) {
        *key = *it;
        return true;
      }
    }
    return false;
  }

 private:
  std::list<uint64_t> order_;
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> where_;
};

}  // namespace

Result<std::unique_ptr<CachePolicy>> make_cache_policy(const std::string& name) {
  if (name == "lru") return std::unique_ptr<CachePolicy>(std::make_unique<LruPolicy>());
  return make_error(ErrorCode::invalid_argument, "cache policy \"{}\": unknown; known policies: lru", name);
}

}  // namespace moeflux
