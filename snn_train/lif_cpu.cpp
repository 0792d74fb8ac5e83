// The LIF layer on the CPU in one pass per direction: each thread walks a block of neurons through all T steps,
// keeping v and i in a small local array, so every input and output element is read or written once.
//
// One step, as neurons.lif_step (Norse's equations), in the same order of IEEE operations as the torch kernel, so
// spikes are bit-identical (built with -ffp-contract=off, no fast-math; -fno-math-errno and -fno-trapping-math let
// the backward loop vectorize and change no value):
//     i ← i + I
//     v_pre = v + ((v_leak − v) + i)·a          a = dt·τm⁻¹
//     i ← i − i·b                               b = dt·τs⁻¹
//     z = Θ(v_pre − v_th)
//     v ← z ? v_reset : v_pre
// Backward recomputes v_pre from the currents (nothing else is kept) and runs the pass through time in reverse:
//     g_z = g_spike + g_v·(v_reset − v_pre);  g_vpre = g_v·(v_pre ≤ v_th) + g_z·σ'(v_pre − v_th)
//     g_i ← g_i·(1 − b) + a·g_vpre  (= the gradient of this step's current);  g_v ← g_vpre·(1 − a)
// With pool > 1 the spikes are max-pooled over p×p windows as they are made (torch's max_pool2d: a window's output is
// its largest spike, its gradient goes to the first largest in row-major order), so the full spikes are never stored.
// Plain C entry points (called through ctypes): no torch headers, so the first build takes about a second.

#include <cmath>
#include <cstdint>
#include <omp.h>

#include <cstring>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;  // neurons per block: the state of a block stays in L1

enum DType { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };
enum Surrogate { kSuper = 0, kTanh = 1, kTriangle = 2, kCirc = 3, kErfc = 4, kAtan = 5 };

struct BFloat16 {
    uint16_t bits;
};

inline float to_state(float x) { return x; }
inline double to_state(double x) { return x; }
inline float to_state(BFloat16 x) {
    uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
    float y;
    std::memcpy(&y, &bits, sizeof y);
    return y;
}

inline void store(float& out, float x) { out = x; }
inline void store(double& out, double x) { out = x; }
inline void store(BFloat16& out, float x) {  // round to nearest, ties to even, as torch does; NaN stays NaN
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    out.bits = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

template <typename S>
struct Constants {
    S a, b, v_leak, v_th, v_reset, alpha;
};

// e^x for x ≤ 0 in float32 as plain arithmetic, which the compiler vectorizes (a call of std::exp or std::tanh keeps
// the backward loop scalar): e^x = 2^n·e^r with n = x/ln 2 rounded to the nearest integer and r = x − n·ln 2 in
// [−ln 2/2, ln 2/2] (ln 2 in two parts, so that n·ln 2's leading part is exact), e^r by its Taylor series to r⁷
// (r⁸/8! < 7e-9 relative: below float32's rounding), 2^n written into the exponent bits. Below −60 the result is
// 0 instead of a number under 1e-26, whose products with gradients reach float32's subnormal numbers, which x86
// computes with slowly. float64 state keeps std::exp.
template <typename S>
inline S exp_nonpositive(S x) {
    if constexpr (std::is_same_v<S, float>) {
        const bool negligible = x < -60.0f;
        x = negligible ? 0.0f : x;
        const float shift = 12582912.0f;  // 1.5·2²³: adding it and taking it away again rounds to an integer
        const float n = (x * 1.44269504f + shift) - shift;
        const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 = 0.693359375 − 2.12194440e-4
        float p = 1.0f / 5040;
        p = p * r + 1.0f / 720;
        p = p * r + 1.0f / 120;
        p = p * r + 1.0f / 24;
        p = p * r + 1.0f / 6;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
        float scale;
        std::memcpy(&scale, &bits, sizeof scale);
        return negligible ? 0.0f : p * scale;
    } else {
        return std::exp(x);
    }
}

// d spike / d x at x = v_pre − v_th: surrogates.py's formulas.
template <int Kind, typename S>
inline S surrogate(S x, S alpha) {
    const S pi = S(3.14159265358979323846);
    if constexpr (Kind == kSuper) {
        S d = alpha * std::fabs(x) + S(1);
        return S(1) / (d * d);
    } else if constexpr (Kind == kTanh) {
        // 1 − tanh²(αx) = 4e/(1 + e)² with e = e^(−2|αx|)
        S e = exp_nonpositive(S(-2) * std::fabs(alpha * x));
        return S(4) * e / ((S(1) + e) * (S(1) + e));
    } else if constexpr (Kind == kTriangle) {
        S d = S(1) - std::fabs(x);
        return alpha * (d > S(0) ? d : S(0));
    } else if constexpr (Kind == kCirc) {
        S s = alpha * alpha + x * x;
        return alpha * alpha * alpha / (s * std::sqrt(s));
    } else if constexpr (Kind == kErfc) {
        S y = alpha * x;
        return alpha / std::sqrt(pi) * exp_nonpositive(-(y * y));
    } else {
        S y = pi / S(2) * alpha * x;
        return alpha / S(2) / (S(1) + y * y);
    }
}

// One step's N values in memory as [outer, H, W, inner], cut into blocks a thread takes whole: without pooling, runs
// of kBlock values; with p×p pooling, the p rows of one output row (H and W are multiples of p).
struct Layout {
    int64_t N, W, inner, pool;

    int64_t blocks() const { return pool == 1 ? (N + kBlock - 1) / kBlock : N / (pool * W * inner); }
    int64_t block_length() const { return pool == 1 ? kBlock : pool * W * inner; }
    int64_t start(int64_t block) const { return block * block_length(); }
    int64_t length(int64_t block) const {
        const int64_t rest = N - start(block);
        return rest < block_length() ? rest : block_length();
    }
    int64_t pooled_per_block() const { return W / pool * inner; }  // outputs of a block (with pooling)
    int64_t pooled() const { return N / (pool * pool); }           // outputs of a step (with pooling)
    // Offset in a block of its row dh, column w, inner index c.
    int64_t at(int64_t dh, int64_t w, int64_t c) const { return (dh * W + w) * inner + c; }
};

int threads_for(int64_t blocks, int threads) { return static_cast<int>(blocks < threads ? blocks : threads); }

// Consecutive arrays in one thread's part of a work space; with no base it only counts the bytes they need.
struct Slab {
    char* base;
    std::size_t used = 0;

    template <typename X>
    X* take(int64_t n) {
        X* array = base ? reinterpret_cast<X*>(base + used) : nullptr;
        used += (n * sizeof(X) + 63) / 64 * 64;
        return array;
    }
};

// Runs body(slab) on each of ``threads`` OpenMP threads, each slab laid out by carve(slab) in a work space the
// calling thread allocates: an OpenMP thread's own allocations come from a malloc arena that returns freed memory to
// the kernel, to be faulted in afresh at the next call.
template <typename Carve, typename Body>
void in_parallel(int threads, Carve carve, Body body) {
    Slab probe{nullptr};
    carve(probe);
    const std::unique_ptr<char[]> space(new char[probe.used * threads]);
#pragma omp parallel num_threads(threads)
    {
        Slab slab{space.get() + probe.used * omp_get_thread_num()};
        body(slab);
    }
}

// Steps 0..T-1 of the block's neurons [n0, n0+len) from rest: calls keep(t, k, v_pre, drive, v_post) for each neuron
// at each step, where drive = (v_leak − v) + i is d v_pre / d a, and stepped(t) once each step is done.
template <typename In, typename S, typename Keep, typename Stepped>
inline void run_block(const In* currents, int64_t step_stride, int64_t T, int64_t n0, int64_t len,
                      const Constants<S>& constants, S* v, S* i, Keep keep, Stepped stepped) {
    const Constants<S> c = constants;  // in registers: the compiler cannot tell that outputs do not alias it
    for (int64_t k = 0; k < len; ++k) {
        v[k] = c.v_leak;
        i[k] = S(0);
    }
    for (int64_t t = 0; t < T; ++t) {
        const In* current = currents + t * step_stride + n0;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
            S i_in = i[k] + to_state(current[k]);
            S drive = (c.v_leak - v[k]) + i_in;
            S pre = v[k] + drive * c.a;
            i[k] = i_in - i_in * c.b;
            S post = pre > c.v_th ? c.v_reset : pre;
            v[k] = post;
            keep(t, k, pre, drive, post);
        }
        stepped(t);
    }
}

// A block's pooled spikes at one step, from its spikes z (0 or 1) in block order; ``any`` is scratch space for
// ``inner`` values.
template <typename In, typename S>
inline void pool_block(const Layout& g, const S* z, In* pooled, int32_t* any) {
    const int64_t p = g.pool, inner = g.inner;
    for (int64_t wo = 0; wo < g.W / p; ++wo) {
        for (int64_t c = 0; c < inner; ++c) any[c] = 0;
        for (int64_t r = 0; r < p * p; ++r) {
            const S* window = z + g.at(r / p, wo * p + r % p, 0);
#pragma omp simd
            for (int64_t c = 0; c < inner; ++c) any[c] |= window[c] > S(0);
        }
        for (int64_t c = 0; c < inner; ++c) store(pooled[wo * inner + c], any[c] ? S(1) : S(0));
    }
}

// The spikes' gradient in block order at one step from the pooled one: each window's to its first spiking neuron in
// row-major order, or to its first neuron if none spiked, as max_pool2d's backward; every other neuron's is zero.
// ``found`` is scratch space for ``inner`` values. (Integer masks and unconditional loads: the loops vectorize.)
template <typename In, typename S>
inline void unpool_block(const Layout& g, const S* pre, S v_th, const In* grad_pooled, S* grad, int32_t* found) {
    const int64_t p = g.pool, inner = g.inner;
    for (int64_t wo = 0; wo < g.W / p; ++wo) {
        const In* g_window = grad_pooled + wo * inner;
        for (int64_t c = 0; c < inner; ++c) found[c] = 0;
        for (int64_t r = 0; r < p * p; ++r) {
            const int64_t base = g.at(r / p, wo * p + r % p, 0);
#pragma omp simd
            for (int64_t c = 0; c < inner; ++c) {
                const int32_t spiked = pre[base + c] > v_th, before = found[c];
                const S g_c = to_state(g_window[c]);
                grad[base + c] = (spiked & ~before) ? g_c : S(0);  // the window's first spike
                found[c] = spiked | before;
            }
        }
        const int64_t first = g.at(0, wo * p, 0);
#pragma omp simd
        for (int64_t c = 0; c < inner; ++c) {
            const S g_c = to_state(g_window[c]), assigned = grad[first + c];
            grad[first + c] = found[c] ? assigned : g_c;  // no spike in the window: its first neuron
        }
    }
}

// The number of spikes among a block's len values z (each 0 or 1) at one step.
template <typename S>
inline double block_spikes(const S* z, int64_t len) {
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < len; ++k) sum += static_cast<double>(z[k]);
    return sum;
}

// Spikes [T, N], or with pooling [T, N/p²], and post-reset voltages [T, N] if Record; if ``count`` is not null, the
// number of spikes made (before pooling) added to it.
template <bool Record, typename In, typename S>
void forward(const In* currents, int64_t step_stride, int64_t T, const Layout& g, In* spikes, S* voltages,
             double* count, const Constants<S>& c, int threads) {
    const int64_t blocks = g.blocks(), N = g.N, outputs = g.pool == 1 ? N : g.pooled();
    const int64_t per_block = g.pool == 1 ? g.block_length() : g.pooled_per_block();
    const int64_t L = g.block_length();
    const int threads_used = threads_for(blocks, threads);
    std::vector<double> counts(threads_used);  // each thread's spikes
    const auto carve = [&](Slab& slab) {  // v, i, spikes z of a block; scratch for pooling
        return std::make_tuple(slab.take<S>(L), slab.take<S>(L), slab.take<S>(L), slab.take<int32_t>(g.inner));
    };
    in_parallel(threads_used, carve, [&](Slab& slab) {
        const auto [v, i, z, any] = carve(slab);
        double& counted = counts[omp_get_thread_num()];
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t n0 = g.start(block), len = g.length(block);
            In* out = spikes + block * per_block;
            S* u = voltages + n0;
            const S v_th = c.v_th;
            run_block(
                currents, step_stride, T, n0, len, c, v, i,
                [&](int64_t t, int64_t k, S pre, S, S post) {
                    z[k] = pre > v_th ? S(1) : S(0);
                    if constexpr (Record) u[t * N + k] = post;
                },
                [&](int64_t t) {
                    if (count) counted += block_spikes(z, len);
                    if (g.pool > 1) return pool_block(g, z, out + t * outputs, any);
                    for (int64_t k = 0; k < len; ++k) store(out[t * outputs + k], z[k]);
                });
        }
    });
    if (count) *count += std::accumulate(counts.begin(), counts.end(), 0.0);
}

// The currents' gradient [T, N], or with SumOverTime [N] (its sum over the steps: the gradient of a step repeated at
// every time step), from the spikes' [T, N], or with pooling the pooled spikes' [T, N/p²] (step t at
// grad + t·grad_stride).
template <int Kind, bool Learned, bool SumOverTime, typename In, typename S>
void backward(const In* currents, int64_t step_stride, const In* grad, int64_t grad_stride, int64_t T,
              const Layout& g, In* grad_currents, const Constants<S>& constants, double* grad_a, double* grad_v_th,
              int threads) {
    const int64_t blocks = g.blocks(), N = g.N, L = g.block_length();
    const int64_t per_block = g.pool == 1 ? L : g.pooled_per_block();
    const int threads_used = threads_for(blocks, threads);
    std::vector<double> sums_a(threads_used), sums_v_th(threads_used);  // each thread's share of the learned gradients
    const auto carve = [&](Slab& slab) {
        return std::make_tuple(slab.take<S>(T * L), slab.take<S>(Learned ? T * L : 0), slab.take<S>(L), slab.take<S>(L),
                               slab.take<S>(L), slab.take<S>(L), slab.take<S>(L), slab.take<int32_t>(g.inner),
                               slab.take<double>(L), slab.take<double>(L));
    };
    in_parallel(threads_used, carve, [&](Slab& slab) {
        const auto [pre_kept, drive_kept, v, i, gv, gi, gs, found, aa, av] = carve(slab);
        const Constants<S> c = constants;
        double& sum_a = sums_a[omp_get_thread_num()];
        double& sum_v_th = sums_v_th[omp_get_thread_num()];
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t n0 = g.start(block), len = g.length(block);
            run_block(
                currents, step_stride, T, n0, len, c, v, i,
                [&](int64_t t, int64_t k, S pre, S drive, S) {
                    pre_kept[t * L + k] = pre;
                    if constexpr (Learned) drive_kept[t * L + k] = drive;
                },
                [](int64_t) {});
            S* g_sum = v;  // the recomputed state is spent: it holds the sum over time
            for (int64_t k = 0; k < len; ++k) gv[k] = gi[k] = g_sum[k] = S(0), aa[k] = av[k] = 0;
            for (int64_t t = T - 1; t >= 0; --t) {
                const S* pre = pre_kept + t * L;
                const S* drive = drive_kept + t * L;
                const In* grad_out = grad + t * grad_stride + block * per_block;
                if (g.pool > 1) {
                    unpool_block(g, pre, c.v_th, grad_out, gs, found);
                } else {
                    for (int64_t k = 0; k < len; ++k) gs[k] = to_state(grad_out[k]);
                }
                In* g_current = grad_currents + t * N + n0;
#pragma omp simd
                for (int64_t k = 0; k < len; ++k) {
                    S x = pre[k] - c.v_th;
                    S g_x = (gs[k] + gv[k] * (c.v_reset - pre[k])) * surrogate<Kind>(x, c.alpha);
                    S g_pre = (x <= S(0) ? gv[k] : S(0)) + g_x;
                    gi[k] = gi[k] * (S(1) - c.b) + c.a * g_pre;
                    gv[k] = g_pre * (S(1) - c.a);
                    if constexpr (SumOverTime) {
                        g_sum[k] += gi[k];
                    } else {
                        store(g_current[k], gi[k]);
                    }
                    if constexpr (Learned) {
                        aa[k] += g_pre * drive[k];
                        av[k] -= g_x;
                    }
                }
            }
            if constexpr (SumOverTime) {
                for (int64_t k = 0; k < len; ++k) store(grad_currents[n0 + k], g_sum[k]);
            }
            if constexpr (Learned) {
                for (int64_t k = 0; k < len; ++k) sum_a += aa[k], sum_v_th += av[k];
            }
        }
    });
    *grad_a = std::accumulate(sums_a.begin(), sums_a.end(), 0.0);
    *grad_v_th = std::accumulate(sums_v_th.begin(), sums_v_th.end(), 0.0);
}

template <typename In, typename S>
void backward_for(int kind, bool learned, bool sum_over_time, const In* currents, int64_t step_stride, const In* grad,
                  int64_t grad_stride, int64_t T, const Layout& g, In* grad_currents, const Constants<S>& c,
                  double* grad_a, double* grad_v_th, int threads) {
    auto run = [&](auto kind_tag, auto learned_tag, auto sum_tag) {
        backward<decltype(kind_tag)::value, decltype(learned_tag)::value, decltype(sum_tag)::value>(
            currents, step_stride, grad, grad_stride, T, g, grad_currents, c, grad_a, grad_v_th, threads);
    };
    auto with_sum = [&](auto kind_tag, auto learned_tag) {
        return sum_over_time ? run(kind_tag, learned_tag, std::true_type{})
                             : run(kind_tag, learned_tag, std::false_type{});
    };
    auto with_kind = [&](auto kind_tag) {
        return learned ? with_sum(kind_tag, std::true_type{}) : with_sum(kind_tag, std::false_type{});
    };
    switch (kind) {
        case kSuper:
            return with_kind(std::integral_constant<int, kSuper>{});
        case kTanh:
            return with_kind(std::integral_constant<int, kTanh>{});
        case kTriangle:
            return with_kind(std::integral_constant<int, kTriangle>{});
        case kCirc:
            return with_kind(std::integral_constant<int, kCirc>{});
        case kErfc:
            return with_kind(std::integral_constant<int, kErfc>{});
        default:
            return with_kind(std::integral_constant<int, kAtan>{});
    }
}

template <typename S>
Constants<S> constants(double a, double b, double v_leak, double v_th, double v_reset, double alpha) {
    return Constants<S>{S(a), S(b), S(v_leak), S(v_th), S(v_reset), S(alpha)};
}

// Calls run(In{}, S{}) with the currents' type and the state's: float32, float64, or bfloat16 with float32 state.
template <typename Run>
void with_types(int dtype, Run run) {
    if (dtype == kFloat64) return run(double{}, double{});
    if (dtype == kBFloat16) return run(BFloat16{}, float{});
    run(float{}, float{});
}

}  // namespace

extern "C" {

// Spikes [T, N] (the currents' dtype) or, with pool > 1, max-pooled spikes [T, N/pool²], and, if ``voltages`` is not
// null, post-reset voltages [T, N] (float32, or float64 for float64 currents); if ``count`` is not null, the number
// of spikes (before pooling) added to it. Step t's currents start at currents + t·step_stride (0: the same every
// step); a step's N values are [outer, H, W, inner] in memory.
void lif_forward(int dtype, const void* currents, int64_t step_stride, int64_t T, int64_t N, int64_t W,
                 int64_t inner, int64_t pool, void* spikes, void* voltages, double* count, double a, double b,
                 double v_leak, double v_th, double v_reset, int threads) {
    const Layout g{N, W, inner, pool};
    with_types(dtype, [&](auto in, auto state) {
        using In = decltype(in);
        using S = decltype(state);
        const auto c = constants<S>(a, b, v_leak, v_th, v_reset, 0);
        const auto* x = static_cast<const In*>(currents);
        auto* out = static_cast<In*>(spikes);
        if (voltages) return forward<true>(x, step_stride, T, g, out, static_cast<S*>(voltages), count, c, threads);
        forward<false>(x, step_stride, T, g, out, static_cast<S*>(nullptr), count, c, threads);
    });
}

// The currents' gradient [T, N] (their dtype), or its sum over the steps [N] if ``sum_over_time``, from that of
// lif_forward's spikes (step t at grad + t·grad_stride); with ``learned``, also d loss / d a into grad_a and
// d loss / d v_th into grad_v_th.
void lif_backward(int dtype, const void* currents, int64_t step_stride, const void* grad, int64_t grad_stride,
                  int64_t T, int64_t N, int64_t W, int64_t inner, int64_t pool, int sum_over_time,
                  void* grad_currents, double a, double b, double v_leak, double v_th, double v_reset, double alpha,
                  int surrogate_kind, int learned, double* grad_a, double* grad_v_th, int threads) {
    const Layout g{N, W, inner, pool};
    with_types(dtype, [&](auto in, auto state) {
        using In = decltype(in);
        using S = decltype(state);
        backward_for(surrogate_kind, learned, sum_over_time, static_cast<const In*>(currents), step_stride,
                     static_cast<const In*>(grad), grad_stride, T, g, static_cast<In*>(grad_currents),
                     constants<S>(a, b, v_leak, v_th, v_reset, alpha), grad_a, grad_v_th, threads);
    });
}
}
