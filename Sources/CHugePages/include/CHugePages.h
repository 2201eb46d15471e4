#ifndef STRATA_CHUGEPAGES_H
#define STRATA_CHUGEPAGES_H

// Buffers for O_DIRECT transfers larger than a block device's segment limit
// can describe with scattered 4 KiB pages (virtio-blk: 254 segments, so
// anything over 1016 KiB): each slab is one 2 MiB transparent huge page
// where the kernel grants it, so a 1 MiB read is one physical segment and
// one disk request instead of two.
//
// The functions match NIO's custom ByteBufferAllocator hooks. Every
// allocation is 4096-aligned, so O_DIRECT needs no padding (which would
// push a 2 MiB transfer past its slab). Sizes that do not want a slab, or
// arrive when every slab is taken, come from posix_memalign, so an
// allocation never fails for want of slabs. Thread-safe: NIO may free a
// buffer on whichever thread drops it last.

#include <stddef.h>

/// Size of one slab (a transparent huge page on x86-64 and arm64 with 4K pages).
#define STRATA_HUGE_SLAB_SIZE ((size_t)2 << 20)
/// Longer allocations get a slab: up to 254 scattered pages (virtio-blk's
/// segment limit, the smallest common one) no device splits a transfer.
#define STRATA_HUGE_MIN_SIZE ((size_t)254 * 4096 + 1)
/// Alignment of every allocation.
#define STRATA_HUGE_ALIGNMENT ((size_t)4096)

void *_Nullable strata_huge_alloc(size_t size);
void *_Nullable strata_huge_realloc(void *_Nullable ptr, size_t old_size, size_t new_size);
void strata_huge_free(void *_Nonnull ptr);
void strata_huge_copy(void *_Nonnull dst, const void *_Nonnull src, size_t count);

/// Whether `ptr` is a slab (for tests).
int strata_huge_is_slab(const void *_Nullable ptr);

#endif
