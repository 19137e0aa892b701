// Flags shared by every command that opens a model (logits, run, chat, bench), and small helpers for
// the CLI: byte sizes ("8G"), token lists ("1,2,3"), the expert-store report.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "core/status.hpp"
#include "core/units.hpp"
#include "runtime/model.hpp"

namespace moeflux::cli {

struct ModelFlags {
  std::string pack_dir;
  std::string device = "cpu";      // cpu | cuda
  int gpu = 0;
  std::string gpu_cache = "auto";  // bytes, or auto (free device memory less a headroom)
  bool preload_experts = false;
  int n_threads = 0;
  std::string expert_cache = "0";  // bytes, with an optional K/M/G/T suffix (powers of 1024)
  std::string io = "direct";       // direct | page-cache
  int io_threads = 8;
  bool reference = false;
  bool skip_verify = false;
  bool verify_experts = false;

  void add_to(CLI::App* app);
  Result<ModelOptions> options() const;
};

Result<uint64_t> parse_bytes(const std::string& text);
Result<std::vector<int32_t>> parse_token_list(const std::string& text);

// One line of the expert store's counters, for stderr.
std::string expert_report(const ExpertStoreStats& stats, double seconds);
// One such line per tier, top (GPU) first, each prefixed with its tier's name.
std::string expert_tiers_report(ExpertStore& top, double seconds);

// Prints "moeflux <command>: <status>" to stderr and returns the exit code for it.
int report_error(const char* command, const Status& status);

}  // namespace moeflux::cli
