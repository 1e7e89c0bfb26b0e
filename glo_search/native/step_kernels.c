/*
 * The hand-written training step's convolution stages, batch norm and loss
 * (glo_search/step.py), in C, and the digit classifier's convolutions
 * (glo_search/classifier.py).
 *
 * At a batch of 32 the stages' matrix products are small (16 channels in and out).
 * Through PyTorch each one writes its taps to memory, and further operations, each with a
 * few microseconds of dispatch, then sum, interleave and normalize them. Here each stage
 * runs as one pass per image: the products with vector multiply-adds, and the taps
 * summed into the output while they are in registers or cache. Only the linear layers'
 * products stay PyTorch's. glo_search/native/__init__.py compiles this file on first use.
 *
 * Every array is float32, contiguous, in the layout its comment gives. The work is split
 * by image over OpenMP threads (PyTorch's own pool, whose size torch.set_num_threads
 * sets), or by output column for the 14x14 stage's kernel gradient. A sum over the batch
 * is taken per image, or per group of IMAGE_GROUP images by one thread, and the parts
 * are added in image order in double. Results therefore do not depend on the number of
 * threads.
 *
 * Each kernel returns 0, or one of the codes below; glo_search/native/__init__.py raises
 * them as Python errors. Arrays whose size grows with the batch live on the heap, so that
 * no batch size overflows a thread's stack.
 *
 * Names used below: a stage upsamples an (H, W) map x2 and applies a transposed 5x5
 * convolution, computed as a 3x3 grid of taps q per output phase r (glo_search/kernels.py).
 * Output row 2 * (h + q1) + r1 - pad receives input row h through tap q1 in phase r1;
 * the output has 2 * (H + 2) - 2 * pad rows, and likewise for columns. The stages below
 * take an even pad only, as glo_search/step.py's stages do.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TAPS 3
#define TAP_PHASES (TAPS * TAPS * 4) /* (q1, q2, r1, r2) */
#define LANES 16 /* partial sums kept apart, so that the loops summing floats vectorize */
#define KERNEL_OK 0
#define KERNEL_NO_MEMORY 1 /* malloc failed */
#define KERNEL_ODD_PAD 2   /* the stages take an even pad only */
#define IMAGE_GROUP 64 /* images per group, whose sums are kept apart before going into double */

static inline int64_t out_size(int64_t size, int64_t pad) { return 2 * (size + 2) - 2 * pad; }

/* dst[i] += src[i] and dst[i] = src[i], for n floats that do not overlap */
static inline void add_floats(float *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] += src[i];
    }
}

static inline void copy_floats(float *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = src[i];
    }
}

/* sums[c] = sum over rows of x[row, c], for x (rows, C) */
static void column_sums(double *restrict sums, const float *restrict x, int64_t rows,
                        int64_t channels) {
    for (int64_t c = 0; c < channels; c++) {
        sums[c] = 0.0;
    }
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t c = 0; c < channels; c++) {
            sums[c] += x[i * channels + c];
        }
    }
}

/* out[c] = sum over images of partial[image, c], in image order */
static void add_partials(double *restrict out, const double *restrict partial, int64_t images,
                         int64_t channels) {
    for (int64_t c = 0; c < channels; c++) {
        out[c] = 0.0;
    }
    for (int64_t b = 0; b < images; b++) {
        for (int64_t c = 0; c < channels; c++) {
            out[c] += partial[b * channels + c];
        }
    }
}

/* the sum of n floats, in double */
static double float_sum(const float *restrict x, int64_t n) {
    float lanes[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int64_t l = 0; l < LANES; l++) {
            lanes[l] += x[i + l];
        }
    }
    double sum = 0.0;
    for (; i < n; i++) {
        sum += x[i];
    }
    for (int64_t l = 0; l < LANES; l++) {
        sum += lanes[l];
    }
    return sum;
}

/*
 * Channels-last stage with MAP_CHANNELS channels in and out, as the generator's 5x5 -> 14x14
 * stage has. Each input pixel's tap (q1, q2) writes a 2x2 block of output pixels, one per
 * phase (r1, r2). The folded kernel holds that block's weights as 4 * MAP_CHANNELS floats
 * in a row, in the block's own order: top-left, top-right, bottom-left, bottom-right.
 * The products are taken in place, so the (B, H, W, 36, C) taps never reach memory.
 */
#define MAP_CHANNELS 16 /* glo_search/native/__init__.py's MAP_CHANNELS */
#define BLOCK (4 * MAP_CHANNELS)     /* floats of one tap's 2x2 block of output pixels */
#define CHANNEL_LANES (MAP_CHANNELS / 8)
#define POSITION_GROUP 5             /* input pixels sharing each load of the kernel */

typedef float lanes8 __attribute__((vector_size(32))); /* 8 floats: AVX, or two SSE */

static inline lanes8 load8(const float *p) {
    lanes8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, lanes8 v) { memcpy(p, &v, sizeof v); }

typedef int32_t mask8 __attribute__((vector_size(32))); /* -1 or 0 per float of a lanes8 */

/* the larger of a and b in each lane, written with a mask because GCC 12 compiles a loop
 * over the lanes of a lanes8 into one scalar max per lane */
static inline lanes8 max8(lanes8 a, lanes8 b) {
    const mask8 greater = a > b;
    return (lanes8)((greater & (mask8)a) | (~greater & (mask8)b));
}

#ifdef __AVX512F__
/* 16 floats: one AVX-512 register */
typedef float lanes16 __attribute__((vector_size(64)));
typedef int32_t mask16 __attribute__((vector_size(64)));

static inline lanes16 load16(const float *p) {
    lanes16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, lanes16 v) { memcpy(p, &v, sizeof v); }

/* a where a > b, else b, in each lane: the scalar expression a > b ? a : b */
static inline lanes16 max16(lanes16 a, lanes16 b) {
    const mask16 greater = a > b;
    return (lanes16)((greater & (mask16)a) | (~greater & (mask16)b));
}
#endif

/* The widest vector of floats that the classifier's kernels use: 16 floats with AVX-512,
 * else 8. Each sum adds its products in the same order at either width. */
#ifdef __AVX512F__
typedef lanes16 wide_lanes;
#define WIDE 16
#define WIDE_LOAD load16
#define WIDE_STORE store16
#define WIDE_MAX max16
#else
typedef lanes8 wide_lanes;
#define WIDE 8
#define WIDE_LOAD load8
#define WIDE_STORE store8
#define WIDE_MAX max8
#endif

/* The top-left output pixel of input pixel (h, w)'s tap t in an image of out_w columns,
 * or NULL where the pad crops the block (with an even pad a block is kept or cropped
 * whole). */
static inline const float *tap_block(const float *image, int64_t h, int64_t w, int64_t t,
                                     int64_t out_h, int64_t out_w, int64_t pad) {
    const int64_t y = 2 * (h + t / TAPS) - pad, x = 2 * (w + t % TAPS) - pad;
    if (y < 0 || y >= out_h || x < 0 || x >= out_w) {
        return NULL;
    }
    return image + (y * out_w + x) * MAP_CHANNELS;
}

/*
 * Forward: out = bias + x times the folded kernel, each product added into its output
 * pixel. x (B, H, W, C), kernel (C, [q1 q2 r1 r2 c]) -> out (B, Ho, Wo, C). With gain and
 * shift (C) given, out then becomes max(0, out * gain + shift): batch norm with fixed
 * statistics and ReLU, for decoding.
 */
int stage_forward(const float *restrict x, const float *restrict kernel,
                  const float *restrict bias, float *restrict out, const float *restrict gain,
                  const float *restrict shift, int64_t batch, int64_t height, int64_t width,
                  int64_t pad) {
    const int64_t out_h = out_size(height, pad), out_w = out_size(width, pad);
    const int64_t size = out_h * out_w * MAP_CHANNELS, row = out_w * MAP_CHANNELS;
    const int64_t positions = height * width;
    const float zeros[MAP_CHANNELS] = {0};
    if (pad % 2) {
        return KERNEL_ODD_PAD;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        float *image = out + b * size;
        float spare[row + BLOCK]; /* written in place of a cropped block */
        for (int64_t p = 0; p < out_h * out_w; p++) {
            copy_floats(image + p * MAP_CHANNELS, bias, MAP_CHANNELS);
        }
        for (int64_t t = 0; t < TAPS * TAPS; t++) {
            /* Input pixels go in groups of POSITION_GROUP, which share each load of the
             * kernel; a group's 2x2 blocks are distinct, as its pixels are. */
            for (int64_t p0 = 0; p0 < positions; p0 += POSITION_GROUP) {
                const float *in[POSITION_GROUP];
                float *top[POSITION_GROUP];
                for (int i = 0; i < POSITION_GROUP; i++) {
                    const int64_t p = p0 + i;
                    float *block = p < positions ? (float *)tap_block(image, p / width, p % width,
                                                                      t, out_h, out_w, pad)
                                                 : NULL;
                    in[i] = block == NULL ? zeros : x + (b * positions + p) * MAP_CHANNELS;
                    top[i] = block == NULL ? spare : block;
                }
                /* a quarter of each block at a time: one output pixel's channels */
                for (int64_t quarter = 0; quarter < 4; quarter++) {
                    const int64_t offset = (quarter / 2) * row + (quarter % 2) * MAP_CHANNELS;
                    lanes8 sum[POSITION_GROUP][CHANNEL_LANES];
                    for (int i = 0; i < POSITION_GROUP; i++) {
                        for (int g = 0; g < CHANNEL_LANES; g++) {
                            sum[i][g] = load8(top[i] + offset + 8 * g);
                        }
                    }
                    const float *weights = kernel + (4 * t + quarter) * MAP_CHANNELS;
                    for (int c = 0; c < MAP_CHANNELS; c++) {
                        const float *k = weights + c * TAP_PHASES * MAP_CHANNELS;
                        for (int g = 0; g < CHANNEL_LANES; g++) {
                            const lanes8 w = load8(k + 8 * g);
                            for (int i = 0; i < POSITION_GROUP; i++) {
                                sum[i][g] += in[i][c] * w;
                            }
                        }
                    }
                    for (int i = 0; i < POSITION_GROUP; i++) {
                        for (int g = 0; g < CHANNEL_LANES; g++) {
                            store8(top[i] + offset + 8 * g, sum[i][g]);
                        }
                    }
                }
            }
        }
        if (gain != NULL) {
            for (int64_t j = 0; j < size; j += MAP_CHANNELS) {
                for (int64_t c = 0; c < MAP_CHANNELS; c++) {
                    const float value = image[j + c] * gain[c] + shift[c];
                    image[j + c] = value > 0.0f ? value : 0.0f;
                }
            }
        }
    }
    return KERNEL_OK;
}

/*
 * Backward of stage_forward, from grad (B, Ho, Wo, C), the output's gradient. Writes
 * x_grad (B, H, W, C), the input's gradient, kernel_grad (C, [q1 q2 r1 r2 c]), the folded
 * kernel's, and bias_grad (C), the sum over output pixels.
 */
int stage_backward(const float *restrict grad, const float *restrict x,
                   const float *restrict kernel, float *restrict kernel_grad,
                   float *restrict x_grad, float *restrict bias_grad, int64_t batch,
                   int64_t height, int64_t width, int64_t pad) {
    const int64_t out_h = out_size(height, pad), out_w = out_size(width, pad);
    const int64_t size = out_h * out_w * MAP_CHANNELS, row = out_w * MAP_CHANNELS;
    const int64_t columns = TAP_PHASES * MAP_CHANNELS;
    double sums[MAP_CHANNELS];
    float kernel_t[TAP_PHASES * MAP_CHANNELS * MAP_CHANNELS]; /* (36 C, C) */
    if (pad % 2) {
        return KERNEL_ODD_PAD;
    }
    double *partial = malloc(sizeof(double) * batch * MAP_CHANNELS);
    if (partial == NULL) {
        return KERNEL_NO_MEMORY;
    }
    for (int64_t j = 0; j < columns; j++) {
        for (int64_t c = 0; c < MAP_CHANNELS; c++) {
            kernel_t[j * MAP_CHANNELS + c] = kernel[c * columns + j];
        }
    }
#pragma omp parallel
    {
        /* x_grad: each input pixel's gradient is its taps' gradient times the kernel's
         * transpose. An image's pixels go in groups of POSITION_GROUP, which share each
         * load of the kernel. */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            const float *image = grad + b * size;
            for (int64_t p0 = 0; p0 < height * width; p0 += POSITION_GROUP) {
                lanes8 sum[POSITION_GROUP][CHANNEL_LANES] = {{{0}}};
                for (int64_t t = 0; t < TAPS * TAPS; t++) {
                    /* each pixel's block gradient, top row then bottom row, or zeros */
                    float blocks[POSITION_GROUP][BLOCK];
                    for (int i = 0; i < POSITION_GROUP; i++) {
                        const int64_t p = p0 + i;
                        const float *block =
                            p < height * width
                                ? tap_block(image, p / width, p % width, t, out_h, out_w, pad)
                                : NULL;
                        if (block == NULL) {
                            memset(blocks[i], 0, sizeof blocks[i]);
                            continue;
                        }
                        copy_floats(blocks[i], block, BLOCK / 2);
                        copy_floats(blocks[i] + BLOCK / 2, block + row, BLOCK / 2);
                    }
                    for (int j = 0; j < BLOCK; j++) {
                        const float *k = kernel_t + (t * BLOCK + j) * MAP_CHANNELS;
                        for (int i = 0; i < POSITION_GROUP; i++) {
                            for (int g = 0; g < CHANNEL_LANES; g++) {
                                sum[i][g] += blocks[i][j] * load8(k + 8 * g);
                            }
                        }
                    }
                }
                for (int i = 0; i < POSITION_GROUP && p0 + i < height * width; i++) {
                    float *dst = x_grad + (b * height * width + p0 + i) * MAP_CHANNELS;
                    for (int g = 0; g < CHANNEL_LANES; g++) {
                        store8(dst + 8 * g, sum[i][g]);
                    }
                }
            }
            column_sums(partial + b * MAP_CHANNELS, image, out_h * out_w, MAP_CHANNELS);
        }
        /* kernel_grad: per tap-phase k, the sum over input pixels of x times the gradient
         * of k's output pixel, in float over each group of images and in double across
         * groups. Each thread takes whole columns and sums them in the same order, so the
         * result does not depend on the number of threads. */
#pragma omp for schedule(static)
        for (int64_t k = 0; k < TAP_PHASES; k++) {
            const int64_t t = k / 4, r1 = (k / 2) % 2, r2 = k % 2;
            for (int64_t c0 = 0; c0 < MAP_CHANNELS; c0 += 4) {
                double total[4][MAP_CHANNELS] = {{0}};
                const float *in = x + c0;
                for (int64_t first = 0; first < batch; first += IMAGE_GROUP) {
                    lanes8 sum[4][CHANNEL_LANES] = {{{0}}};
                    const int64_t last = first + IMAGE_GROUP < batch ? first + IMAGE_GROUP : batch;
                    for (int64_t b = first; b < last; b++) {
                        for (int64_t h = 0; h < height; h++) {
                            for (int64_t w = 0; w < width; w++, in += MAP_CHANNELS) {
                                const float *block =
                                    tap_block(grad + b * size, h, w, t, out_h, out_w, pad);
                                if (block == NULL) {
                                    continue;
                                }
                                const float *pixel = block + r1 * row + r2 * MAP_CHANNELS;
                                for (int g = 0; g < CHANNEL_LANES; g++) {
                                    const lanes8 value = load8(pixel + 8 * g);
                                    for (int i = 0; i < 4; i++) {
                                        sum[i][g] += in[i] * value;
                                    }
                                }
                            }
                        }
                    }
                    float values[4][MAP_CHANNELS];
                    memcpy(values, sum, sizeof values);
                    for (int i = 0; i < 4; i++) {
                        for (int c = 0; c < MAP_CHANNELS; c++) {
                            total[i][c] += values[i][c];
                        }
                    }
                }
                for (int i = 0; i < 4; i++) {
                    for (int c = 0; c < MAP_CHANNELS; c++) {
                        kernel_grad[(c0 + i) * columns + k * MAP_CHANNELS + c] =
                            (float)total[i][c];
                    }
                }
            }
        }
    }
    add_partials(sums, partial, batch, MAP_CHANNELS);
    free(partial);
    for (int64_t c = 0; c < MAP_CHANNELS; c++) {
        bias_grad[c] = (float)sums[c];
    }
    return KERNEL_OK;
}

/* exp(x) for x <= 0, written so that loops over it vectorize. Its relative error was at
 * most 8.3e-8 (1.0 unit in the last place) against double exp on a 1e-4 grid of [-87, 0]. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    /* n = x / ln 2 rounded to the nearest integer: adding 1.5 * 2^23 drops the fraction */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    /* x - n ln 2, with ln 2 split in two for precision */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t bits;
        float value;
    } scale = {.bits = ((int32_t)n + 127) << 23}; /* 2^n */
    return p * scale.value;
}

static inline float sigmoid(float x) {
    const float e = exp_nonpositive(-fabsf(x)); /* in (0, 1] */
    const float s = 1.0f / (1.0f + e);
    return x >= 0.0f ? s : e * s;
}

/*
 * The single-channel stage reads channels-last maps (B, H, W, C), C = MAP_CHANNELS, and
 * works on one image at a time with image positions innermost: the image's maps become
 * C planes of H * W positions, padded with zeros to a multiple of PLANE_GROUP, and
 * its 36 taps are 36 such planes. kernel (C, [q1 q2 r1 r2]) is the folded kernel.
 */
#define PLANE_GROUP (2 * 8)

static inline int64_t plane_size(int64_t positions) {
    return (positions + PLANE_GROUP - 1) / PLANE_GROUP * PLANE_GROUP;
}

/* planes (C, plane) <- one image's maps (positions, C), zero past the last position */
static void to_planes(float *restrict planes, const float *restrict maps, int64_t positions,
                      int64_t plane) {
    for (int64_t c = 0; c < MAP_CHANNELS; c++) {
        for (int64_t p = 0; p < plane; p++) {
            planes[c * plane + p] = p < positions ? maps[p * MAP_CHANNELS + c] : 0.0f;
        }
    }
}

/*
 * out (rows, plane) = weights^T times planes (inner, plane), where weights is
 * (inner, rows) and rows is a multiple of 4. It works in blocks of 4 rows by PLANE_GROUP
 * positions, whose sums stay in registers.
 */
static void plane_product(float *restrict out, const float *restrict weights, int64_t rows,
                          const float *restrict planes, int64_t inner, int64_t plane) {
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        for (int64_t p0 = 0; p0 < plane; p0 += PLANE_GROUP) {
            lanes8 sum[4][2] = {{{0}}};
            for (int64_t c = 0; c < inner; c++) {
                const lanes8 lo = load8(planes + c * plane + p0);
                const lanes8 hi = load8(planes + c * plane + p0 + 8);
                for (int i = 0; i < 4; i++) {
                    const float w = weights[c * rows + r0 + i];
                    sum[i][0] += w * lo;
                    sum[i][1] += w * hi;
                }
            }
            for (int i = 0; i < 4; i++) {
                store8(out + (r0 + i) * plane + p0, sum[i][0]);
                store8(out + (r0 + i) * plane + p0 + 8, sum[i][1]);
            }
        }
    }
}

/*
 * The single-channel stage's forward pass, followed by the sigmoid, the pixel loss against
 * the targets and the loss's gradient at the logits.
 * active (B, H, W, C), kernel (C, 36), bias (1), targets (B, Ho, Wo) -> grad (B, Ho, Wo).
 * sums (2): sum of |d| and sum of d^2, where d = output - target. The gradient is
 * (sign_weight sign(d) + linear_weight d) / scale times the sigmoid's slope.
 * With targets NULL, grad receives the outputs (the sigmoid of the logits) and sums is
 * left alone: the stage's forward pass alone, for decoding.
 */
int stage_loss(const float *restrict active, const float *restrict kernel,
               const float *restrict bias, const float *restrict targets,
               float *restrict grad, double *restrict sums, int64_t batch, int64_t height,
               int64_t width, int64_t pad, float sign_weight, float linear_weight,
               float scale) {
    const int64_t out_h = out_size(height, pad), out_w = out_size(width, pad);
    const int64_t phase_h = height + 2, phase_w = width + 2, positions = height * width;
    const int64_t pixels = out_h * out_w, plane = plane_size(positions);
    const float sign_factor = sign_weight / scale, linear_factor = linear_weight / scale;
    if (pad % 2) {
        return KERNEL_ODD_PAD;
    }
    double *abs_sums = malloc(sizeof(double) * 2 * batch), *square_sums = abs_sums + batch;
    if (abs_sums == NULL) {
        return KERNEL_NO_MEMORY;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        float planes[MAP_CHANNELS * plane], taps[TAP_PHASES * plane];
        float phases[4 * phase_h * phase_w], logits[pixels], squares[pixels];
        to_planes(planes, active + b * positions * MAP_CHANNELS, positions, plane);
        plane_product(taps, kernel, TAP_PHASES, planes, MAP_CHANNELS, plane);
        for (int64_t i = 0; i < 4 * phase_h * phase_w; i++) {
            phases[i] = bias[0];
        }
        for (int64_t k = 0; k < TAP_PHASES; k++) {
            const int64_t q1 = k / 12, q2 = (k / 4) % 3, r = k % 4;
            for (int64_t h = 0; h < height; h++) {
                add_floats(phases + (r * phase_h + h + q1) * phase_w + q2,
                           taps + k * plane + h * width, width);
            }
        }
        /* Interleave the phases: output row y is phase row (y + pad) / 2 of parity y % 2
         * (pad is even), and likewise for columns. */
        for (int64_t y = 0; y < out_h; y++) {
            const float *even = phases + ((y % 2 * 2) * phase_h + (y + pad) / 2) * phase_w;
            const float *odd = even + phase_h * phase_w;
            float *row = logits + y * out_w;
            for (int64_t j = 0; j < out_w / 2; j++) {
                row[2 * j] = even[pad / 2 + j];
                row[2 * j + 1] = odd[pad / 2 + j];
            }
        }
        float *out = grad + b * pixels;
        if (targets == NULL) {
            for (int64_t i = 0; i < pixels; i++) {
                out[i] = sigmoid(logits[i]);
            }
            continue;
        }
        const float *target = targets + b * pixels;
        for (int64_t i = 0; i < pixels; i++) {
            const float output = sigmoid(logits[i]);
            const float d = output - target[i];
            const float sign = (float)(d > 0.0f) - (float)(d < 0.0f);
            out[i] = (sign_factor * sign + linear_factor * d) * (output * (1.0f - output));
            logits[i] = fabsf(d); /* kept for the sums below */
            squares[i] = d * d;
        }
        abs_sums[b] = float_sum(logits, pixels);
        square_sums[b] = float_sum(squares, pixels);
    }
    if (targets != NULL) {
        sums[0] = 0.0;
        sums[1] = 0.0;
        for (int64_t b = 0; b < batch; b++) {
            sums[0] += abs_sums[b];
            sums[1] += square_sums[b];
        }
    }
    free(abs_sums);
    return KERNEL_OK;
}

/*
 * Backward of stage_loss's stage, from grad (B, Ho, Wo), the logits' gradient. Writes
 * active_grad (B, H, W, C), the maps' gradient, kernel_grad (C, 36), the folded kernel's,
 * and bias_grad (1), the sum over pixels.
 */
int stage_loss_backward(const float *restrict grad, const float *restrict active,
                        const float *restrict kernel, float *restrict kernel_grad,
                        float *restrict active_grad, float *restrict bias_grad,
                        int64_t batch, int64_t height, int64_t width, int64_t pad) {
    const int64_t out_h = out_size(height, pad), out_w = out_size(width, pad);
    const int64_t phase_h = height + 2, phase_w = width + 2, positions = height * width;
    const int64_t plane = plane_size(positions), weights = MAP_CHANNELS * TAP_PHASES;
    double bias_sum = 0.0, kernel_sums[weights];
    float kernel_t[weights]; /* (36, C) */
    if (pad % 2) {
        return KERNEL_ODD_PAD;
    }
    for (int64_t c = 0; c < MAP_CHANNELS; c++) {
        for (int64_t k = 0; k < TAP_PHASES; k++) {
            kernel_t[k * MAP_CHANNELS + c] = kernel[c * TAP_PHASES + k];
        }
    }
    for (int64_t j = 0; j < weights; j++) {
        kernel_sums[j] = 0.0;
    }
    /* Images go in groups, so that their shares of the sums fit on the stack whatever the
     * batch size. The shares are added in image order. */
    for (int64_t first = 0; first < batch; first += IMAGE_GROUP) {
        const int64_t count = batch - first < IMAGE_GROUP ? batch - first : IMAGE_GROUP;
        double partial[IMAGE_GROUP];
        float kernel_partial[IMAGE_GROUP * weights]; /* per image, (36, C) */
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < count; n++) {
            const int64_t b = first + n;
            /* Split the gradient into its four phases, zero where the output was cropped. */
            float phases[4 * phase_h * phase_w], taps[TAP_PHASES * plane];
            for (int64_t i = 0; i < 4 * phase_h * phase_w; i++) {
                phases[i] = 0.0f;
            }
            const float *image = grad + b * out_h * out_w;
            for (int64_t y = 0; y < out_h; y++) {
                float *even = phases + ((y % 2 * 2) * phase_h + (y + pad) / 2) * phase_w;
                float *odd = even + phase_h * phase_w;
                const float *row = image + y * out_w;
                for (int64_t j = 0; j < out_w / 2; j++) {
                    even[pad / 2 + j] = row[2 * j];
                    odd[pad / 2 + j] = row[2 * j + 1];
                }
            }
            partial[n] = float_sum(image, out_h * out_w);
            /* the taps' gradient, as planes zero past the last position */
            for (int64_t k = 0; k < TAP_PHASES; k++) {
                const int64_t q1 = k / 12, q2 = (k / 4) % 3, r = k % 4;
                float *dst = taps + k * plane;
                for (int64_t h = 0; h < height; h++) {
                    copy_floats(dst + h * width, phases + (r * phase_h + h + q1) * phase_w + q2,
                                width);
                }
                for (int64_t p = positions; p < plane; p++) {
                    dst[p] = 0.0f;
                }
            }
            /* the maps' gradient, channels-last: the taps' gradient times the kernel, for 4
             * positions at a time */
            float *maps_grad = active_grad + b * positions * MAP_CHANNELS;
            for (int64_t p0 = 0; p0 < positions; p0 += 4) {
                lanes8 sum[4][CHANNEL_LANES] = {{{0}}};
                for (int64_t k = 0; k < TAP_PHASES; k++) {
                    for (int g = 0; g < CHANNEL_LANES; g++) {
                        const lanes8 w = load8(kernel_t + k * MAP_CHANNELS + 8 * g);
                        for (int i = 0; i < 4; i++) {
                            sum[i][g] += taps[k * plane + p0 + i] * w;
                        }
                    }
                }
                for (int i = 0; i < 4 && p0 + i < positions; i++) {
                    for (int g = 0; g < CHANNEL_LANES; g++) {
                        store8(maps_grad + (p0 + i) * MAP_CHANNELS + 8 * g, sum[i][g]);
                    }
                }
            }
            /* this image's share of the kernel's gradient, (36, C): the maps times the taps'
             * gradient, summed over positions, for 4 taps at a time */
            const float *maps = active + b * positions * MAP_CHANNELS;
            for (int64_t k0 = 0; k0 < TAP_PHASES; k0 += 4) {
                lanes8 sum[4][CHANNEL_LANES] = {{{0}}};
                for (int64_t p = 0; p < positions; p++) {
                    for (int g = 0; g < CHANNEL_LANES; g++) {
                        const lanes8 x = load8(maps + p * MAP_CHANNELS + 8 * g);
                        for (int i = 0; i < 4; i++) {
                            sum[i][g] += taps[(k0 + i) * plane + p] * x;
                        }
                    }
                }
                for (int i = 0; i < 4; i++) {
                    for (int g = 0; g < CHANNEL_LANES; g++) {
                        store8(kernel_partial + n * weights + (k0 + i) * MAP_CHANNELS + 8 * g,
                               sum[i][g]);
                    }
                }
            }
        }
        for (int64_t n = 0; n < count; n++) {
            bias_sum += partial[n];
            for (int64_t j = 0; j < weights; j++) {
                kernel_sums[j] += kernel_partial[n * weights + j];
            }
        }
    }
    bias_grad[0] = (float)bias_sum;
    for (int64_t k = 0; k < TAP_PHASES; k++) {
        for (int64_t c = 0; c < MAP_CHANNELS; c++) {
            kernel_grad[c * TAP_PHASES + k] = (float)kernel_sums[k * MAP_CHANNELS + c];
        }
    }
    return KERNEL_OK;
}

/*
 * Batch norm in training mode (batch statistics) followed by ReLU, channels-last.
 * x (B, P, C) -> active (B, P, C), for P pixels per image; mean and invstd (C) of the
 * batch; running_mean and running_var (C) move by momentum, the variance unbiased, as
 * torch.nn.BatchNorm2d does.
 */
int norm_relu_forward(const float *restrict x, const float *restrict weight,
                      const float *restrict bias, float *restrict running_mean,
                      float *restrict running_var, float *restrict active, float *restrict mean,
                      float *restrict invstd, int64_t batch, int64_t pixels, int64_t channels,
                      float momentum, float eps) {
    const int64_t rows = batch * pixels, size = pixels * channels;
    double means[channels], squares[channels];
    double *partial = malloc(sizeof(double) * batch * channels);
    if (partial == NULL) {
        return KERNEL_NO_MEMORY;
    }
    float shift[channels], gain[channels];
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            column_sums(partial + b * channels, x + b * size, pixels, channels);
        }
#pragma omp single
        {
            add_partials(means, partial, batch, channels);
            for (int64_t c = 0; c < channels; c++) {
                means[c] /= (double)rows;
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            double *sums = partial + b * channels;
            for (int64_t c = 0; c < channels; c++) {
                sums[c] = 0.0;
            }
            for (int64_t i = 0; i < pixels; i++) {
                for (int64_t c = 0; c < channels; c++) {
                    const double d = x[b * size + i * channels + c] - means[c];
                    sums[c] += d * d;
                }
            }
        }
#pragma omp single
        {
            add_partials(squares, partial, batch, channels);
            for (int64_t c = 0; c < channels; c++) {
                const double variance = squares[c] / (double)rows;
                mean[c] = (float)means[c];
                invstd[c] = (float)(1.0 / sqrt(variance + eps));
                running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean[c];
                const double unbiased = rows > 1 ? squares[c] / (double)(rows - 1) : variance;
                running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
                gain[c] = invstd[c] * weight[c];
                shift[c] = bias[c] - mean[c] * gain[c];
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t j = b * size; j < (b + 1) * size; j += channels) {
                for (int64_t c = 0; c < channels; c++) {
                    const float value = x[j + c] * gain[c] + shift[c];
                    active[j + c] = value > 0.0f ? value : 0.0f;
                }
            }
        }
    }
    free(partial);
    return KERNEL_OK;
}

/*
 * Backward of norm_relu_forward: grad_active (B, P, C) -> grad_x (B, P, C), and the
 * gradients of the norm's weight and bias (C).
 */
int norm_relu_backward(const float *restrict grad_active, const float *restrict active,
                       const float *restrict x, const float *restrict mean,
                       const float *restrict invstd, const float *restrict weight,
                       float *restrict grad_x, float *restrict weight_grad,
                       float *restrict bias_grad, int64_t batch, int64_t pixels,
                       int64_t channels) {
    const int64_t rows = batch * pixels, size = pixels * channels;
    double sums[channels], products[channels];
    double *partial = malloc(sizeof(double) * 2 * batch * channels);
    if (partial == NULL) {
        return KERNEL_NO_MEMORY;
    }
    float scale[channels], offset[channels], slope[channels];
#pragma omp parallel
    {
        /* First the gradient through ReLU into grad_x, and its sums per image. */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t j = b * size; j < (b + 1) * size; j++) {
                grad_x[j] = active[j] > 0.0f ? grad_active[j] : 0.0f;
            }
            column_sums(partial + b * channels, grad_x + b * size, pixels, channels);
            double *product = partial + (batch + b) * channels;
            for (int64_t c = 0; c < channels; c++) {
                product[c] = 0.0;
            }
            for (int64_t j = b * size; j < (b + 1) * size; j += channels) {
                for (int64_t c = 0; c < channels; c++) {
                    product[c] += grad_x[j + c] * (x[j + c] - mean[c]);
                }
            }
        }
#pragma omp single
        {
            add_partials(sums, partial, batch, channels);
            add_partials(products, partial + batch * channels, batch, channels);
            for (int64_t c = 0; c < channels; c++) {
                const double centred = products[c] * invstd[c]; /* sum of g * normalized x */
                weight_grad[c] = (float)centred;
                bias_grad[c] = (float)sums[c];
                scale[c] = weight[c] * invstd[c];
                offset[c] = (float)(sums[c] / (double)rows);
                slope[c] = (float)(centred / (double)rows) * invstd[c];
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t j = b * size; j < (b + 1) * size; j += channels) {
                for (int64_t c = 0; c < channels; c++) {
                    const float g = grad_x[j + c];
                    grad_x[j + c] = scale[c] * (g - offset[c] - (x[j + c] - mean[c]) * slope[c]);
                }
            }
        }
    }
    free(partial);
    return KERNEL_OK;
}

/*
 * The reference classifier's first layer: a 3x3 convolution from one channel to 32, a
 * 2x2 max-pool and ReLU, in one pass that keeps the full-size maps out of memory.
 * images (B, H, W), weight (9, 32) [tap][channel], bias (32) -> out (B, Hp, Wp, 32): the
 * first Hp rows and Wp columns of the pooled maps, at most (H - 2) / 2 and (W - 2) / 2.
 */
#define FIRST_CHANNELS 32
/* The channels go in wide vectors. With AVX-512, 32 channels fill two registers, and the
 * first layer took 0.0035 s instead of 0.0084 s for 1,350 images on one core of a 2-core
 * Intel Xeon VM. */
int conv_pool_relu(const float *restrict images, const float *restrict weight,
                   const float *restrict bias, float *restrict out, int64_t batch,
                   int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w) {
    enum { GROUPS = FIRST_CHANNELS / WIDE };
    wide_lanes w[9][GROUPS], b0[GROUPS];
    for (int g = 0; g < GROUPS; g++) {
        b0[g] = WIDE_LOAD(bias + WIDE * g);
        for (int t = 0; t < 9; t++) {
            w[t][g] = WIDE_LOAD(weight + t * FIRST_CHANNELS + WIDE * g);
        }
    }
    const wide_lanes zero = {0};
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        const float *image = images + b * height * width;
        for (int64_t py = 0; py < pooled_h; py++) {
            for (int64_t px = 0; px < pooled_w; px++) {
                /* the 4x4 input patch under the 2x2 pooled window's four 3x3 windows */
                float patch[16];
                for (int i = 0; i < 16; i++) {
                    patch[i] = image[(2 * py + i / 4) * width + 2 * px + i % 4];
                }
                wide_lanes best[GROUPS];
                for (int d = 0; d < 4; d++) {
                    wide_lanes sum[GROUPS];
                    for (int g = 0; g < GROUPS; g++) {
                        sum[g] = b0[g];
                    }
                    for (int t = 0; t < 9; t++) {
                        const float pixel = patch[(d / 2 + t / 3) * 4 + d % 2 + t % 3];
                        for (int g = 0; g < GROUPS; g++) {
                            sum[g] += pixel * w[t][g];
                        }
                    }
                    for (int g = 0; g < GROUPS; g++) {
                        best[g] = d == 0 ? sum[g] : WIDE_MAX(sum[g], best[g]);
                    }
                }
                float *dst = out + ((b * pooled_h + py) * pooled_w + px) * FIRST_CHANNELS;
                for (int g = 0; g < GROUPS; g++) {
                    WIDE_STORE(dst + WIDE * g, WIDE_MAX(best[g], zero));
                }
            }
        }
    }
    return KERNEL_OK;
}

/*
 * The reference classifier's second layer: a 3x3 convolution from SECOND_IN channels to
 * SECOND_OUT, a 2x2 max-pool, bias and ReLU, by Winograd's F(2x2, 3x3) algorithm.
 * in (B, H, W, SECOND_IN) channels-last, filter (16, SECOND_IN, SECOND_OUT), bias
 * (SECOND_OUT) -> out (B, SECOND_OUT, Hp, Wp), Hp = (H - 2) / 2 and Wp = (W - 2) / 2: the
 * layout that the classifier's flattening reads.
 *
 * Each 2x2 pooling window is one Winograd tile, whose four outputs come from the 4x4 input
 * patch d at its top-left corner: A^T M A with M[xi] = sum over input channels of
 * (B^T d B)[xi] U[xi], for the 16 positions xi of a 4x4 array. filter contains
 * U = G g G^T, the transform of each input and output channel's 3x3 kernel g, as
 * [xi][in][out] (classifier.py's _winograd_filter). A tile then takes 16 multiply-adds per
 * input and output channel, where the direct convolution takes 36. The max-pool takes the
 * largest of the four outputs before the bias, which adds the same to all four.
 */
#define SECOND_IN 32
#define SECOND_OUT 64
#define TILE_GROUP 5 /* tiles whose products share each load of the filter */
/* output channels whose sums for TILE_GROUP tiles stay in 10 vector registers */
#define OUT_GROUP (2 * WIDE)

/* v[xi][t][c] = (B^T d B)[xi] for tile t of the group, whose 4x4 patch d starts at patch
 * in an image of width columns. B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. */
static void winograd_input(float *restrict v, int t, const float *restrict patch,
                           int64_t width) {
    for (int g = 0; g < SECOND_IN; g += 8) {
        lanes8 d[4][4], rows[4][4];
        for (int r = 0; r < 4; r++) {
            for (int s = 0; s < 4; s++) {
                d[r][s] = load8(patch + (r * width + s) * SECOND_IN + g);
            }
        }
        for (int s = 0; s < 4; s++) {
            rows[0][s] = d[0][s] - d[2][s];
            rows[1][s] = d[1][s] + d[2][s];
            rows[2][s] = d[2][s] - d[1][s];
            rows[3][s] = d[1][s] - d[3][s];
        }
        for (int i = 0; i < 4; i++) {
            float *row = v + (4 * i * TILE_GROUP + t) * SECOND_IN + g;
            store8(row, rows[i][0] - rows[i][2]);
            store8(row + TILE_GROUP * SECOND_IN, rows[i][1] + rows[i][2]);
            store8(row + 2 * TILE_GROUP * SECOND_IN, rows[i][2] - rows[i][1]);
            store8(row + 3 * TILE_GROUP * SECOND_IN, rows[i][1] - rows[i][3]);
        }
    }
}

/* The largest of a tile's four outputs, A^T m A, from m[xi] for 8 output channels, spaced
 * stride floats apart. A^T = [1 1 1 0; 0 1 -1 -1]. */
static inline lanes8 winograd_output_max(const float *m, int64_t stride) {
    lanes8 q[4][4], rows[2][4];
    for (int xi = 0; xi < 16; xi++) {
        q[xi / 4][xi % 4] = load8(m + xi * stride);
    }
    for (int s = 0; s < 4; s++) {
        rows[0][s] = q[0][s] + q[1][s] + q[2][s];
        rows[1][s] = q[1][s] - q[2][s] - q[3][s];
    }
    lanes8 best = rows[0][0] + rows[0][1] + rows[0][2];
    best = max8(best, rows[0][1] - rows[0][2] - rows[0][3]);
    best = max8(best, rows[1][0] + rows[1][1] + rows[1][2]);
    return max8(best, rows[1][1] - rows[1][2] - rows[1][3]);
}

/* m[xi][t][o] = sum over c of v[xi][t][c] filter[xi][c][o], for the OUT_GROUP output
 * channels that filter points to. Each step over c takes TILE_GROUP x OUT_GROUP
 * multiply-adds from one load of the filter's OUT_GROUP floats, in 10 vector registers.
 * With AVX-512 the registers hold 16 floats, and the second layer took 0.022 s instead
 * of 0.028 s for 1,350 images on one core of a 2-core Intel Xeon VM. */
static void winograd_products(float m[16][TILE_GROUP][OUT_GROUP], const float *restrict v,
                              const float *restrict filter) {
    for (int xi = 0; xi < 16; xi++) {
        const float *u = filter + xi * SECOND_IN * SECOND_OUT;
        const float *vx = v + xi * TILE_GROUP * SECOND_IN;
        wide_lanes sum[TILE_GROUP][2] = {{{0}}};
        for (int c = 0; c < SECOND_IN; c++) {
            const wide_lanes lo = WIDE_LOAD(u + c * SECOND_OUT);
            const wide_lanes hi = WIDE_LOAD(u + c * SECOND_OUT + WIDE);
            for (int t = 0; t < TILE_GROUP; t++) {
                sum[t][0] += vx[t * SECOND_IN + c] * lo;
                sum[t][1] += vx[t * SECOND_IN + c] * hi;
            }
        }
        for (int t = 0; t < TILE_GROUP; t++) {
            WIDE_STORE(m[xi][t], sum[t][0]);
            WIDE_STORE(m[xi][t] + WIDE, sum[t][1]);
        }
    }
}

int winograd_conv_pool_relu(const float *restrict in, const float *restrict filter,
                            const float *restrict bias, float *restrict out, int64_t batch,
                            int64_t height, int64_t width) {
    const int64_t pooled_h = (height - 2) / 2, pooled_w = (width - 2) / 2;
    const int64_t pooled = pooled_h * pooled_w;
    const lanes8 zero8 = {0};
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        const float *image = in + b * height * width * SECOND_IN;
        float *maps = out + b * SECOND_OUT * pooled;
        /* Tiles go in groups of TILE_GROUP in row-major order, which may span tile rows. The
         * arrays are aligned to whole vectors, because GCC tuned for Zen 1 splits each store
         * of 32 bytes that it cannot prove aligned into two. */
        for (int64_t first = 0; first < pooled; first += TILE_GROUP) {
            const int tiles = pooled - first < TILE_GROUP ? (int)(pooled - first) : TILE_GROUP;
            /* transformed inputs [xi][tile][in], zero for tiles past the last */
            _Alignas(sizeof(wide_lanes)) float v[16 * TILE_GROUP * SECOND_IN];
            for (int t = 0; t < TILE_GROUP; t++) {
                if (t < tiles) {
                    const int64_t py = (first + t) / pooled_w, px = (first + t) % pooled_w;
                    winograd_input(v, t, image + (2 * py * width + 2 * px) * SECOND_IN, width);
                    continue;
                }
                for (int xi = 0; xi < 16; xi++) {
                    memset(v + (xi * TILE_GROUP + t) * SECOND_IN, 0, sizeof(float) * SECOND_IN);
                }
            }
            for (int64_t o = 0; o < SECOND_OUT; o += OUT_GROUP) {
                _Alignas(sizeof(wide_lanes)) float m[16][TILE_GROUP][OUT_GROUP];
                winograd_products(m, v, filter + o);
                /* the pooled maps' values [tile][output channel], stored transposed */
                _Alignas(sizeof(wide_lanes)) float pooled_values[TILE_GROUP][OUT_GROUP];
                for (int t = 0; t < tiles; t++) {
                    for (int h = 0; h < OUT_GROUP; h += 8) {
                        const lanes8 best =
                            winograd_output_max(m[0][t] + h, TILE_GROUP * OUT_GROUP);
                        store8(pooled_values[t] + h, max8(best + load8(bias + o + h), zero8));
                    }
                }
                for (int c = 0; c < OUT_GROUP; c++) {
                    for (int t = 0; t < tiles; t++) {
                        maps[(o + c) * pooled + first + t] = pooled_values[t][c];
                    }
                }
            }
        }
    }
    return KERNEL_OK;
}

/*
 * The objective of content_leakage's logistic-regression probe (glo_search/metrics.py),
 * in double. Its value goes into loss[0] and its gradient into grad. The value is the
 * mean over the n rows of x of the cross-entropy of softmax(x w) against the labels y,
 * plus penalty times the sum of the squares of w outside its last row, which is the
 * intercept. x is (n, f) with ones in its last column, w and grad are (f, k), and y
 * contains n class indices in [0, k), with k at most PROBE_MAX_CLASSES. One thread runs it,
 * because the probe's products are small, and its sums then do not depend on the number
 * of threads.
 *
 * The products have k = 10 columns, too few for a matrix library to run at speed. Here
 * each row of w is padded to whole vectors of 4 doubles, and groups of PROBE_ROWS rows of
 * x share each load of a row of w or of the gradient. The sums stay in registers.
 */
#define PROBE_ROWS 4
#define PROBE_MAX_CLASSES 16 /* glo_search/native/__init__.py's PROBE_MAX_CLASSES */

typedef double lanes4d __attribute__((vector_size(32))); /* 4 doubles: AVX, or two SSE */

static inline lanes4d load4d(const double *p) {
    lanes4d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store4d(double *p, lanes4d v) { memcpy(p, &v, sizeof v); }

/* logits[r][c] = sum over j of x[r][j] padded[j][c], for PROBE_ROWS rows of f features and
 * vectors * 4 padded columns. Where this is inlined, vectors is a constant. */
static inline __attribute__((always_inline)) void probe_logits(
    double logits[PROBE_ROWS][PROBE_MAX_CLASSES], const double *restrict x,
    const double *restrict padded, int64_t f, int vectors) {
    lanes4d sum[PROBE_ROWS][PROBE_MAX_CLASSES / 4] = {{{0}}};
    for (int64_t j = 0; j < f; j++) {
        for (int v = 0; v < vectors; v++) {
            const lanes4d w_j = load4d(padded + (j * vectors + v) * 4);
            for (int r = 0; r < PROBE_ROWS; r++) {
                sum[r][v] += x[r * f + j] * w_j;
            }
        }
    }
    for (int r = 0; r < PROBE_ROWS; r++) {
        for (int v = 0; v < vectors; v++) {
            store4d(logits[r] + 4 * v, sum[r][v]);
        }
    }
}

/* padded_grad[j][c] += sum over r of x[r][j] residual[r][c], in probe_logits's shapes */
static inline __attribute__((always_inline)) void probe_gradient(
    double *restrict padded_grad, double residual[PROBE_ROWS][PROBE_MAX_CLASSES],
    const double *restrict x, int64_t f, int vectors) {
    lanes4d res[PROBE_ROWS][PROBE_MAX_CLASSES / 4];
    for (int r = 0; r < PROBE_ROWS; r++) {
        for (int v = 0; v < vectors; v++) {
            res[r][v] = load4d(residual[r] + 4 * v);
        }
    }
    for (int64_t j = 0; j < f; j++) {
        for (int v = 0; v < vectors; v++) {
            double *g = padded_grad + (j * vectors + v) * 4;
            lanes4d sum = load4d(g);
            for (int r = 0; r < PROBE_ROWS; r++) {
                sum += x[r * f + j] * res[r][v];
            }
            store4d(g, sum);
        }
    }
}

/* Turn the logits of rows [0, rows) into residuals (softmax - one-hot) / n, and set the
 * padding and the rows past the last to zero. Return the sum of the rows' cross-entropies. */
static double probe_residuals(double logits[PROBE_ROWS][PROBE_MAX_CLASSES],
                              const int64_t *restrict y, int64_t rows, int64_t k, int64_t n) {
    double total = 0.0;
    for (int64_t r = 0; r < PROBE_ROWS; r++) {
        double *row = logits[r];
        if (r >= rows) {
            memset(row, 0, sizeof(double) * PROBE_MAX_CLASSES);
            continue;
        }
        double top = row[0];
        for (int64_t c = 1; c < k; c++) {
            top = row[c] > top ? row[c] : top;
        }
        const double picked = row[y[r]];
        double sum = 0.0;
        for (int64_t c = 0; c < k; c++) {
            row[c] = exp(row[c] - top);
            sum += row[c];
        }
        total += top + log(sum) - picked;
        const double scale = 1.0 / (sum * (double)n);
        for (int64_t c = 0; c < k; c++) {
            row[c] *= scale;
        }
        row[y[r]] -= 1.0 / (double)n;
        for (int64_t c = k; c < PROBE_MAX_CLASSES; c++) {
            row[c] = 0.0;
        }
    }
    return total;
}

static inline __attribute__((always_inline)) double probe_pass(
    const double *restrict x, const double *restrict padded, const int64_t *restrict y,
    double *restrict padded_grad, double *restrict last_rows, int64_t n, int64_t f, int64_t k,
    int vectors) {
    double logits[PROBE_ROWS][PROBE_MAX_CLASSES];
    double total = 0.0;
    for (int64_t first = 0; first < n; first += PROBE_ROWS) {
        const int64_t rows = n - first < PROBE_ROWS ? n - first : PROBE_ROWS;
        const double *rows_x = x + first * f;
        if (rows < PROBE_ROWS) { /* the last group, padded with rows of zeros */
            memset(last_rows, 0, sizeof(double) * PROBE_ROWS * f);
            memcpy(last_rows, rows_x, sizeof(double) * rows * f);
            rows_x = last_rows;
        }
        probe_logits(logits, rows_x, padded, f, vectors);
        total += probe_residuals(logits, y + first, rows, k, n);
        probe_gradient(padded_grad, logits, rows_x, f, vectors);
    }
    return total;
}

int logistic_objective(const double *restrict x, const double *restrict w,
                       const int64_t *restrict y, double *restrict grad, double *restrict loss,
                       int64_t n, int64_t f, int64_t k, double penalty) {
    const int vectors = (int)((k + 3) / 4);
    const int64_t width = 4 * vectors;
    double *padded = calloc((size_t)(f * width), sizeof(double));
    double *padded_grad = calloc((size_t)(f * width), sizeof(double));
    double *last_rows = malloc(sizeof(double) * PROBE_ROWS * f);
    if (padded == NULL || padded_grad == NULL || last_rows == NULL) {
        free(padded);
        free(padded_grad);
        free(last_rows);
        return KERNEL_NO_MEMORY;
    }
    for (int64_t j = 0; j < f; j++) {
        memcpy(padded + j * width, w + j * k, sizeof(double) * k);
    }
    double total;
    switch (vectors) { /* a constant count of vectors lets GCC keep the sums in registers */
    case 1:
        total = probe_pass(x, padded, y, padded_grad, last_rows, n, f, k, 1);
        break;
    case 2:
        total = probe_pass(x, padded, y, padded_grad, last_rows, n, f, k, 2);
        break;
    case 3:
        total = probe_pass(x, padded, y, padded_grad, last_rows, n, f, k, 3);
        break;
    default:
        total = probe_pass(x, padded, y, padded_grad, last_rows, n, f, k, 4);
        break;
    }
    double squares = 0.0;
    for (int64_t j = 0; j < f; j++) {
        for (int64_t c = 0; c < k; c++) {
            const double w_jc = w[j * k + c];
            const double decay = j < f - 1 ? 2.0 * penalty * w_jc : 0.0;
            squares += j < f - 1 ? w_jc * w_jc : 0.0;
            grad[j * k + c] = padded_grad[j * width + c] + decay;
        }
    }
    loss[0] = total / (double)n + penalty * squares;
    free(padded);
    free(padded_grad);
    free(last_rows);
    return KERNEL_OK;
}

/*
 * The style attributes' sums over each of count (H, W) images, in double:
 * out (count, 5) = ink mass, mu20, mu02 and mu11 (the central moments, not yet divided by
 * the mass), and the perimeter: the sum of sqrt(dx^2 + dy^2) over pixels, where dx and
 * dy are the forward differences to the next column and row, and the pixels past the
 * last column and row count as zero.
 *
 * The moments come from the row and column sums, about the ink's centre, as in
 * glo_search/metrics.py's _ink_moments. A blank image gets mass 0 and its moments about
 * the centre that a mass of 1e-8 gives; metrics.py clamps the mass the same way.
 */
int style_sums(const float *restrict images, double *restrict out, int64_t count,
               int64_t height, int64_t width) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < count; b++) {
        double rows[height], row_moments[height], columns[width];
        const float *x = images + b * height * width;
        double perimeter = 0.0;
        for (int64_t w = 0; w < width; w++) {
            columns[w] = 0.0;
        }
        for (int64_t h = 0; h < height; h++) {
            const float *row = x + h * width;
            const float *below = h + 1 < height ? row + width : NULL;
            double ink = 0.0, moment = 0.0;
            for (int64_t w = 0; w < width; w++) {
                const double value = row[w];
                const double dx = (w + 1 < width ? (double)row[w + 1] : 0.0) - value;
                const double dy = (below != NULL ? (double)below[w] : 0.0) - value;
                ink += value;
                moment += value * (double)w;
                columns[w] += value;
                perimeter += sqrt(dx * dx + dy * dy);
            }
            rows[h] = ink;
            row_moments[h] = moment;
        }
        double mass = 0.0, sum_x = 0.0, sum_y = 0.0;
        for (int64_t h = 0; h < height; h++) {
            mass += rows[h];
            sum_y += rows[h] * (double)h;
        }
        for (int64_t w = 0; w < width; w++) {
            sum_x += columns[w] * (double)w;
        }
        const double divisor = mass > 1e-8 ? mass : 1e-8;
        const double mean_x = sum_x / divisor, mean_y = sum_y / divisor;
        double mu20 = 0.0, mu02 = 0.0, mu11 = 0.0;
        for (int64_t w = 0; w < width; w++) {
            const double dx = (double)w - mean_x;
            mu20 += columns[w] * dx * dx;
        }
        for (int64_t h = 0; h < height; h++) {
            const double dy = (double)h - mean_y;
            mu02 += rows[h] * dy * dy;
            mu11 += dy * (row_moments[h] - mean_x * rows[h]);
        }
        double *result = out + 5 * b;
        result[0] = mass;
        result[1] = mu20;
        result[2] = mu02;
        result[3] = mu11;
        result[4] = perimeter;
    }
    return KERNEL_OK;
}
