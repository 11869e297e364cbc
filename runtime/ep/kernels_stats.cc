// The process-wide work counters (GlobalStats) and the ISA each kernel family last ran (NoteIsa, LastIsa); see
// kernels.h.
#include "kernels_util.h"

namespace solm {

Stats& GlobalStats() {
  static Stats stats;
  return stats;
}

namespace {
std::atomic<const char*> g_last_isa[kIsaFamilies];
}  // namespace

void NoteIsa(IsaFamily family, const char* isa) { g_last_isa[family].store(isa, std::memory_order_relaxed); }
const char* LastIsa(IsaFamily family) { return g_last_isa[family].load(std::memory_order_relaxed); }
const char* SelectedIsa() { return IsaName(IsaLevel()); }

}  // namespace solm
