// PLACEHOLDER until the logits command lands.
#include "commands.hpp"
namespace moeflux::cli {
void register_logits(CLI::App& app, Action& action) {
  auto* sub = app.add_subcommand("logits", "(not yet implemented)");
  sub->callback([&action] { action = [] { std::fprintf(stderr, "moeflux logits: not implemented\n"); return 1; }; });
}
}  // namespace moeflux::cli
