// The LIF layer on the CPU in one pass per direction: each thread walks a block of neurons through all T steps,
// keeping v and i in a small local array, so every input and output element is read or written once.
//
// One step, as neurons.lif_step (Norse's equations), in the same order of IEEE operations as the torch kernel, so
// spikes are bit-identical (built with -ffp-contract=off, no fast-math):
//     i ← i + I
//     v_pre = v + ((v_leak − v) + i)·a          a = dt·τm⁻¹
//     i ← i − i·b                               b = dt·τs⁻¹
//     z = Θ(v_pre − v_th)
//     v ← z ? v_reset : v_pre
// Backward recomputes v_pre from the currents (nothing else is kept) and runs the pass through time in reverse:
//     g_z = g_spike + g_v·(v_reset − v_pre);  g_vpre = g_v·(v_pre ≤ v_th) + g_z·σ'(v_pre − v_th)
//     g_i ← g_i·(1 − b) + a·g_vpre  (= the gradient of this step's current);  g_v ← g_vpre·(1 − a)
// Plain C entry points (called through ctypes): no torch headers, so the first build takes about a second.

#include <cmath>
#include <cstdint>
#include <cstring>
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

// d spike / d x at x = v_pre − v_th: surrogates.py's formulas.
template <int Kind, typename S>
inline S surrogate(S x, S alpha) {
    const S pi = S(3.14159265358979323846);
    if constexpr (Kind == kSuper) {
        S d = alpha * std::fabs(x) + S(1);
        return S(1) / (d * d);
    } else if constexpr (Kind == kTanh) {
        S t = std::tanh(alpha * x);
        return S(1) - t * t;
    } else if constexpr (Kind == kTriangle) {
        S d = S(1) - std::fabs(x);
        return alpha * (d > S(0) ? d : S(0));
    } else if constexpr (Kind == kCirc) {
        S s = alpha * alpha + x * x;
        return alpha * alpha * alpha / (s * std::sqrt(s));
    } else if constexpr (Kind == kErfc) {
        S y = alpha * x;
        return alpha / std::sqrt(pi) * std::exp(-(y * y));
    } else {
        S y = pi / S(2) * alpha * x;
        return alpha / S(2) / (S(1) + y * y);
    }
}

int threads_for(int64_t blocks, int threads) { return static_cast<int>(blocks < threads ? blocks : threads); }

// Steps 0..T-1 of neurons [n0, n0+len) from rest; calls keep(t, k, v_pre, drive, v_post) after each step, where
// drive = (v_leak − v) + i is d v_pre / d a.
template <typename In, typename S, typename Keep>
inline void run_block(const In* currents, int64_t step_stride, int64_t T, int64_t n0, int64_t len,
                      const Constants<S>& constants, Keep keep) {
    const Constants<S> c = constants;  // in registers: the compiler cannot tell that outputs do not alias it
    S v[kBlock], i[kBlock];
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
    }
}

template <bool Record, typename In, typename S>
void forward(const In* currents, int64_t step_stride, int64_t T, int64_t N, In* spikes, S* voltages,
             const Constants<S>& c, int threads) {
    const int64_t blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(threads_for(blocks, threads))
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t n0 = block * kBlock, len = N - n0 < kBlock ? N - n0 : kBlock;
        In* z = spikes + n0;
        S* u = voltages + n0;
        run_block(currents, step_stride, T, n0, len, c, [&](int64_t t, int64_t k, S pre, S, S post) {
            store(z[t * N + k], pre > c.v_th ? S(1) : S(0));
            if constexpr (Record) u[t * N + k] = post;
        });
    }
}

template <int Kind, bool Learned, typename In, typename S>
void backward(const In* currents, int64_t step_stride, const In* grad_spikes, int64_t grad_stride, int64_t T,
              int64_t N, In* grad_currents, const Constants<S>& constants, double* grad_a, double* grad_v_th,
              int threads) {
    const int64_t blocks = (N + kBlock - 1) / kBlock;
    double sum_a = 0, sum_v_th = 0;
#pragma omp parallel num_threads(threads_for(blocks, threads)) reduction(+ : sum_a, sum_v_th)
    {
        const Constants<S> c = constants;
        std::vector<S> pre_kept(T * kBlock), drive_kept(Learned ? T * kBlock : 0);
        S g_v[kBlock], g_i[kBlock];
        double acc_a[kBlock], acc_v_th[kBlock];
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t n0 = block * kBlock, len = N - n0 < kBlock ? N - n0 : kBlock;
            run_block(currents, step_stride, T, n0, len, c, [&](int64_t t, int64_t k, S pre, S drive, S) {
                pre_kept[t * kBlock + k] = pre;
                if constexpr (Learned) drive_kept[t * kBlock + k] = drive;
            });
            for (int64_t k = 0; k < len; ++k) g_v[k] = g_i[k] = S(0), acc_a[k] = acc_v_th[k] = 0;
            for (int64_t t = T - 1; t >= 0; --t) {
                const In* g_spike = grad_spikes + t * grad_stride + n0;
                In* g_current = grad_currents + t * N + n0;
                const S* pre = pre_kept.data() + t * kBlock;
                const S* drive = drive_kept.data() + t * kBlock;
#pragma omp simd
                for (int64_t k = 0; k < len; ++k) {
                    S x = pre[k] - c.v_th;
                    S g_x = (to_state(g_spike[k]) + g_v[k] * (c.v_reset - pre[k])) * surrogate<Kind>(x, c.alpha);
                    S g_pre = (x <= S(0) ? g_v[k] : S(0)) + g_x;
                    g_i[k] = g_i[k] * (S(1) - c.b) + c.a * g_pre;
                    g_v[k] = g_pre * (S(1) - c.a);
                    store(g_current[k], g_i[k]);
                    if constexpr (Learned) {
                        acc_a[k] += g_pre * drive[k];
                        acc_v_th[k] -= g_x;
                    }
                }
            }
            if constexpr (Learned) {
                for (int64_t k = 0; k < len; ++k) sum_a += acc_a[k], sum_v_th += acc_v_th[k];
            }
        }
    }
    *grad_a = sum_a;
    *grad_v_th = sum_v_th;
}

template <typename In, typename S>
void backward_for(int kind, bool learned, const In* currents, int64_t step_stride, const In* grad_spikes,
                  int64_t grad_stride, int64_t T, int64_t N, In* grad_currents, const Constants<S>& c,
                  double* grad_a, double* grad_v_th, int threads) {
#define SNN_BACKWARD(KIND)                                                                                         \
    case KIND:                                                                                                     \
        return learned ? backward<KIND, true>(currents, step_stride, grad_spikes, grad_stride, T, N, grad_currents, \
                                              c, grad_a, grad_v_th, threads)                                       \
                       : backward<KIND, false>(currents, step_stride, grad_spikes, grad_stride, T, N,             \
                                               grad_currents, c, grad_a, grad_v_th, threads);
    switch (kind) {
        SNN_BACKWARD(kSuper)
        SNN_BACKWARD(kTanh)
        SNN_BACKWARD(kTriangle)
        SNN_BACKWARD(kCirc)
        SNN_BACKWARD(kErfc)
        SNN_BACKWARD(kAtan)
    }
#undef SNN_BACKWARD
}

template <typename In, typename S>
void forward_for(bool record, const In* currents, int64_t step_stride, int64_t T, int64_t N, In* spikes,
                 S* voltages, const Constants<S>& c, int threads) {
    if (record) return forward<true>(currents, step_stride, T, N, spikes, voltages, c, threads);
    forward<false>(currents, step_stride, T, N, spikes, voltages, c, threads);
}

template <typename S>
Constants<S> constants(double a, double b, double v_leak, double v_th, double v_reset, double alpha) {
    return Constants<S>{S(a), S(b), S(v_leak), S(v_th), S(v_reset), S(alpha)};
}

}  // namespace

extern "C" {

// Spikes [T, N] (the currents' dtype) and, if ``voltages`` is not null, post-reset voltages [T, N] (float32, or
// float64 for float64 currents). Step t's currents start at currents + t·step_stride (0: the same every step).
void lif_forward(int dtype, const void* currents, int64_t step_stride, int64_t T, int64_t N, void* spikes,
                 void* voltages, double a, double b, double v_leak, double v_th, double v_reset, int threads) {
    const bool record = voltages != nullptr;
    if (dtype == kFloat64) {
        forward_for(record, static_cast<const double*>(currents), step_stride, T, N, static_cast<double*>(spikes),
                    static_cast<double*>(voltages), constants<double>(a, b, v_leak, v_th, v_reset, 0), threads);
    } else if (dtype == kBFloat16) {
        forward_for(record, static_cast<const BFloat16*>(currents), step_stride, T, N,
                    static_cast<BFloat16*>(spikes), static_cast<float*>(voltages),
                    constants<float>(a, b, v_leak, v_th, v_reset, 0), threads);
    } else {
        forward_for(record, static_cast<const float*>(currents), step_stride, T, N, static_cast<float*>(spikes),
                    static_cast<float*>(voltages), constants<float>(a, b, v_leak, v_th, v_reset, 0), threads);
    }
}

// The gradient of the currents [T, N] (their dtype) from that of the spikes (step t at grad_spikes + t·grad_stride);
// with ``learned``, also d loss / d a into grad_a and d loss / d v_th into grad_v_th.
void lif_backward(int dtype, const void* currents, int64_t step_stride, const void* grad_spikes, int64_t grad_stride,
                  int64_t T, int64_t N, void* grad_currents, double a, double b, double v_leak, double v_th,
                  double v_reset, double alpha, int surrogate_kind, int learned, double* grad_a, double* grad_v_th,
                  int threads) {
    if (dtype == kFloat64) {
        backward_for(surrogate_kind, learned, static_cast<const double*>(currents), step_stride,
                     static_cast<const double*>(grad_spikes), grad_stride, T, N, static_cast<double*>(grad_currents),
                     constants<double>(a, b, v_leak, v_th, v_reset, alpha), grad_a, grad_v_th, threads);
    } else if (dtype == kBFloat16) {
        backward_for(surrogate_kind, learned, static_cast<const BFloat16*>(currents), step_stride,
                     static_cast<const BFloat16*>(grad_spikes), grad_stride, T, N,
                     static_cast<BFloat16*>(grad_currents), constants<float>(a, b, v_leak, v_th, v_reset, alpha),
                     grad_a, grad_v_th, threads);
    } else {
        backward_for(surrogate_kind, learned, static_cast<const float*>(currents), step_stride,
                     static_cast<const float*>(grad_spikes), grad_stride, T, N, static_cast<float*>(grad_currents),
                     constants<float>(a, b, v_leak, v_th, v_reset, alpha), grad_a, grad_v_th, threads);
    }
}
}
