// Sink decode attention over a paged pre-RoPE KV cache, for CPUs.
//
// One query per request (its last token, absolute index t = seq_len - 1). It
// attends to sink keys 0 .. min(S, t+1)-1 and window keys max(S, t-W+1) .. t
// (docs/architecture.md §1). The query stays unrotated; each key is rotated once,
// while it is read, by minus its distance to the query in rank space:
// t - j for a window key j, min(t, S+W-1) - i for sink i. Distances lie in
// [0, S+W), so the cos/sin table is never read past S+W-1.
//
// Built at run time by cpu_kernel.py (gcc -O3 -march=native -fopenmp) and
// called through ctypes; torch_path.py is the reference it is tested against.
// Work is split over (request, KV head). Keys are visited TILE at a time in
// one pass with a running softmax (as in flash attention), so each K/V row is
// read once. Hot loops use GCC vector extensions (8 floats, lowered to the
// machine's SIMD) with accumulators held in registers. Scratch comes from the
// caller (sink_scratch_floats floats, one slice per thread; the metadata
// builder allocates it once), so a call allocates nothing.
//
// Layouts: query/out [B, Hq, D], D a multiple of 8, heads contiguous, any
// row stride; kv_cache [blocks, Hkv, bs, 2*D] (keys then values; any strides
// but the last dim's, which is 1); all three in float32, bfloat16 or float16
// (each its own); block_table [B, row_stride] int32; seq_lens [B] int32;
// cos_sin [positions, R] float32 (cos in the first R/2 columns, sin after).

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

// float16 needs the compiler's _Float16 (gcc >= 12 on x86, any on ARM);
// without it the Python side keeps float16 on the torch path.
#ifdef __FLT16_MAX__
typedef _Float16 half_t;
int sink_has_float16(void) { return 1; }
#else
typedef uint16_t half_t;
int sink_has_float16(void) { return 0; }
#endif
enum { TILE = 32 };      // keys per step of the running softmax
enum { PREFETCH = 16 };  // keys ahead whose K/V rows are prefetched

typedef float v8f __attribute__((vector_size(32), aligned(4)));
#define V8(p) (*(v8f *)(p))

typedef struct {
  int64_t batch, num_heads, num_kv_heads, head_size, block_size, row_stride;
  int64_t block_stride, head_stride, slot_stride;  // kv_cache, in elements
  int64_t query_stride, out_stride;                // rows, in elements
  int64_t rotary_dim, neox, sink, window, zero_sink, num_threads;
  int64_t dtype, query_dtype, out_dtype;
  float scale;
} DecodeShape;

// Row of n elements at src as float32: src itself, or converted into buf.
static const float *load_row(float *buf, const void *src, int64_t n,
                             int64_t dtype) {
  if (dtype == DTYPE_F32) return src;
  if (dtype == DTYPE_BF16) {
    const uint16_t *p = src;
    for (int64_t i = 0; i < n; i++) {
      uint32_t bits = (uint32_t)p[i] << 16;
      memcpy(buf + i, &bits, sizeof bits);
    }
  } else {
    const half_t *p = src;
    for (int64_t i = 0; i < n; i++) buf[i] = (float)p[i];
  }
  return buf;
}

// Store n floats at dst in dtype (round to nearest even for 16-bit).
static void store_row(void *dst, const float *x, int64_t n, int64_t dtype) {
  if (dtype == DTYPE_F32) {
    memcpy(dst, x, sizeof(float) * n);
  } else if (dtype == DTYPE_BF16) {
    uint16_t *p = dst;
    for (int64_t i = 0; i < n; i++) {
      uint32_t bits;
      memcpy(&bits, x + i, sizeof bits);
      p[i] = isnan(x[i]) ? 0x7fc0 : (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    }
  } else {
    half_t *p = dst;
    for (int64_t i = 0; i < n; i++) p[i] = (half_t)x[i];
  }
}

static inline int64_t elem_size(int64_t dtype) {
  return dtype == DTYPE_F32 ? 4 : 2;
}

// Element offset of the K/V row of stream position pos, KV head h.
static inline int64_t kv_offset(const int32_t *row, int64_t pos, int64_t h,
                                const DecodeShape *s) {
  return (int64_t)row[pos / s->block_size] * s->block_stride +
         h * s->head_stride + (pos % s->block_size) * s->slot_stride;
}

// Hint a K/V row into cache: the rows of a block are contiguous but blocks
// are scattered, so the hardware prefetcher loses the stream at each block.
static inline void prefetch_row(const char *p, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(p + byte);
}

// out = x rotated by the angle of -distance (cs = that distance's table row).
static inline void rotate_back(float *restrict out, const float *restrict x,
                               const float *restrict cs, const DecodeShape *s) {
  const int64_t half = s->rotary_dim / 2;
  const float *restrict cosv = cs, *restrict sinv = cs + half;
  if (s->neox) {
    for (int64_t i = 0; i < half; i++) {
      out[i] = x[i] * cosv[i] + x[i + half] * sinv[i];
      out[i + half] = x[i + half] * cosv[i] - x[i] * sinv[i];
    }
  } else {
    for (int64_t i = 0; i < half; i++) {
      out[2 * i] = x[2 * i] * cosv[i] + x[2 * i + 1] * sinv[i];
      out[2 * i + 1] = x[2 * i + 1] * cosv[i] - x[2 * i] * sinv[i];
    }
  }
  for (int64_t d = s->rotary_dim; d < s->head_size; d++) out[d] = x[d];
}

static inline float dot(const float *a, const float *b, int64_t D) {
  v8f s0 = {0}, s1 = {0};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    s0 += V8(a + d) * V8(b + d);
    s1 += V8(a + d + 8) * V8(b + d + 8);
  }
  if (d < D) s0 += V8(a + d) * V8(b + d);
  s0 += s1;
  float sum = 0.f;
  for (int i = 0; i < 8; i++) sum += s0[i];
  return sum;
}

// o [D] += sum over n of p[n] * rows[n] [D]; 64 outputs at a time in registers.
static inline void add_weighted(float *o, const float *p,
                                const float *const *rows, int64_t n_rows,
                                int64_t D) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    v8f a[8];
    for (int i = 0; i < 8; i++) a[i] = V8(o + d + 8 * i);
    for (int64_t n = 0; n < n_rows; n++) {
      const float *r = rows[n] + d;
      for (int i = 0; i < 8; i++) a[i] += p[n] * V8(r + 8 * i);
    }
    for (int i = 0; i < 8; i++) V8(o + d + 8 * i) = a[i];
  }
  for (; d < D; d += 8) {
    v8f a = V8(o + d);
    for (int64_t n = 0; n < n_rows; n++) a += p[n] * V8(rows[n] + d);
    V8(o + d) = a;
  }
}

// exp(x) for x <= 0 to ~1e-7 relative, in a form the compiler inlines and
// vectorizes (libm's expf is a call): x = n*ln2 + r, |r| <= ln2/2, exp(r) by
// the Cephes degree-6 polynomial, 2^n by building the float's exponent.
// x < -87 gives ~1e-38, which is 0 for a softmax weight.
static inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = floorf(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Floats of scratch one (request, KV head) task needs: weights [G][TILE],
// running max and sum [G], a converted key [D], the rotated key [D], converted
// values [TILE][D] (16-bit caches only), the queries and the outputs [G][D].
static int64_t task_floats(const DecodeShape *s) {
  const int64_t D = s->head_size, G = s->num_heads / s->num_kv_heads;
  return G * TILE + 2 * G + (2 + TILE + 2 * G) * D;
}

// Floats of the scratch buffer sink_decode takes: one task's per thread.
int64_t sink_scratch_floats(const DecodeShape *s) {
  return s->num_threads * task_floats(s);
}

// Attention of request b's query heads that share KV head h, using the
// scratch floats at weights (task_floats(s) of them, this thread's own).
static void attend_one(const char *query, const char *kv_cache,
                       const int32_t *block_table, const int32_t *seq_lens,
                       const float *cos_sin, const DecodeShape *s, char *out,
                       float *weights, int64_t b, int64_t h) {
  const int64_t D = s->head_size, G = s->num_heads / s->num_kv_heads;
  const int64_t elem = elem_size(s->dtype);
  const int64_t t = (int64_t)seq_lens[b] - 1;
  const int64_t num_sink = t + 1 < s->sink ? t + 1 : s->sink;
  const int64_t win_first =
      t - s->window + 1 > s->sink ? t - s->window + 1 : s->sink;
  const int64_t K = num_sink + (t >= win_first ? t - win_first + 1 : 0);
  const int64_t span = s->sink + s->window;
  const int64_t sink_rank = t < span - 1 ? t : span - 1;
  const int64_t head0 = (b * s->query_stride + h * G * D);
  const int32_t *row = block_table + b * s->row_stride;

  float *run_max = weights + G * TILE, *run_sum = run_max + G;
  float *key_buf = run_sum + G, *rotated = key_buf + D, *value_buf = rotated + D;
  float *q = value_buf + TILE * D, *o = q + G * D;
  const float *q_row = load_row(
      q, query + elem_size(s->query_dtype) * head0, G * D, s->query_dtype);
  if (q_row != q) memcpy(q, q_row, sizeof(float) * G * D);
  const float *values[TILE];
  for (int64_t g = 0; g < G; g++) {
    run_max[g] = s->zero_sink ? 0.f : -INFINITY;  // the zero logit counts
    run_sum[g] = 0.f;
  }
  memset(o, 0, sizeof(float) * G * D);

  for (int64_t first = 0; first < K; first += TILE) {
    const int64_t n_keys = K - first < TILE ? K - first : TILE;
    for (int64_t n = 0; n < n_keys; n++) {
      const int64_t k = first + n;
      const int64_t pos = k < num_sink ? k : win_first + (k - num_sink);
      const int64_t dist = k < num_sink ? sink_rank - k : t - pos;
      if (k + PREFETCH < K) {
        const int64_t ahead = k + PREFETCH;
        const int64_t pos_ahead =
            ahead < num_sink ? ahead : win_first + (ahead - num_sink);
        prefetch_row(kv_cache + elem * kv_offset(row, pos_ahead, h, s),
                     2 * D * elem);
      }
      const char *kv_row = kv_cache + elem * kv_offset(row, pos, h, s);
      rotate_back(rotated, load_row(key_buf, kv_row, D, s->dtype),
                  cos_sin + dist * s->rotary_dim, s);
      for (int64_t g = 0; g < G; g++)
        weights[g * TILE + n] = dot(q + g * D, rotated, D) * s->scale;
      values[n] = load_row(value_buf + n * D, kv_row + elem * D, D, s->dtype);
    }
    for (int64_t g = 0; g < G; g++) {
      float *w = weights + g * TILE;
      float tile_max = run_max[g];
      for (int64_t n = 0; n < n_keys; n++) tile_max = w[n] > tile_max ? w[n] : tile_max;
      float total = 0.f;
      for (int64_t n = 0; n < n_keys; n++) {
        w[n] = exp_nonpositive(w[n] - tile_max);
        total += w[n];
      }
      const float rescale = exp_nonpositive(run_max[g] - tile_max);
      run_sum[g] = run_sum[g] * rescale + total;
      run_max[g] = tile_max;
      float *og = o + g * D;
      if (rescale != 1.f)
        for (int64_t d = 0; d < D; d++) og[d] *= rescale;
      add_weighted(og, w, values, n_keys, D);
    }
  }
  for (int64_t g = 0; g < G; g++) {
    // zero_sink: exp(0 - max) joins the denominator (a zero logit, zero value)
    const float total =
        run_sum[g] + (s->zero_sink ? exp_nonpositive(-run_max[g]) : 0.f);
    for (int64_t d = 0; d < D; d++) o[g * D + d] /= total;
  }
  const int64_t out0 = b * s->out_stride + h * G * D;
  store_row(out + elem_size(s->out_dtype) * out0, o, G * D, s->out_dtype);
}

// Entry point. scratch holds sink_scratch_floats(s) floats, allocated by the
// caller once (not per request, head and layer); thread i uses slice i.
void sink_decode(const void *query, const void *kv_cache,
                 const int32_t *block_table, const int32_t *seq_lens,
                 const float *cos_sin, const DecodeShape *s, void *out,
                 float *scratch) {
  const int64_t per_task = task_floats(s);
#pragma omp parallel for collapse(2) schedule(static) num_threads(s->num_threads)
  for (int64_t b = 0; b < s->batch; b++)
    for (int64_t h = 0; h < s->num_kv_heads; h++)
      attend_one(query, kv_cache, block_table, seq_lens, cos_sin, s, out,
                 scratch + omp_get_thread_num() * per_task, b, h);
}

typedef struct {
  int64_t num_tokens, num_kv_heads, head_size, block_size;
  int64_t block_stride, head_stride, slot_stride;  // kv_cache, in elements
  int64_t key_stride, value_stride;                // token rows, in elements
  int64_t elem;                                    // bytes per element
} WriteShape;

// Store token i's pre-RoPE key and value rows [Hkv, D] at slot slots[i] (a
// block * block_size + offset); slots < 0 are padding and skipped. Caller
// guarantees key, value and cache share one dtype.
void sink_write_kv(const char *key, const char *value, char *kv_cache,
                   const int64_t *slots, const WriteShape *s) {
  const int64_t row_bytes = s->head_size * s->elem;
  for (int64_t i = 0; i < s->num_tokens; i++) {
    if (slots[i] < 0) continue;
    const int64_t block = slots[i] / s->block_size, at = slots[i] % s->block_size;
    for (int64_t h = 0; h < s->num_kv_heads; h++) {
      char *dst = kv_cache + s->elem * (block * s->block_stride +
                                        h * s->head_stride + at * s->slot_stride);
      memcpy(dst, key + s->elem * (i * s->key_stride + h * s->head_size), row_bytes);
      memcpy(dst + row_bytes,
             value + s->elem * (i * s->value_stride + h * s->head_size), row_bytes);
    }
  }
}
