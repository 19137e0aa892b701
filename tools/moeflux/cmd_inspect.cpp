// `moeflux inspect`: what a pack holds (model, hyperparameters, formats, bytes, files), optionally
// every tensor, as text or JSON; --verify re-hashes every file and every expert blob.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "commands.hpp"
#include "format/pack.hpp"
#include "model_flags.hpp"

namespace moeflux::cli {
namespace {

using nlohmann::json;

struct InspectArgs {
  std::string pack_dir;
  bool verify = false;
  bool tensors = false;
  bool json = false;
};

// Re-hashes one expert layer file blob by blob; appends a line per mismatch.
Status verify_expert_file(const Pack& pack, const ExpertLayerFile& layer, const PackFileEntry* entry, std::vector<std::string>& mismatches) {
  const Manifest& m = pack.manifest();
  const std::string path = pack.dir() + "/" + layer.file;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error(ErrorCode::io, "cannot open {}: {}", path, std::strerror(errno));
  std::vector<uint8_t> blob(m.expert_bytes);
  Status status;
  for (int64_t e = 0; e < m.n_expert && status.is_ok(); ++e) {
    size_t got = 0;
    while (got < blob.size()) {
      const ssize_t n = ::pread(fd, blob.data() + got, blob.size() - got, off_t(uint64_t(e) * m.expert_stride + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        status = make_error(ErrorCode::io, "{}: short read of expert {} ({} of {} bytes)", path, e, got, blob.size());
        break;
      }
      got += size_t(n);
    }
    if (!status.is_ok()) break;
    const uint64_t h = hash_bytes(blob.data(), blob.size());
    if (size_t(e) >= layer.hashes.size() || h != layer.hashes[size_t(e)])
      mismatches.push_back(fmt::format("{}: expert {} hashes to {:016x}, manifest says {:016x}", layer.file, e, h,
                                       size_t(e) < layer.hashes.size() ? layer.hashes[size_t(e)] : 0));
  }
  ::close(fd);
  // The file's own hash is XXH3-64 over the blob hashes, so it checks the manifest's consistency.
  if (entry && hash_bytes(layer.hashes.data(), layer.hashes.size() * sizeof(uint64_t)) != entry->xxh3)
    mismatches.push_back(fmt::format("{}: file hash {:016x} in the manifest does not match its expert hashes", layer.file, entry->xxh3));
  return status;
}

Result<std::vector<std::string>> verify_pack(const Pack& pack) {
  const Manifest& m = pack.manifest();
  std::vector<std::string> mismatches;
  for (const auto& f : m.files) {
    const ExpertLayerFile* layer = nullptr;
    for (const auto& l : m.expert_layers)
      if (l.file == f.path) layer = &l;
    if (layer) {
      MF_TRY(verify_expert_file(pack, *layer, &f, mismatches));
      continue;
    }
    MF_ASSIGN_OR_RETURN(uint64_t h, hash_file(pack.dir() + "/" + f.path));
    if (h != f.xxh3) mismatches.push_back(fmt::format("{}: content hashes to {:016x}, manifest says {:016x}", f.path, h, f.xxh3));
  }
  return mismatches;
}

uint64_t tensor_bytes(const PackTensor& t) { return t.data.bytes + t.scales.bytes + t.biases.bytes; }

int run_inspect(const InspectArgs& a) {
  PackOpenOptions open_options;
  // --verify hashes everything itself (and reports every mismatch, not only the first).
  open_options.verify_resident_hash = false;
  auto pack_result = Pack::open(a.pack_dir, open_options);
  if (!pack_result) return report_error("inspect", pack_result.status());
  const Pack& pack = **pack_result;
  const Manifest& m = pack.manifest();

  std::vector<std::string> mismatches;
  if (a.verify) {
    auto v = verify_pack(pack);
    if (!v) return report_error("inspect", v.status());
    mismatches = std::move(v).value();
  }
  const uint64_t expert_total = m.expert_stride * uint64_t(m.n_expert) * m.expert_layers.size();

  if (a.json) {
    json j;
    j["pack"] = a.pack_dir;
    j["format_version"] = m.format_version;
    j["model_type"] = m.model_type;
    j["hparams"] = m.hparams;
    j["quant"] = {{"dense", weight_format_name(m.dense_format)}, {"experts", weight_format_name(m.expert_format)}};
    j["resident"] = {{"tensors", m.tensors.size()}, {"bytes", pack.resident_bytes()}};
    json layers = json::array();
    for (const auto& l : m.expert_layers) layers.push_back(l.layer);
    j["experts"] = {{"layers", layers}, {"n_expert", m.n_expert}, {"expert_bytes", m.expert_bytes}, {"stride", m.expert_stride},
                    {"total_bytes", expert_total}};
    json files = json::array();
    for (const auto& f : m.files) files.push_back({{"path", f.path}, {"bytes", f.bytes}, {"xxh3", fmt::format("{:016x}", f.xxh3)}});
    j["files"] = files;
    if (a.tensors) {
      json tensors = json::array();
      for (const auto& t : m.tensors)
        tensors.push_back({{"name", t.name}, {"format", weight_format_name(t.format)}, {"shape", t.shape}, {"bytes", tensor_bytes(t)},
                           {"offset", t.data.offset}});
      j["tensors"] = tensors;
    }
    if (a.verify) j["verify"] = {{"ok", mismatches.empty()}, {"mismatches", mismatches}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("pack        %s (format version %d)\n", a.pack_dir.c_str(), m.format_version);
    std::printf("model_type  %s\n", m.model_type.c_str());
    std::string hp;
    for (const auto& [key, value] : m.hparams.items()) {
      std::string v = value.dump();
      if (value.is_array() && value.size() > 8) v = fmt::format("[{} entries]", value.size());
      hp += fmt::format("{}{}={}", hp.empty() ? "" : " ", key, v);
    }
    std::printf("hparams     %s\n", hp.c_str());
    std::printf("formats     dense %s, experts %s\n", weight_format_name(m.dense_format), weight_format_name(m.expert_format));
    std::printf("resident    %zu tensors, %s\n", m.tensors.size(), format_bytes(double(pack.resident_bytes())).c_str());
    if (!m.expert_layers.empty()) {
      std::printf("experts     %zu layers x %lld experts x stride %llu B = %s (%llu meaningful bytes each)\n", m.expert_layers.size(),
                  (long long)m.n_expert, (unsigned long long)m.expert_stride, format_bytes(double(expert_total)).c_str(),
                  (unsigned long long)m.expert_bytes);
      for (const auto& em : m.expert_matrices)
        std::printf("  %-10s %s [%lld, %lld] data @%llu +%llu%s\n", em.part.c_str(), weight_format_name(em.format), (long long)em.rows,
                    (long long)em.cols, (unsigned long long)em.data.offset, (unsigned long long)em.data.bytes,
                    em.scales.bytes ? fmt::format(", scales @{} +{}{}", em.scales.offset, em.scales.bytes,
                                                  em.biases.bytes ? fmt::format(", biases @{} +{}", em.biases.offset, em.biases.bytes) : "")
                                          .c_str()
                                    : "");
    }
    std::printf("files\n");
    for (const auto& f : m.files)
      std::printf("  %-32s %12s  xxh3 %016llx\n", f.path.c_str(), format_bytes(double(f.bytes)).c_str(), (unsigned long long)f.xxh3);
    if (a.tensors) {
      std::printf("tensors\n");
      for (const auto& t : m.tensors)
        std::printf("  %-56s %-4s %-14s %12s @%llu\n", t.name.c_str(), weight_format_name(t.format),
                    fmt::format("[{}]", fmt::join(t.shape, ", ")).c_str(), format_bytes(double(tensor_bytes(t))).c_str(),
                    (unsigned long long)t.data.offset);
    }
    if (a.verify && mismatches.empty())
      std::printf("verify      ok: every file and expert blob matches its hash\n");
  }
  if (!mismatches.empty()) {
    for (const auto& line : mismatches) std::fprintf(stderr, "moeflux inspect: mismatch: %s\n", line.c_str());
    std::fprintf(stderr, "moeflux inspect: %s: %zu hash mismatch%s (the pack is corrupt; reconvert it)\n", a.pack_dir.c_str(),
                 mismatches.size(), mismatches.size() == 1 ? "" : "es");
    return 1;
  }
  return 0;
}

}  // namespace

void register_inspect(CLI::App& app, Action& action) {
  auto args = std::make_shared<InspectArgs>();
  auto* sub = app.add_subcommand("inspect", "show what a pack holds: model, hyperparameters, formats, bytes, files");
  sub->add_option("pack", args->pack_dir, "pack directory")->required();
  sub->add_flag("--verify", args->verify, "re-hash every file and every expert blob; non-zero exit on any mismatch");
  sub->add_flag("--tensors", args->tensors, "list every resident tensor (name, format, shape, bytes, offset)");
  sub->add_flag("--json", args->json, "print JSON instead of text");
  sub->callback([args, &action] { action = [args] { return run_inspect(*args); }; });
}

}  // namespace moeflux::cli
