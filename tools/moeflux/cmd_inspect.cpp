// PLACEHOLDER until the inspect command lands.
#include "commands.hpp"
namespace moeflux::cli {
void register_inspect(CLI::App& app, Action& action) {
  auto* sub = app.add_subcommand("inspect", "(not yet implemented)");
  sub->callback([&action] { action = [] { std::fprintf(stderr, "moeflux inspect: not implemented\n"); return 1; }; });
}
}  // namespace moeflux::cli
