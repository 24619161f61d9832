// The loop nest of Inductor's C++ backward that GCC's loop splitting miscompiled (fxhalo/passes/cpp_flags.py),
// reduced: a 16 x 4 tile (16 positions along W, a tail of 4 channels vectorised with masked loads) whose
// value is `row >= 2 ? received : pooled`, the select that the backward of a halo's `cat` makes, written
// through transpose_mxn.  With GCC 12.2 at -O3 the received row's first position of each tile gets the
// tile's last position's value (8 of 384 values wrong); right at -O2 or with -fno-split-loops.
// tests/passes/test_cpp_flags.py compiles it with Inductor's own command line.
#include <torch/csrc/inductor/cpp_prefix.h>

static void tile_kernel(const float* received, const float* pooled, float* out) {
    for (int64_t row = 0; row < 3; row++) {
        for (int64_t w0 = 0; w0 < 32; w0 += 16) {
            alignas(64) float tile[16 * 16];
            for (long w = 0; w < 16; w++) {
                auto is_received = row >= 2;
                auto from_received = [&] {
                    __at_align__ std::array<float, 16> buf;
#pragma GCC unroll 16
                    for (long c = 0; c < 4; c++) {
                        if (is_received != 0) {
                            buf[c] = received[w0 + w + 32L * c];
                        }
                    }
                    return at::vec::Vectorized<float>::loadu(buf.data(), 4);
                };
                auto from_pooled = [&] {
                    __at_align__ std::array<float, 16> buf;
#pragma GCC unroll 16
                    for (long c = 0; c < 4; c++) {
                        if (is_received == 0) {
                            buf[c] = pooled[w0 + w + 32L * row + 64L * c];
                        }
                    }
                    return at::vec::Vectorized<float>::loadu(buf.data(), 4);
                };
                auto zero = at::vec::Vectorized<float>(0.0f);
                auto a = is_received ? from_received() : zero;
                auto a_mask = at::vec::VecMask<float, 1>::from(is_received);
                auto b = is_received ? zero : from_pooled();
                auto b_mask = at::vec::VecMask<float, 1>::from(!is_received);
                auto sum = decltype(a)::blendv(zero, a, a_mask.template cast<float, 1>()) +
                           decltype(b)::blendv(zero, b, b_mask.template cast<float, 1>());
                sum.store(tile + 4L * w, 4);
            }
            transpose_mxn<float, 16, 4, false>(tile, 4, out + w0 + 32L * row, 96);
        }
    }
}

// How many of the 384 outputs differ from the select computed one value at a time.
extern "C" int wrong_values() {
    static float received[128], pooled[256], out[384];
    for (int i = 0; i < 128; i++) received[i] = 1000 + i;
    for (int i = 0; i < 256; i++) pooled[i] = i;
    tile_kernel(received, pooled, out);
    int wrong = 0;
    for (int c = 0; c < 4; c++)
        for (int row = 0; row < 3; row++)
            for (int w = 0; w < 32; w++) {
                float want = row == 2 ? received[w + 32 * c] : pooled[w + 32 * row + 64 * c];
                wrong += out[w + 32 * row + 96 * c] != want;
            }
    return wrong;
}
