// `moeflux bench`: prefill and decode speed of a pack on this machine, cold (empty caches) and warm, with
// each expert tier's counters per phase and the bound they are judged against (DESIGN.md,
// "Performance"): the link rates of this machine are measured in the same run (device copy and pinned
// host→device for CUDA, expert reads from storage as the store does them), and a decode token's bound is
// (active bytes + the session cache it reads) ÷ device rate (on the CPU, the compute threads' host memory
// read rate) + bytes the GPU tier copied ÷ host→device rate + bytes read from storage ÷ storage rate.
// Owns the measurement loop and its report (text or one JSON object); not the model or the store.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <new>
#include <random>

#include "backends/backend.hpp"
#include "backends/cuda/cuda_experts.hpp"

#include "commands.hpp"
#include "core/thread_pool.hpp"
#include "core/timer.hpp"
#include "format/pack.hpp"
#include "model_flags.hpp"
#include "models/model_family.hpp"
#include "runtime/session.hpp"
#include "runtime/token_picker.hpp"
#include "sampling/sampler.hpp"

namespace moeflux::cli {
namespace {

using nlohmann::json;

struct BenchArgs {
  ModelFlags model;
  int n_prompt = 64;
  int n_gen = 32;
  int n_runs = 2;
  uint64_t seed = 1;
  bool json_output = false;
  bool probe = true;
  std::string split = "auto";  // time split per part: on, off, auto (on for the CPU, off for CUDA)
  bool graphs = false;
  // How decode picks each next token: greedy by default (on a GPU without copying the logits), or drawn
  // with these settings as `run` draws them (TokenPicker), to time sampled decoding.
  SamplerParams sampling{0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 64, 1};
};

struct TierResult {
  std::string name;
  ExpertStoreStats stats;
};

struct PhaseResult {
  int64_t n_tokens = 0;
  double seconds = 0;
  ExpertStoreStats experts;        // the top tier (what the forward pass waited for)
  std::vector<TierResult> tiers;   // every tier, top first
  ForwardProfile profile;          // wall time per part of the forward pass
};

// Link rates in bytes per second, measured in this run; 0 where not measured.
struct Rates {
  double device = 0;          // CUDA device copy (read + write)
  double host_memory = 0;     // host memory read by the compute threads (the CPU device's weights and cache)
  double host_to_device = 0;  // pinned host → device
  double storage = 0;         // expert blobs read by a store like the model's
};

// A decode token's bound in seconds, per part, from the bytes each link moved and its measured rate.
struct Bound {
  double compute = 0, host_to_device = 0, storage = 0;
  double total() const { return compute + host_to_device + storage; }
};

std::vector<ExpertStore*> tiers_of(ExpertStore& top) {
  std::vector<ExpertStore*> tiers;
  for (ExpertStore* t = &top; t; t = t->lower_tier()) tiers.push_back(t);
  return tiers;
}

void reset_tiers(ExpertStore& top) {
  for (ExpertStore* t : tiers_of(top)) t->reset_stats();
}

std::vector<TierResult> tier_stats(ExpertStore& top) {
  std::vector<TierResult> out;
  for (ExpertStore* t : tiers_of(top)) out.push_back({t->tier_name(), t->stats()});
  return out;
}

// Reads expert blobs of the pack through a store of its own (the model's io mode and readers, no cache),
// whole layers' worth at a time, until `budget` bytes: the storage rate the model's store sees.
Result<double> measure_storage_rate(const Pack& pack, const ExpertStoreOptions& model_options, uint64_t budget) {
  ExpertStoreOptions o;
  o.io_mode = model_options.io_mode;
  o.n_readers = model_options.n_readers;
  MF_ASSIGN_OR_RETURN(auto store, ExpertStore::open(pack, o));
  const Manifest& m = pack.manifest();
  if (m.expert_layers.empty() || m.n_expert == 0) return 0.0;
  // Experts from the top of each layer's id range: a random prompt's cold run mostly touches others.
  const int per_call = int(std::min<int64_t>(m.n_expert, std::min(store->max_acquire(), 4 * o.n_readers)));
  std::vector<int32_t> ids(static_cast<size_t>(per_call));
  std::vector<const void*> blobs(static_cast<size_t>(per_call));
  Timer timer;
  uint64_t bytes = 0;
  for (size_t l = 0; bytes < budget && l < m.expert_layers.size(); ++l) {
    const int layer = m.expert_layers[l].layer;
    for (int i = 0; i < per_call; ++i) ids[size_t(i)] = int32_t(m.n_expert - 1 - i);
    MF_TRY(store->acquire(layer, ids.data(), per_call, blobs.data()));
    store->release(layer, ids.data(), per_call);
    bytes += uint64_t(per_call) * m.expert_bytes;
  }
  return double(store->stats().bytes_read) / timer.seconds();
}

// The rate at which n_threads (0: every hardware thread, as the CPU backend takes it) read host memory:
// a buffer of 512 MiB (at most an eighth of the machine's memory; beyond any last-level cache) touched
// once, then summed by the threads in contiguous shares, the median of five passes. 0 where the buffer
// cannot be had (no rate, no compute part in the bound).
double measure_host_read_rate(int n_threads) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  size_t bytes = size_t(512) << 20;
  if (pages > 0 && page > 0) bytes = std::min(bytes, size_t(pages) * size_t(page) / 8);
  const size_t n = bytes / sizeof(uint64_t);
  if (n == 0) return 0.0;
  std::vector<uint64_t> buffer;
  try {
    buffer.resize(n);
  } catch (const std::bad_alloc&) {
    return 0.0;
  }
  for (size_t i = 0; i < n; ++i) buffer[i] = i;
  ThreadPool pool(n_threads);
  const int64_t shares = 4 * int64_t(pool.size());
  std::vector<uint64_t> sums(static_cast<size_t>(shares));
  std::vector<double> seconds;
  for (int pass = 0; pass < 5; ++pass) {
    Timer timer;
    pool.parallel_for(shares, [&](int64_t t) {
      const size_t begin = n * size_t(t) / size_t(shares), end = n * size_t(t + 1) / size_t(shares);
      uint64_t sum = 0;
      for (size_t i = begin; i < end; ++i) sum += buffer[i];
      sums[size_t(t)] = sum;  // kept, so the reads are not optimized away
    });
    seconds.push_back(timer.seconds());
  }
  std::sort(seconds.begin(), seconds.end());
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  if (total != uint64_t(n) * uint64_t(n - 1) / 2) return 0.0;  // Σ i: every word was read
  return double(bytes) / seconds[seconds.size() / 2];
}

double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;
}

// Seconds per part: the graph's parts, the rest ("other": embedding, norms, residuals, output head), and
// of the routed experts the time spent waiting for expert reads.
std::vector<std::pair<std::string, double>> time_split(const PhaseResult& p) {
  std::vector<std::pair<std::string, double>> parts;
  double accounted = 0;
  for (int i = 0; i < ForwardProfile::n_parts; ++i) {
    if (p.profile.seconds[i] <= 0) continue;
    parts.emplace_back(ForwardProfile::name(i), p.profile.seconds[i]);
    accounted += p.profile.seconds[i];
  }
  parts.emplace_back("other", std::max(0.0, p.seconds - accounted));
  parts.emplace_back("expert_io_wait", p.experts.wait_seconds);
  return parts;
}

std::string split_report(const PhaseResult& p) {
  std::string out;
  for (const auto& [name, seconds] : time_split(p))
    out += fmt::format("{}{} {:.2f} ms/token ({:.0f}%)", out.empty() ? "" : ", ", name, 1e3 * seconds / double(p.n_tokens),
                       100.0 * seconds / p.seconds);
  return out;
}

json tier_json(const TierResult& t, int64_t n_tokens) {
  const uint64_t uses = t.stats.hits + t.stats.misses;
  return {{"tier", t.name},
          {"hits", t.stats.hits},
          {"misses", t.stats.misses},
          {"hit_rate", uses ? double(t.stats.hits) / double(uses) : 0.0},
          {"bytes_moved", t.stats.bytes_read},
          {"bytes_moved_per_token", n_tokens > 0 ? double(t.stats.bytes_read) / double(n_tokens) : 0.0},
          {"transfers", t.stats.reads},
          {"wait_seconds", t.stats.wait_seconds},
          {"evictions", t.stats.evictions},
          {"cached_experts", t.stats.cached_experts},
          {"cached_bytes", t.stats.cached_bytes},
          {"buffer_bytes", t.stats.buffer_bytes}};
}

json phase_json(const PhaseResult& p) {
  json tiers = json::array();
  for (const TierResult& t : p.tiers) tiers.push_back(tier_json(t, p.n_tokens));
  return {{"tokens", p.n_tokens},
          {"seconds", p.seconds},
          {"tok_per_s", p.seconds > 0 ? double(p.n_tokens) / p.seconds : 0.0},
          {"ms_per_token", p.n_tokens > 0 ? 1e3 * p.seconds / double(p.n_tokens) : 0.0},
          {"tiers", tiers},
          {"time_split_seconds", [&] {
             if (!p.profile.enabled) return json(nullptr);
             json split = json::object();
             for (const auto& [name, seconds] : time_split(p)) split[name] = seconds;
             return split;
           }()}};
}

// The bytes a decode token moved over each link (device_bytes: the active weights and the session cache it
// reads; the rest from the tiers' counters) at the measured rates.
Bound decode_bound(const PhaseResult& d, uint64_t device_bytes, const Rates& r, bool on_gpu) {
  Bound b;
  const double n = double(d.n_tokens);
  if (on_gpu && r.device > 0) b.compute = double(device_bytes) / r.device;
  if (!on_gpu && r.host_memory > 0) b.compute = double(device_bytes) / r.host_memory;
  for (const TierResult& t : d.tiers) {
    const double per_token = double(t.stats.bytes_read) / n;
    if (t.name == "gpu" && r.host_to_device > 0) b.host_to_device = per_token / r.host_to_device;
    if (t.name == "host" && r.storage > 0) b.storage = per_token / r.storage;
  }
  return b;
}

json bound_json(const Bound& b, const PhaseResult& d) {
  const double measured = d.seconds / double(d.n_tokens);
  return {{"compute_seconds", b.compute},
          {"host_to_device_seconds", b.host_to_device},
          {"storage_seconds", b.storage},
          {"seconds_per_token", b.total()},
          {"tok_per_s", b.total() > 0 ? 1.0 / b.total() : 0.0},
          {"achieved_fraction", measured > 0 ? b.total() / measured : 0.0}};
}

int run_bench(const BenchArgs& a) {
  if (a.n_prompt < 1 || a.n_gen < 1 || a.n_runs < 1)
    return report_error("bench", make_error(ErrorCode::invalid_argument,
                                            "--prompt-tokens {}, --gen-tokens {}, --runs {}: each must be at least 1", a.n_prompt,
                                            a.n_gen, a.n_runs));
  auto options = a.model.options();
  if (!options) return report_error("bench", options.status());
  const ModelOptions& o = *options;
  const bool on_gpu = o.device == Device::cuda;
  Timer open_timer;
  auto model_result = Model::open(o);
  if (!model_result) return report_error("bench", model_result.status());
  Model& model = **model_result;
  const double open_seconds = open_timer.seconds();

  // Active bytes per decode token: every resident weight is read once, except the embedding table, of
  // which one row is looked up (when tied it is also the output head and is read whole), plus K experts
  // in every MoE layer.
  const Manifest& m = model.pack().manifest();
  const int64_t n_expert_used = m.hparams.value("n_expert_used", int64_t(0));
  const uint64_t n_moe_layers = m.expert_layers.size();
  const uint64_t resident_bytes = model.pack().resident_bytes();
  uint64_t embedding_bytes = 0;
  if (!m.hparams.value("tie_word_embeddings", false))
    if (const PackTensor* t = m.find_tensor("model.embed_tokens.weight"))
      embedding_bytes = t->data.bytes + t->scales.bytes + t->biases.bytes;
  const uint64_t resident_read = resident_bytes - embedding_bytes;
  const uint64_t expert_bytes_per_token = uint64_t(n_expert_used) * m.expert_bytes * n_moe_layers;
  const uint64_t active_bytes = resident_read + expert_bytes_per_token;

  // The links' rates, measured here before the runs.
  Rates rates;
  if (a.probe) {
    auto storage = measure_storage_rate(model.pack(), o.experts, uint64_t(1) << 30);
    if (!storage) return report_error("bench", storage.status().with_context("measuring the storage read rate"));
    rates.storage = *storage;
    if (!on_gpu) rates.host_memory = measure_host_read_rate(o.n_threads);
    CudaLinkRates cuda;
    if (on_gpu && measure_cuda_link_rates(o.gpu, &cuda)) {
      rates.device = cuda.device_copy;
      rates.host_to_device = cuda.host_to_device;
    }
  }

  SessionOptions so;
  so.n_ctx = int64_t(a.n_prompt) + a.n_gen;
  so.graphs = a.graphs;
  auto session_result = Session::create(model, so);
  if (!session_result) return report_error("bench", session_result.status());
  Session& session = **session_result;
  // The session's cache: bytes per position (KV or MLA latent rows) and fixed bytes (recurrent state).
  uint64_t cache_bytes_per_token = 0, state_fixed_bytes = 0;
  for (const auto& b : session.state_buffers()) {
    cache_bytes_per_token += b.floats_per_position * sizeof(float);
    state_fixed_bytes += b.fixed_floats * sizeof(float);
  }
  // What a decode token reads of that cache, on average over the run's tokens: the rows of every position
  // it attends (token i of the decode attends the prompt and i + 1 more: prompt + (gen + 1) / 2 on
  // average), and the recurrent state read and written. At long contexts this passes the weights' bytes
  // (Qwen3-30B-A3B's fp32 KV rows are 192 KB a position: 0.8 GB a token at 4K, against 2.3 GB of weights).
  const uint64_t cache_read_bytes = uint64_t(double(cache_bytes_per_token) * (double(a.n_prompt) + double(a.n_gen + 1) / 2.0)) +
                                    2 * state_fixed_bytes;

  // The same prompt every run, so a later run sees caches warmed by the first (cold) one.
  std::mt19937_64 rng(a.seed);
  std::uniform_int_distribution<int32_t> token_dist(0, int32_t(model.n_vocab() - 1));
  std::vector<int32_t> prompt(size_t(a.n_prompt));
  for (auto& t : prompt) t = token_dist(rng);

  ExpertStore& store = model.experts();
  ForwardProfile& profile = model.graph().profile;
  // On a GPU each part's scope waits for the queue, which costs what it measures: off unless asked for.
  profile.enabled = a.split == "on" || (a.split == "auto" && !on_gpu);
  auto measure = [&](PhaseResult& phase, int64_t n_tokens, const std::function<Status()>& body) -> Status {
    reset_tiers(store);
    profile.reset();
    Timer timer;
    MF_TRY(body());
    model.backend().synchronize();
    phase.seconds = timer.seconds();
    phase.n_tokens = n_tokens;
    phase.tiers = tier_stats(store);
    phase.experts = phase.tiers.front().stats;
    phase.profile = profile;
    return Status::ok();
  };
  // The first run starts with empty expert caches unless every expert was preloaded onto the GPU. (With
  // --io page-cache the kernel's page cache may still hold what the rate probe or an earlier process read.)
  const auto cold = [&](int run) { return run == 0 && !o.gpu_cache.preload; };
  auto sampler_result = Sampler::create(a.sampling, model.n_vocab());
  if (!sampler_result) return report_error("bench", sampler_result.status());
  Sampler& sampler = *sampler_result;
  TokenPicker picker;
  const auto next_token = [&] { return picker.next(session, sampler); };
  const SamplerParams& sp = a.sampling;
  std::string sampling = sp.temperature == 0.0f ? std::string("greedy")
                                                : fmt::format("temperature {}, top-k {}, top-p {}, min-p {}", sp.temperature, sp.top_k, sp.top_p, sp.min_p);
  if (sampler.penalizes())
    sampling += fmt::format("; penalties: repetition {}, presence {}, frequency {} over the last {} tokens", sp.repetition_penalty,
                            sp.presence_penalty, sp.frequency_penalty, sp.penalty_last_n);
  json runs = json::array();
  std::vector<std::pair<PhaseResult, PhaseResult>> results;
  for (int r = 0; r < a.n_runs; ++r) {
    session.reset();
    sampler.reset();  // every run draws the same tokens
    PhaseResult prefill, decode;
    Status s = measure(prefill, a.n_prompt, [&] { return session.eval_prompt(prompt); });
    if (!s.is_ok()) return report_error("bench", s.with_context("prefill"));
    s = measure(decode, a.n_gen, [&] {
      for (int i = 0; i < a.n_gen; ++i) {
        const int32_t token = next_token();
        sampler.accept(token);  // the penalties' window
        MF_TRY(session.eval_token(token).with_context(fmt::format("decode token {}", i)));
      }
      return Status::ok();
    });
    if (!s.is_ok()) return report_error("bench", s);
    json dj = phase_json(decode);
    dj["active_bytes_per_token"] = active_bytes;
    dj["effective_gb_per_s"] = double(active_bytes) * dj["tok_per_s"].get<double>() / 1e9;
    dj["cache_read_bytes_per_token"] = cache_read_bytes;
    dj["bound"] = bound_json(decode_bound(decode, active_bytes + cache_read_bytes, rates, on_gpu), decode);
    runs.push_back({{"run", r + 1}, {"caches", cold(r) ? "cold" : "warm"}, {"prefill", phase_json(prefill)}, {"decode", dj}});
    results.emplace_back(prefill, decode);
  }

  uint64_t gpu_free = 0, gpu_total = 0;
  const bool gpu_memory = on_gpu && cuda_memory_info(o.gpu, &gpu_free, &gpu_total);
  const double rss = peak_rss_bytes();
  if (a.json_output) {
    json out = {{"pack", o.pack_dir},
                {"model_type", model.model_type()},
                {"device", on_gpu ? "cuda" : "cpu"},
                {"backend", model.backend().name()},
                {"threads", o.n_threads},
                {"expert_cache_bytes", o.experts.cache_bytes},
                {"gpu_cache_bytes", on_gpu ? json(o.gpu_cache.budget_bytes) : json(nullptr)},
                {"io", o.experts.io_mode == IoMode::direct ? "direct" : "page-cache"},
                {"io_threads", o.experts.n_readers},
                {"graphs", a.graphs},
                {"open_seconds", open_seconds},
                {"prompt_tokens", a.n_prompt},
                {"gen_tokens", a.n_gen},
                {"sampling", {{"greedy", sampler.picks_argmax()},
                              {"temperature", a.sampling.temperature},
                              {"top_k", a.sampling.top_k},
                              {"top_p", a.sampling.top_p},
                              {"min_p", a.sampling.min_p},
                              {"repetition_penalty", a.sampling.repetition_penalty},
                              {"presence_penalty", a.sampling.presence_penalty},
                              {"frequency_penalty", a.sampling.frequency_penalty},
                              {"penalty_last_n", a.sampling.penalty_last_n}}},
                {"resident_bytes", resident_bytes},
                {"resident_read_bytes_per_token", resident_read},
                {"n_expert_used", n_expert_used},
                {"n_moe_layers", n_moe_layers},
                {"expert_bytes", m.expert_bytes},
                {"expert_stride", m.expert_stride},
                {"expert_bytes_per_token", expert_bytes_per_token},
                {"active_bytes_per_token", active_bytes},
                {"rates_bytes_per_s",
                 {{"device_copy", rates.device}, {"host_to_device", rates.host_to_device}, {"storage", rates.storage}, {"host_memory_read", rates.host_memory}}},
                {"cache_bytes_per_token", cache_bytes_per_token},
                {"state_fixed_bytes", state_fixed_bytes},
                {"peak_host_rss_bytes", rss},
                {"gpu_used_bytes", gpu_memory ? json(gpu_total - gpu_free) : json(nullptr)},
                {"runs", runs}};
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }

  std::printf("pack %s (%s) on %s, opened in %.2f s; expert cache %s (host)", o.pack_dir.c_str(), model.model_type().c_str(),
              model.backend().name(), open_seconds, format_bytes(double(o.experts.cache_bytes)).c_str());
  if (on_gpu)
    std::printf(", %s (gpu)", o.gpu_cache.budget_bytes ? format_bytes(double(o.gpu_cache.budget_bytes)).c_str() : "auto");
  std::printf("; io %s × %d readers\n", o.experts.io_mode == IoMode::direct ? "direct" : "page-cache", o.experts.n_readers);
  std::printf("active bytes per decode token: %s = resident %s (of %s; the embedding is a row lookup) + %lld × %s × %llu MoE layers\n",
              format_bytes(double(active_bytes)).c_str(), format_bytes(double(resident_read)).c_str(),
              format_bytes(double(resident_bytes)).c_str(), (long long)n_expert_used, format_bytes(double(m.expert_bytes)).c_str(),
              (unsigned long long)n_moe_layers);
  if (a.probe)
    std::printf("measured rates: storage %s/s%s\n", format_bytes(rates.storage).c_str(),
                on_gpu ? fmt::format(", host→device (pinned) {}/s, device copy {}/s", format_bytes(rates.host_to_device),
                                     format_bytes(rates.device))
                             .c_str()
                       : fmt::format(", host memory read {}/s", format_bytes(rates.host_memory)).c_str());
  std::printf("session cache: %s per token (fp32) + %s of recurrent state; a decode token reads %s of it on average (in the bound)\n",
              format_bytes(double(cache_bytes_per_token)).c_str(), format_bytes(double(state_fixed_bytes)).c_str(),
              format_bytes(double(cache_read_bytes)).c_str());
  auto print_tiers = [](const PhaseResult& p) {
    for (const TierResult& t : p.tiers)
      std::printf("    [%s] %s; %s per token\n", t.name.c_str(), expert_report(t.stats, p.seconds).c_str(),
                  format_bytes(double(t.stats.bytes_read) / double(p.n_tokens)).c_str());
  };
  for (size_t r = 0; r < results.size(); ++r) {
    const auto& [prefill, decode] = results[r];
    const double prefill_tok_s = double(prefill.n_tokens) / prefill.seconds;
    const double decode_tok_s = double(decode.n_tokens) / decode.seconds;
    std::printf("run %zu (%s caches)\n", r + 1, cold(int(r)) ? "cold" : "warm");
    std::printf("  prefill  %d tokens in %.2f s: %.2f tok/s\n", a.n_prompt, prefill.seconds, prefill_tok_s);
    print_tiers(prefill);
    if (profile.enabled) std::printf("    time: %s\n", split_report(prefill).c_str());
    std::printf("  decode   %d tokens in %.2f s (%s): %.2f tok/s, %.2f ms/token; %.2f GB/s of active bytes\n", a.n_gen, decode.seconds,
                sampling.c_str(), decode_tok_s, 1e3 / decode_tok_s, double(active_bytes) * decode_tok_s / 1e9);
    print_tiers(decode);
    const Bound b = decode_bound(decode, active_bytes + cache_read_bytes, rates, on_gpu);
    if (b.total() > 0)
      std::printf("    bound %.2f ms/token (compute %.2f + host→device %.2f + storage %.2f): achieved %.0f%% of it\n", 1e3 * b.total(),
                  1e3 * b.compute, 1e3 * b.host_to_device, 1e3 * b.storage, 100.0 * b.total() / (decode.seconds / double(decode.n_tokens)));
    if (profile.enabled) std::printf("    time: %s\n", split_report(decode).c_str());
  }
  std::printf("peak host RSS %s", format_bytes(rss).c_str());
  if (gpu_memory) std::printf("; GPU memory in use %s of %s", format_bytes(double(gpu_total - gpu_free)).c_str(), format_bytes(double(gpu_total)).c_str());
  std::printf("\n");
  return 0;
}

}  // namespace

void register_bench(CLI::App& app, Action& action) {
  auto args = std::make_shared<BenchArgs>();
  auto* sub = app.add_subcommand("bench", "measure prefill and decode speed, expert-store counters and bytes per token");
  args->model.add_to(sub);
  sub->add_option("--prompt-tokens,--prompt", args->n_prompt, "prompt tokens (random ids)")->capture_default_str();
  sub->add_option("--gen-tokens,--gen", args->n_gen, "tokens decoded after the prompt (greedily unless --temp is given)")->capture_default_str();
  sub->add_option("--temp,--temperature", args->sampling.temperature, "decode by sampling at this temperature (0 = greedy)")
      ->capture_default_str();
  sub->add_option("--top-k", args->sampling.top_k, "with --temp: keep the k most likely tokens (0 = off)")->capture_default_str();
  sub->add_option("--top-p", args->sampling.top_p, "with --temp: nucleus mass (1 = off)")->capture_default_str();
  sub->add_option("--min-p", args->sampling.min_p, "with --temp: drop tokens below this fraction of the top probability (0 = off)")
      ->capture_default_str();
  sub->add_option("--repeat-penalty", args->sampling.repetition_penalty, "repetition penalty over the decoded tokens (1 = off)")
      ->capture_default_str();
  sub->add_option("--presence-penalty", args->sampling.presence_penalty, "presence penalty (0 = off)")->capture_default_str();
  sub->add_option("--frequency-penalty", args->sampling.frequency_penalty, "frequency penalty (0 = off)")->capture_default_str();
  sub->add_option("--repeat-last-n", args->sampling.penalty_last_n, "decoded tokens the penalties see (-1 = all)")->capture_default_str();
  sub->add_option("--runs", args->n_runs, "repetitions over one model: the first with cold caches, later ones warm")->capture_default_str();
  sub->add_option("--split", args->split,
                  "time split per part of the forward pass: on, off, or auto (on for the CPU; off for CUDA, where it synchronizes the "
                  "GPU at every part and slows what it measures)")
      ->check(CLI::IsMember({"on", "off", "auto"}))
      ->capture_default_str();
  sub->add_flag("--graphs,!--no-graphs", args->graphs,
                "record each decode step as a CUDA graph and replay it (when every expert is on the GPU) instead of launching op by "
                "op (for comparison: recording each step costs the host more than the graph saves the GPU)");
  sub->add_flag("!--no-probe", args->probe, "skip measuring the storage / host→device / device / host memory rates (no bound is reported)");
  sub->add_option("--seed", args->seed, "seed of the random prompt");
  sub->add_flag("--json", args->json_output, "print one JSON object instead of text");
  sub->callback([args, &action] { action = [args] { return run_bench(*args); }; });
}

}  // namespace moeflux::cli
