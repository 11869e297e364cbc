// fp32 kernels of the ai.solm ops, independent of onnxruntime (solm_ep.cc is the glue).
//
// Semantics: solm_compile/reference.py (quest_attention_ref, sparse_mlp_ref, gate_controls_ref). The kernels
// produce the same numbers up to float summation order; the *decisions* (which pages / channels are kept) follow
// the reference's arithmetic exactly (double-precision budget with the same -1e-9 guard, ties at the threshold kept).
//
// Work skipping:
//   QuestAttention, T == 1: per (row, KV head) the page min/max of the keys are computed once -- or, with a
//     carried PageState, only the pages the new tokens touch, so selection reads O(P·d) instead of all of K; per
//     query head (or per KV head, see QuestParams::per_kv_head) the page scores pick the pages; q·k, the softmax and
//     softmax·v then run over the kept (and mask-allowed) tokens only. Per (row, KV head) the union of its query
//     heads' kept tokens is streamed once, each head scoring the tokens it kept, so every K/V row is read once per
//     GQA group in every mode. Masked-out tokens are skipped in every mode.
//   QuestAttention on a KV cache buffer (QuestAttentionCache, kernels_attention_cache.cc): the new rows appended in
//     place (fp16 or fp32), decode reading the buffer where it lies (head stride C·d, fp16 widened by F16C).
//   QuestAttention, T > 1 (prefill): dense attention under the mask, blocked like flash attention
//     (kernels_attention_prefill.cc): per (row, KV head, tile of query positions x the GQA group's heads) the keys
//     in blocks of 64, an online softmax, and key blocks that the mask (or is_causal) hides from every row skipped.
//   SparseMLP: per token the top-k input channels are selected; gate/up accumulate one contiguous input-major
//     weight row per kept channel; the down projection accumulates one contiguous row per non-zero activation.
//     skip="h" (MlpWeights::skip_h): gate/up take every channel, then per token the top-k units of |h| are kept
//     (the same TopK rule) and the down projection reads only their rows.
//     Groups of 128 tokens that keep most of their channels (prefill) run as one GEMM per weight slice/panel, so a
//     weight tile is read once per 128 tokens; results stay bit-identical to running each token alone.
//
// No heap allocation on the hot path once warm: per-call buffers live in the caller's *Scratch (grown on demand,
// never shrunk) and per-item temporaries in thread-local buffers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace solm {

// Parallel-for hook: `launch(impl, n, fn, arg)` must call fn(arg, i) once for every i in [0, n) (any order, any
// threads) and return when all calls are done. A null launch runs serially.
struct Parallel {
  void (*launch)(void* impl, size_t n, void (*fn)(void*, size_t), void* arg) = nullptr;
  void* impl = nullptr;

  template <class F>
  void For(size_t n, F& f) const {
    if (n == 0) return;
    if (n == 1 || launch == nullptr) {
      for (size_t i = 0; i < n; ++i) f(i);
      return;
    }
    launch(impl, n, [](void* a, size_t i) { (*static_cast<F*>(a))(i); }, &f);
  }
};

// Work counters (relaxed atomics, summed over the process). Read through SolmEpGetStats() (solm_ep.cc) to check
// that work is really skipped. "dense" is what the unpruned op would have done.
struct Stats {
  std::atomic<uint64_t> attn_calls{0};
  std::atomic<uint64_t> attn_keys_scored{0};   // q·k dot products computed (per query head and query row)
  std::atomic<uint64_t> attn_keys_dense{0};    // L per query head and query row
  std::atomic<uint64_t> attn_kv_rows_read{0};  // distinct K (and V) rows read, once per GQA group and query row
                                               // (T > 1: once per GQA group and tile of query positions)
  std::atomic<uint64_t> attn_minmax_rows{0};   // K rows folded into page min/max (per KV head)
  std::atomic<uint64_t> mlp_calls{0};
  std::atomic<uint64_t> mlp_in_rows{0};        // gate/up input-major rows accumulated (per token)
  std::atomic<uint64_t> mlp_in_rows_dense{0};  // D per token
  // down rows accumulated (per token): each token's own kept units (SparseMLPBlocks skip="h": the non-zero ones).
  // At B > 1 / T > 1 the skip="h" union tile streams the union of a group's kept units once and gives the tokens
  // that dropped a unit coefficient 0: those zero terms are not counted, so this stays the per-token kept work
  // (the bytes streamed per group are the union's; the arithmetic the union times the group's tile).
  std::atomic<uint64_t> mlp_down_rows{0};
  std::atomic<uint64_t> mlp_down_rows_dense{0};  // I per token
  // SparseMLPBlocks skip="h" tokens at rho >= 1 that ran down's source-layout copy (down_dense): its non-zero
  // blocks' units (not in mlp_down_rows, which counts the transposed copy's rows)
  std::atomic<uint64_t> mlp_down_dense_rows{0};
};
Stats& GlobalStats();

// A mask broadcast to [B, H, T, L] through element strides (0 on broadcast dimensions).
struct MaskView {
  const void* data = nullptr;  // nullptr: no mask
  bool is_bool = true;         // bool (1 byte, true = attend) or float (additive)
  int64_t sb = 0, sh = 0, st = 0, sl = 0;
};

struct QuestParams {
  float scale = 0.f;
  int64_t page_size = 8;
  int64_t sinks = 0;
  int64_t window = 0;
  // false: pages are chosen per query head (reference semantics).
  // true: pages are chosen once per KV head from the page scores summed over the query heads of its GQA group;
  //       every head of the group then attends over the same token set (fewer distinct rows than the union of
  //       per-head sets). Not the reference's selection (it is a different, coarser policy); identical when H == Hkv.
  bool per_kv_head = false;
  // Multi-token calls only: also mask keys j > t (top-left aligned, like torch SDPA's is_causal). Single-token
  // steps ignore it (the KV cache already holds only the past).
  bool is_causal = false;
};

// The element-wise min and max of the keys of every page of S tokens, carried from step to step like the KV cache.
// k holds the past keys followed by the T new ones (L_past = L - T); only the pages of [L_past, L) are computed:
// the last, possibly partial, past page continues from its carried value (the same left fold, so the result is
// bit-identical to computing it from all of K), later pages start fresh. P_past = 0 (prefill, or a cache without
// state) computes every page. P = ceil(L/S), P_past = ceil(L_past/S) or 0.
// past_min/past_max may alias min/max when P_past == P: the pages are then updated in place.
//
// The buffer form (step protocol 2, stride > 0): min/max are [B, Hkv, stride, d] buffers of the KV cache's capacity in
// pages (stride = C/S), kept for the whole generation like the KV buffers; each row b folds only its new keys
// [L_b - T, L_b) in (L_b: KvView::lengths, its own valid rows), so rows of different lengths share a call. Pages at or
// beyond ceil(L_b/S) are never read. past_min/past_max: the buffers fed in (copied first when they are not min/max).
struct PageState {
  const float* past_min = nullptr;  // [B, Hkv, P_past, d] (buffer form: [B, Hkv, stride, d])
  const float* past_max = nullptr;
  int64_t P_past = 0;
  float* min = nullptr;  // [B, Hkv, P, d], written for every row (buffer form: [B, Hkv, stride, d])
  float* max = nullptr;
  int64_t stride = 0;  // 0: carried, tight pages; > 0: the buffer form, pages per (row, KV head)
  bool f16 = false;    // buffer form over an fp16 cache (step protocol 3): the four pointers hold IEEE halves,
                       // exactly the fp32 pages' values (a min or max of fp16 keys is one of them)
};

struct AttnScratch {
  std::vector<float> page_min, page_max;  // [B, Hkv, P, d] when no PageState output is given
  std::vector<float> kt;                  // multi-token calls: K transposed per block of keys
  std::vector<float> kf, vf;              // QuestAttentionCache, multi-token calls: the valid rows as fp32
  std::vector<int64_t> lens;              // QuestAttentionCache, single-token calls: each row's L_b after the append
  // single-token calls (kernels_attention.cc): per (row, KV head) item its rows and keep flags, its chunks, and
  // the chunks' partial softmax results
  std::vector<int32_t> idx, iota;
  std::vector<uint8_t> keep;
  std::vector<float> score;  // [B·Hkv, G, P] page scores
  std::vector<int64_t> nrow, first;
  std::vector<float> part;
  std::vector<float> rq, rk, rv, ro;     // QuestAttentionRope: rotated q, k, v by head, T > 1: out by head
};

// q [B,H,T,d], k [B,Hkv,L,d], v [B,Hkv,L,dv], kappa [B], out [B,H,T,dv]. state: nullptr (page min/max from all of
// K, for the rows that select) or the carried page state (min/max outputs may be null: then kept in scratch).
void QuestAttention(const float* q, const float* k, const float* v, const MaskView& mask, const float* kappa,
                    int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv,
                    const QuestParams& p, float* out, AttnScratch& scratch, const Parallel& par,
                    const PageState* state = nullptr);

// The keys and values a call reads: per (row, KV head) L rows of d (v: dv) elements, consecutive heads `stride`
// rows apart (stride = L: a tight [B,Hkv,L,d] tensor; the capacity C: a pre-allocated cache [B,Hkv,C,d]), as float
// or IEEE half (f16).
struct KvView {
  const void* k = nullptr;
  const void* v = nullptr;
  bool f16 = false;
  int64_t stride = 0;
  // Single-token steps: per row its valid rows L_b <= L (the call's L is their max), so rows of different lengths
  // share one call (step protocol 2); rows >= L_b are never read. nullptr: L for every row.
  const int64_t* lengths = nullptr;
};

// QuestAttention over a KvView, read in place. Single-token steps only unless the view is tight fp32 (the prefill
// path reads [B,Hkv,L,d] float tensors; QuestAttentionCache gathers one first).
void QuestAttentionView(const float* q, const KvView& kv, const MaskView& mask, const float* kappa, int64_t B,
                        int64_t H, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv, const QuestParams& p,
                        float* out, AttnScratch& scratch, const Parallel& par, const PageState* state = nullptr);

// QuestAttention with a pre-allocated KV cache (the op's buffer form): the T new rows k_new/v_new [B,Hkv,T,d]
// (float) are written at [past, past+T) of each head of the caches (float, or half rounded to nearest even), after
// copying the past rows [0, past) from past_k/past_v when those are other buffers (null or equal pointers: in
// place); then QuestAttention over the L = past + T valid rows. Caches [B,Hkv,C,d] (v: dv), C >= L.
struct KvCache {
  const void* past_k = nullptr;
  const void* past_v = nullptr;
  void* k = nullptr;  // the present caches (may equal past_k / past_v)
  void* v = nullptr;
  bool f16 = false;
  int64_t capacity = 0;  // C
  int64_t past = 0;      // valid rows before this call: the largest of the rows'
  const int64_t* lengths = nullptr;  // [B] each row's valid rows before this call (nullptr: past for every row);
                                     // multi-token calls need them equal
};
void QuestAttentionCache(const float* q, const float* k_new, const float* v_new, const KvCache& cache,
                         const MaskView& mask, const float* kappa, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                         int64_t d, int64_t dv, const QuestParams& p, float* out, AttnScratch& scratch,
                         const Parallel& par, const PageState* state = nullptr);

// QuestAttentionRope (kernels_attention_rope.cc): the packed projection qkv [B,T,(H+2Hkv)·d] (q, k, v heads side by
// side per token) split into heads, q and k rotated as ONNX RotaryEmbedding does (onnxruntime's CPU kernel: each
// output one fused multiply-add over the other product, rounded, so the values are bit-identical to the
// RotaryEmbedding nodes it replaces), then QuestAttentionCache; out [B,T,H·d]. cos/sin [B|1,T,d/2] (row_stride:
// floats between batch rows, 0 when broadcast). T == 1 writes out directly ([B,H,1,d] is [B,1,H·d]); T > 1 through
// scratch and one transpose.
struct Rotary {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t row_stride = 0;
  bool interleaved = false;  // pairs (2i, 2i+1); else halves (i, i+d/2)
};
void QuestAttentionRope(const float* qkv, const Rotary& rot, const KvCache& cache, const MaskView& mask,
                        const float* kappa, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t d,
                        const QuestParams& p, float* out, AttnScratch& scratch, const Parallel& par,
                        const PageState* state = nullptr);

// Pages kept for keep fraction kappa at KV length L and page size S (reference.page_budget).
int64_t PageBudget(double kappa, int64_t L, int64_t S);

enum class Act { kSilu, kGelu, kGeluTanh, kRelu };
bool ParseAct(const std::string& name, Act* act);

// MLP weights re-laid out input-major, so that a kept input channel is contiguous bytes and a skipped one is skipped
// bytes. gate/up: one row per input channel, the I outputs cut into slices of kSlice columns; row c holds, slice
// after slice, [gate slice | up slice] (each padded to a multiple of 64 floats), so a work item (one slice) streams
// one contiguous 2*kSlice-float segment (6 KiB) per kept channel. (The earlier layout, [ceil(I/256), D, 256]
// panels, made a kept channel a 1 KiB strip per panel: skipping half the strips saved almost no memory traffic.)
// down: [ceil(Dout/kPanel), I, kPanel] panels (the down projection is dense unless activations are exactly 0; a
// dense pass reads each panel front to back with its accumulators in registers). Unit i's weights are one contiguous
// row of kPanel floats per panel, so a unit whose activation is zero is skipped bytes: skip="h" (ρ keeps the
// ⌈ρ·I⌉ units of largest |h|, gate/up dense) zeroes the dropped units and the down pass never reads their rows.
struct MlpWeights {
  static constexpr int64_t kPanel = 256;
  static constexpr int64_t kSlice = 768;
  int64_t slice = kSlice;  // columns per slice (a multiple of 64; may be changed before Set)
  int64_t D = 0, I = 0, Dout = 0;
  bool gated = false;
  // The node's skip attribute: false "x" (ρ keeps input channels of gate/up), true "h" (ρ keeps units of h =
  // act(gate)·up; x is used whole). Not set by Set: the caller sets it (ort_kernels.cc, from the attribute).
  bool skip_h = false;
  int64_t parts = 1;      // 2 when gated (gate and up segments), else 1
  int64_t gu_stride = 0;  // floats per input-channel row of gu_t (an odd number of 64-byte lines)
  std::vector<float> gu_t;    // [D, gu_stride]: slice s at s*slice*parts: [gate cols | pad | up cols | pad]
  std::vector<float> down_t;  // [ceil(Dout/kPanel), I, kPanel]
  std::vector<float> b_gate, b_up, b_down;  // empty when absent

  int64_t Slices() const { return (I + slice - 1) / slice; }
  // columns of slice s, and its padded width (a multiple of 64 floats)
  int64_t SliceWidth(int64_t s) const { return std::min(slice, I - s * slice); }
  static int64_t Padded(int64_t w) { return (w + 63) / 64 * 64; }

  // From nn.Linear layout: w_gate/w_up [I, D], w_down [Dout, I]; any pointer except w_up/w_down may be null.
  void Set(const float* w_gate, const float* b_gate_, const float* w_up, const float* b_up_, const float* w_down,
           const float* b_down_, int64_t D_, int64_t I_, int64_t Dout_);
};

struct MlpScratch {
  std::vector<float> xs;        // [N, D] top-k-zeroed inputs
  std::vector<float> h;         // [N, I] activations
  std::vector<int32_t> uidx;    // [nblocks, D] union of kept channels per token block
  std::vector<int32_t> ucount;  // [nblocks]
};

// The MLP micro-kernel variant picked for this CPU: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2+FMA) or "baseline".
const char* MlpKernelIsa();

// ISA variants. Every SIMD kernel family is compiled as baseline x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4
// (AVX-512) and dispatched once per process through one table per family, picked by IsaLevel (kernels_util.h: the
// CPU, capped by SOLM_EP_ISA=baseline|x86-64-v3|x86-64-v4). Each call records the variant it ran, per family, so a
// test can check that the cap was honoured (c_api.cc: solm_ep_isa_report).
// kIsaMlpBlocksInt8: SparseMLPBlocks' int8-activation path, which also has an "x86-64-v4-vnni" variant (AVX512_VNNI
// vpdpbusd; picked when the CPU has it and SOLM_EP_ISA is unset or x86-64-v4-vnni: x86-64-v4 alone excludes VNNI).
enum IsaFamily {
  kIsaDecode = 0, kIsaPrefill = 1, kIsaMlp = 2, kIsaMlpBlocks = 3, kIsaMlpBlocksInt8 = 4, kIsaFamilies = 5
};
void NoteIsa(IsaFamily family, const char* isa);
// The variant `family` last ran in this process, or nullptr if it has not run.
const char* LastIsa(IsaFamily family);
// The variant IsaLevel picks (every family runs it): "baseline", "x86-64-v3" or "x86-64-v4".
const char* SelectedIsa();

// x [B,T,D] (N = B*T tokens), rho/bits [B], y [B,T,Dout].
void SparseMlp(const float* x, int64_t B, int64_t T, const MlpWeights& w, const float* rho, const float* bits,
               Act act, float* y, MlpScratch& scratch, const Parallel& par);

// SparseMLPBlocks (kernels_mlp_blocks.cc): one matrix W [N, K] as low-bit blocks, w = scale·code + offset per block of
// kBlock inputs, repacked block-column-major (block column b of all rows contiguous, rows in lane groups of kRows;
// see the file's header): a block column whose inputs are all zero is skipped without reading a byte of it.
struct BlockMatrix {
  static constexpr int64_t kBlock = 32;
  static constexpr int64_t kRows = 16;
  int64_t N = 0, K = 0, nb = 0, Np = 0;  // Np: N rounded up to kRows (padding rows have zero scale and offset)
  int bits = 4;                          // 4 (two codes a byte) or 8
  bool int8_layout = false;              // 4 bits, the int8-activation path's nibble order (kernels_mlp_blocks.cc)
  std::vector<uint8_t> codes;            // [nb, Np/kRows, GroupBytes()]
  std::vector<float> scale, offset;      // [nb, Np] (empty when half)
  // half: scale/offset held as IEEE half in scale_h/offset_h [nb, Np], which the int8-activation kernels read (a
  // GGUF's Q4_0/Q4_1/Q8_0 scales and minima are half already: 4 bytes a block instead of 8, the same values)
  bool half = false;
  std::vector<uint16_t> scale_h, offset_h;
  int64_t GroupBytes() const { return kBlock * bits / 8 * kRows; }
  // From the op's operands: codes [N, K/32, 32·bits/8] (4 bits: input 2j low nibble, 2j+1 high), scale/offset
  // [N, K/32]. int8: for the int8-activation kernels (4 bits: int8_layout; scale/offset in half when every value
  // is exactly a half).
  void Set(const uint8_t* codes, const float* scale, const float* offset, int64_t N, int64_t K, int bits,
           bool int8 = false);
};

// SparseMLPBlocks with skip="h" (kernels_mlp_blocks_h.cc): the down projection given transposed, downT [I, D] as
// blocks of 32 along D, stored unit-major: unit j's codes are one contiguous run of nb blocks (32 bytes a block at
// 8 bits; 16 at 4 bits, re-paired so byte i holds output i in the low nibble and output i+16 in the high one), its
// scales and offsets one run each. A unit h does not keep is never read: not a byte of its rows.
struct BlockRows {
  static constexpr int64_t kBlock = 32;
  int64_t I = 0, D = 0, nb = 0;
  int bits = 8;
  std::vector<uint8_t> codes;        // [I, nb, CodeBytes()]
  std::vector<float> scale, offset;  // [I, nb]
  int64_t CodeBytes() const { return kBlock * bits / 8; }
  int64_t RowBytes() const { return nb * CodeBytes(); }
  // From the op's operands: codes [I, D/32, 32·bits/8] (4 bits: output 2j low nibble, 2j+1 high), scale/offset
  // [I, D/32].
  void Set(const uint8_t* codes, const float* scale, const float* offset, int64_t I, int64_t D, int bits);
};

// skip="h" with int8 activations: down's 4-bit source-layout copy regrouped so that one unit's codes are contiguous
// (kernels_mlp_blocks_hg.cc). Units go in groups of 32 (the source's blocks along I): per group g and unit u, the
// codes of every output row, 128 rows a tile, 64 bytes a tile (byte i: row 128k+i low nibble, row 128k+64+i high);
// per group the source's scale and offset of every row, in the kernel's accumulator order. Lossless: the same
// codes, scales and offsets as the source blocks, so y = Σ_g scale·(d_g·Σ_kept q·code) + offset·Σ_kept h, the
// source's int8 dot product on the masked h, reading only the kept units' codes (and each group's scales once).
struct DownGroups {
  static constexpr int64_t kTile = 128;
  int64_t I = 0, D = 0, Dp = 0, G = 0;  // Dp: D rounded up to kTile (padding rows: code 0, scale 0, offset 0)
  std::vector<uint8_t> codes;           // [G, 32, Dp/2]
  std::vector<float> scale, offset;     // [G, Dp] in accumulator order (kernels_mlp_blocks_hg.cc)
  // the same as IEEE half when every value round-trips (a GGUF's d and m always do): half the scale bytes, the same
  // floats (then scale/offset are empty)
  std::vector<uint16_t> scale_h, offset_h;
  bool half() const { return !scale_h.empty(); }
  bool empty() const { return codes.empty(); }
  int64_t UnitBytes() const { return Dp / 2; }
  // From the source operands: codes [D, I/32, 16] (4 bits: input 2j low nibble), scale/offset [D, I/32].
  void Set(const uint8_t* codes, const float* scale, const float* offset, int64_t D, int64_t I);
};

struct MlpBlockWeights {
  bool gated = false;
  // skip="h": ρ keeps units of h (gate/up dense), down is down_t (BlockRows) and `down` is unused.
  bool skip_h = false;
  BlockRows down_t;
  // skip="h" with down also in its source layout (`down`): tokens whose rho >= 1 run the skip="x" down on all of h
  bool down_dense = false;
  // ... and under activations="int8" with a 4-bit copy, that copy regrouped (DownGroups): rows at rho < 1 then run
  // the source's down on their masked h too, reading only the kept units (reference.sparse_mlp_blocks_h_ref)
  DownGroups down_g;
  int64_t Dout() const { return skip_h ? down_t.D : down.N; }
  // Activations: false = fp32 (exact: Σ x·w in fp32); true = int8 per block of 32 (the op's activations="int8",
  // reference.sparse_mlp_blocks_ref: x and h quantised per block, sx = max|x|/127, round half to even; integer dot
  // products with the codes, the offset term on the fp32 block sums). Set before the matrices (their layout).
  bool int8 = false;
  BlockMatrix gate, up, down;               // gate/up [I, D], down [Dout, I]
  std::vector<float> b_gate, b_up, b_down;  // empty when absent
};

// One token's kept units of h prepared for DownGroups (kernels_mlp_blocks_hg.cc, PrepareDownG): runs of kept units
// by group of 32 (ascending), each with d and the masked block sum; the q bytes of the units packed
// 4 to a word (quads padded with q = 0 and the run's last unit), and per slot the unit whose codes are loaded.
struct DownGToken {
  struct Run {
    int64_t g, first, count;
    float d, hsum;
  };
  std::vector<Run> runs;
  std::vector<int32_t> qw, unit;
};

struct MlpBlockScratch {
  std::vector<float> xs, xsum, h, hsum, y;
  std::vector<uint8_t> xnz, hnz;
  std::vector<int8_t> xq, hq;  // int8 activations: the quantised x and h, [N, D] / [N, I]
  std::vector<float> xd, hd;   // and their per-block scales, [N, D/32] / [N, I/32]
  std::vector<int32_t> hidx;   // skip="h": each token's kept units, [N, I] (the first hcount[n])
  std::vector<int64_t> hcount;  // [N]
  std::vector<int32_t> hunion;  // skip="h", per group of BlockHKernels::tile tokens: the union of their kept units
  std::vector<float> hcoef;     // and its coefficients [units, tile] (0 where a token dropped the unit)
  std::vector<int64_t> hnunion, hjobs;  // the union's size per group (-1: per token), the down pass's work items
  std::vector<DownGToken> hg;           // skip="h" on DownGroups: each token's prepared kept units, [N]
};

// The variant the block kernels run here ("x86-64-v4", "x86-64-v3" or "baseline"); the int8-activation kernels'
// (the same, or "x86-64-v4-vnni").
const char* MlpBlocksKernelIsa();
const char* MlpBlocksInt8KernelIsa();

// x [B,T,D], rho/bits [B], y [B,T,Dout]: SparseMlp's semantics on the dequantised weights (D and I multiples of 32).
void SparseMlpBlocks(const float* x, int64_t B, int64_t T, const MlpBlockWeights& w, const float* rho,
                     const float* bits, Act act, float* y, MlpBlockScratch& scratch, const Parallel& par);


// LinearBlocks (kernels_mlp_blocks.cc): y [n, N] = x [n, K] · Wᵀ (+ bias) for one dense low-bit projection W (a
// BlockMatrix: the same layout, row kernels and ISA families as SparseMLPBlocks' gate/up, kIsaMlpBlocks /
// kIsaMlpBlocksInt8). int8: x quantised per block of 32 (W must then be laid out with int8_layout). Work items are
// chunks of output rows (x tiles of up to 32 tokens); every row is computed the same whatever the split, so results
// are bit-identical across thread counts, and a token's row the same at n = 1 and n > 1.
struct LinearBlockScratch {
  std::vector<float> xsum, xd, y;
  std::vector<uint8_t> xnz;
  std::vector<int8_t> xq;
};
void LinearBlocks(const float* x, int64_t n, const BlockMatrix& W, bool int8, const float* bias, float* y,
                  LinearBlockScratch& scratch, const Parallel& par);

}  // namespace solm
