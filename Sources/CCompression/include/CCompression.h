#ifndef STRATA_CCOMPRESSION_H
#define STRATA_CCOMPRESSION_H

// zlib (raw deflate, as qcow2 stores it) and zstd, for qcow2 compressed
// clusters. Each call fills `dst` exactly: qcow2 stores compressed data
// rounded up to sectors, so input may carry trailing bytes, and a cluster
// always decompresses to exactly one cluster.

#include <stddef.h>

/// Inflates raw deflate data (window bits -12) into exactly `dst_len` bytes.
/// Returns 0, or -1 if the data is corrupt or too short.
int strata_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len);

/// Deflates `src` as raw deflate (window bits -12); returns the compressed
/// size, or -1 if it would not fit in `dst_len` bytes.
long strata_deflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len);

/// Decompresses zstd frames into exactly `dst_len` bytes; 0 or -1.
int strata_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len);

/// Compresses `src` with zstd; the compressed size, or -1 if it does not fit.
long strata_zstd_compress(const void *src, size_t src_len, void *dst, size_t dst_len);

#endif
