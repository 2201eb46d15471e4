#include "CCompression.h"

#include <string.h>
#include <zlib.h>
#include <zstd.h>

int strata_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len) {
    z_stream stream;
    memset(&stream, 0, sizeof(stream));
    if (inflateInit2(&stream, -12) != Z_OK) return -1;
    stream.next_in = (Bytef *)src;
    stream.avail_in = (uInt)src_len;
    stream.next_out = (Bytef *)dst;
    stream.avail_out = (uInt)dst_len;
    int ret = inflate(&stream, Z_FINISH);
    int ok = (ret == Z_STREAM_END || ret == Z_BUF_ERROR) && stream.avail_out == 0;
    inflateEnd(&stream);
    return ok ? 0 : -1;
}

long strata_deflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len) {
    z_stream stream;
    memset(&stream, 0, sizeof(stream));
    if (deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) return -1;
    stream.next_in = (Bytef *)src;
    stream.avail_in = (uInt)src_len;
    stream.next_out = (Bytef *)dst;
    stream.avail_out = (uInt)dst_len;
    int ret = deflate(&stream, Z_FINISH);
    long size = (ret == Z_STREAM_END) ? (long)(dst_len - stream.avail_out) : -1;
    deflateEnd(&stream);
    return size;
}

int strata_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len) {
    ZSTD_DCtx *ctx = ZSTD_createDCtx();
    if (!ctx) return -1;
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    int result = -1;
    // Decompress frame after frame until the cluster is full; what follows
    // (sector padding) is ignored.
    while (out.pos < out.size) {
        size_t last = in.pos;
        size_t ret = ZSTD_decompressStream(ctx, &out, &in);
        if (ZSTD_isError(ret)) break;
        if (out.pos == out.size) { result = 0; break; }
        if (in.pos == in.size || (in.pos == last && ret != 0)) break;
    }
    ZSTD_freeDCtx(ctx);
    return result;
}

long strata_zstd_compress(const void *src, size_t src_len, void *dst, size_t dst_len) {
    size_t ret = ZSTD_compress(dst, dst_len, src, src_len, 3);
    return ZSTD_isError(ret) ? -1 : (long)ret;
}
